// The "emulated" build's kernels (gsavatar/kernels.py, tests only): the CUDA sources themselves,
// compiled as C++ against the CPU emulator of cuda_emulator.h (-DGSA_EMULATE_CUDA).
#ifndef GSA_EMULATE_CUDA
#error "emulated_kernels.cpp is only for the emulated build (-DGSA_EMULATE_CUDA)"
#endif

#include "hashgrid_kernels.cu"
#include "raster_kernels.cu"
