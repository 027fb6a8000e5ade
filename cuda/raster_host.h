// The CPU rasterizer: what raster_ops.cpp runs for CPU tensors (the "cpp" backend).
//
// Why a CPU path of its own rather than the kernels' per-element functions in plain loops: on a
// CPU the time goes into the per-pixel steps, and those are only fast with pixels in SIMD lanes,
// tiles spread over the cores by cost, and binning without a general sort. The CUDA kernels'
// arithmetic is still checked on CPU machines, by the emulated build that runs the kernels
// themselves (tests/emulated.py). So there is one fast CPU path, not a fast one and a slow twin.
//
// Same conventions as the reference (_torch_impl) and the kernels (raster_math.h): the same
// projection (project_forward_one, shared), the same tile lists (tiles from tile_range, depth
// order, ties in input order), the same alpha (cap 0.99, skipped at or below 1/255, the same
// expression for the exponent) and the same front-to-back recurrences, forward and backward. It
// differs only in rounding: its exp is exp_fast below (at most kFastExpMaxRelError from the true
// value) and its sums run in another order.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "raster_math.h"

namespace gsa {

// Largest relative error of exp_fast over [kFastExpMin, 0] (checked by tests/test_cpu_raster.py).
constexpr float kFastExpMaxRelError = 2.0e-7f;  // under 2 float32 ulps
// Below this argument exp_fast returns exp(kFastExpMin) (tiny: such alphas are skipped anyway).
constexpr float kFastExpMin = -87.0f;

// color + (1 - alpha) * under for premultiplied layers [H, W, 3] / [H, W, 1] of any strides (the
// layers of a batch are views), in one pass over the CPU ops' threads: a frame's compositing.
at::Tensor over(const at::Tensor& color, const at::Tensor& alpha, const at::Tensor& under);

// exp_fast of every element of a float32 CPU tensor (for the error test).
at::Tensor fast_exp(const at::Tensor& x);

// The number of SIMD lanes the CPU rasterizer was compiled with (16 AVX-512, 8 AVX, 4 otherwise).
int host_simd_lanes();

// Threads of the CPU ops (projection, binning, rasterization): set_host_threads(n) with n > 0, else
// every processor this process may run on. Separate from torch's thread count, which a preset may
// keep at 1 for the networks' small ops: the rasterizer's work per call is large enough for all cores.
int host_threads();
void set_host_threads(int64_t threads);

// fn(begin, end) over [0, n) in chunks spread over host_threads() threads (OpenMP, static split);
// on one thread when n < serial_below (too little work to be worth waking the others).
template <typename Fn>
void host_parallel_for(int64_t n, Fn fn, int64_t serial_below = 4096) {
  if (n <= 0) return;
  const int64_t threads = n < serial_below ? 1 : host_threads();
  const int64_t chunk = (n + threads - 1) / threads;
#pragma omp parallel for num_threads(static_cast<int>(threads)) schedule(static, 1)
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t begin = t * chunk, end = begin + chunk < n ? begin + chunk : n;
    if (begin < end) fn(begin, end);
  }
}

// Binning of the projected Gaussians of IsectArgs: each tile's list in depth order, ties in input
// order, by dealing the depth-sorted Gaussians into their tiles (no sort of the pairs).
// a.capacity < 0: exactly the pairs needed; else buffers of that size and the pairs past it
// dropped (the contract of isect_tiles). Returns {tile_offsets, gauss_ids, pairs}.
std::vector<at::Tensor> host_isect_tiles(IsectArgs& a, int64_t images, const at::TensorOptions& options);

// Forward compositing of RasterArgs (n Gaussians) into a.image, a.T_final, a.last.
void host_raster_forward(const RasterArgs& a, int64_t images, int64_t n);

// Gradients [n, 6 + channels] (u, v, A, B, C, o, features) of the forward outputs.
at::Tensor host_raster_backward(const RasterArgs& a, int64_t images, int64_t n);

}  // namespace gsa
