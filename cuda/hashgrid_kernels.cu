// Hash-grid encoder CUDA kernels: thin thread maps over the math in hashgrid_math.h (the host
// twins in hashgrid_ops.cpp run the same functions in loops). No torch headers here.
#include "hashgrid_launch.h"

#ifdef GSA_EMULATE_CUDA
#include "cuda_emulator.h"
#endif

namespace gsa {
namespace hashgrid {
namespace {

struct AtomicAdd {
  __device__ void operator()(float* dst, float value) const { atomicAdd(dst, value); }
};

// This thread's point along blockIdx.x, or -1 past the last one.
__device__ __forceinline__ int64_t point_index(const Params& p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  return i < p.points ? i : -1;
}

// One thread per (point, level); blockIdx.y is the level, so a block reads one level's table.
template <int DIM, int F>
__global__ void forward_kernel(Params p, const float* __restrict__ x, const float* __restrict__ table,
                               float* __restrict__ out) {
  const int64_t i = point_index(p);
  const int level = blockIdx.y;
  if (i >= 0) forward_level<DIM, F>(p, x + i * DIM, table, level, out + (i * p.levels + level) * F);
}

template <int DIM, int F>
__global__ void table_grad_kernel(Params p, const float* __restrict__ x, const float* __restrict__ grad_out,
                                  float* __restrict__ grad_table) {
  const int64_t i = point_index(p);
  const int level = blockIdx.y;
  if (i >= 0)
    table_grad_level<DIM, F>(p, x + i * DIM, grad_out + (i * p.levels + level) * F, level, grad_table, AtomicAdd{});
}

// One thread per point, summing its levels in order: deterministic, no atomics.
template <int DIM, int F>
__global__ void x_grad_kernel(Params p, const float* __restrict__ x, const float* __restrict__ table,
                              const float* __restrict__ grad_out, float* __restrict__ grad_x) {
  const int64_t i = point_index(p);
  if (i >= 0) x_grad_point<DIM, F>(p, x + i * DIM, table, grad_out + i * p.levels * F, grad_x + i * DIM);
}

}  // namespace

void launch_forward(const Params& p, const float* x, const float* table, float* out, cudaStream_t stream) {
  if (p.points == 0) return;
  const dim3 grid(num_blocks(p.points), p.levels);
  dispatch(p, [&](auto dim, auto features) {
    GSA_LAUNCH(grid, kBlock, stream, forward_kernel<dim.value, features.value>)(p, x, table, out);
  });
}

void launch_backward(const Params& p, const float* x, const float* table, const float* grad_out, float* grad_table,
                     float* grad_x, cudaStream_t stream) {
  if (p.points == 0) return;
  const dim3 grid(num_blocks(p.points), p.levels);
  dispatch(p, [&](auto dim, auto features) {
    GSA_LAUNCH(grid, kBlock, stream, table_grad_kernel<dim.value, features.value>)(p, x, grad_out, grad_table);
    if (grad_x != nullptr)
      GSA_LAUNCH(num_blocks(p.points), kBlock, stream, x_grad_kernel<dim.value, features.value>)(p, x, table, grad_out,
                                                                                                 grad_x);
  });
}

}  // namespace hashgrid
}  // namespace gsa
