// Shared by every kernel source: the host/device qualifier and the launch helpers.
//
// The per-element math of each kernel is written once, as GSA_HD inline functions in the
// *_math.h headers. The CUDA kernels (*.cu) and their host twins (*_ops.cpp, plain C++ loops)
// both call those functions, so a CPU machine can test the kernels' arithmetic against the
// PyTorch reference and the CUDA build differs only in how the work is spread over threads.
#pragma once

#if defined(__CUDACC__)
#define GSA_HD __host__ __device__ __forceinline__
#else
#define GSA_HD inline
#endif

#include <cstdint>

namespace gsa {

// Threads per block for one-thread-per-element kernels.
constexpr int kBlock = 256;

inline int num_blocks(int64_t n, int block = kBlock) { return static_cast<int>((n + block - 1) / block); }

GSA_HD int imin(int a, int b) { return a < b ? a : b; }
GSA_HD int imax(int a, int b) { return a > b ? a : b; }

}  // namespace gsa
