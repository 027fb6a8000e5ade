// Shared by every kernel source: the host/device qualifier and the launch helpers.
//
// The per-element math of each kernel is written once, as GSA_HD inline functions in the
// *_math.h headers, called by the CUDA kernels (*.cu) and by the CPU path (*_ops.cpp loops; the
// rasterizer's compositing on the CPU is raster_host.cpp's own SIMD code).
#pragma once

#if defined(__CUDACC__)
#define GSA_HD __host__ __device__ __forceinline__
#else
#define GSA_HD inline
#endif

#include <cstdint>

// GSA_LAUNCH(grid, block, stream, kernel)(args...) launches a kernel: kernel<<<grid, block, 0, stream>>>
// under nvcc; under the CPU emulator (-DGSA_EMULATE_CUDA, tests only: cuda_emulator.h) the same
// kernel runs on fibers. The kernel comes last so that a template's commas need no parentheses.
#if defined(GSA_EMULATE_CUDA)
#define GSA_LAUNCH(grid, block, stream, ...) ::gsa_emu::launch(grid, block, __VA_ARGS__)
#else
#define GSA_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace gsa {

// Threads per block for one-thread-per-element kernels.
constexpr int kBlock = 256;

inline int num_blocks(int64_t n, int block = kBlock) { return static_cast<int>((n + block - 1) / block); }

GSA_HD int imin(int a, int b) { return a < b ? a : b; }
GSA_HD int imax(int a, int b) { return a > b ? a : b; }

}  // namespace gsa
