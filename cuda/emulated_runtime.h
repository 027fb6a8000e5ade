// The CUDA runtime types the launch headers (*_launch.h) name, for the emulated build
// (-DGSA_EMULATE_CUDA, tests only): the ops and the kernels then compile without the CUDA toolkit.
// The emulator itself is cuda_emulator.h.
#pragma once

using cudaStream_t = struct gsa_emulated_stream*;  // launches run to completion at once: no streams
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
