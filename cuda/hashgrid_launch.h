// CUDA launchers of the hash-grid encoder (hashgrid_kernels.cu). Torch-free, so nvcc compiles the
// kernels without the torch headers; hashgrid_ops.cpp fills Params from tensors. Raw contiguous
// float32 device pointers; the caller checks the launch error.
#pragma once

#ifdef GSA_EMULATE_CUDA
#include "emulated_runtime.h"
#else
#include <cuda_runtime.h>
#endif

#include "hashgrid_math.h"

namespace gsa {
namespace hashgrid {

// x [P, dim], table [L, T, F] -> out [P, L*F].
void launch_forward(const Params& p, const float* x, const float* table, float* out, cudaStream_t stream);

// grad_out [P, L*F] -> grad_table [L, T, F] (accumulated into: zero it first) and, unless grad_x
// is null, grad_x [P, dim] (overwritten).
void launch_backward(const Params& p, const float* x, const float* table, const float* grad_out, float* grad_table,
                     float* grad_x, cudaStream_t stream);

}  // namespace hashgrid
}  // namespace gsa
