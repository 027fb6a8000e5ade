// CUDA kernels of the rasterizer. The per-element math is in raster_math.h (shared with the host
// twins in raster_ops.cpp); this file only spreads it over threads:
//   projection, binning:  one thread per Gaussian;
//   compositing:          one 16 x 16 block per tile, one thread per pixel, the tile's depth-sorted
//                         list streamed through shared memory in batches of 256 Gaussians;
//   backward compositing: the same layout, front to back (see PixelBackward), per-Gaussian
//                         gradients summed over each warp with shuffles, then one atomicAdd per warp.
#ifdef GSA_EMULATE_CUDA
#include "cuda_emulator.h"
#else
#include <cub/device/device_radix_sort.cuh>
#endif

#include "raster_launch.h"

namespace gsa {
namespace {

constexpr int kTilePixels = kTile * kTile;
constexpr unsigned kFullMask = 0xffffffffu;

// One thread per Gaussian running `Work` (a per-Gaussian function of raster_math.h).
template <class Args, void (*Work)(const Args&, int64_t)>
__global__ void each_gaussian(Args args) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < args.n) Work(args, i);
}

template <class Args, void (*Work)(const Args&, int64_t)>
void launch_each_gaussian(const Args& args, cudaStream_t stream) {
  if (args.n > 0) GSA_LAUNCH(num_blocks(args.n), kBlock, stream, each_gaussian<Args, Work>)(args);
}

// The Gaussian data a tile's threads share, one batch at a time.
struct SharedBatch {
  int32_t id[kTilePixels];
  float2 mean[kTilePixels];
  float4 conic_opacity[kTilePixels];
};

__device__ __forceinline__ void load_batch(const RasterArgs& a, SharedBatch& batch, int64_t begin, int64_t end,
                                           int thread) {
  const int64_t k = begin + thread;
  if (k < end) {
    const int64_t g = a.gauss_ids[k];  // 64-bit: 3 * g overflows int32 beyond ~715M Gaussians
    batch.id[thread] = static_cast<int32_t>(g);
    batch.mean[thread] = make_float2(a.means2d[2 * g], a.means2d[2 * g + 1]);
    batch.conic_opacity[thread] = make_float4(a.conics[3 * g], a.conics[3 * g + 1], a.conics[3 * g + 2], a.opacities[g]);
  }
}

template <int CH>
__global__ void __launch_bounds__(kTilePixels) raster_forward_kernel(RasterArgs a) {
  __shared__ SharedBatch batch;
  const int tile = blockIdx.x, image = blockIdx.y;
  const int thread = threadIdx.y * kTile + threadIdx.x;
  const int col = (tile % a.tiles_x) * kTile + threadIdx.x, row = (tile / a.tiles_x) * kTile + threadIdx.y;
  const bool inside = col < a.width && row < a.height;
  const float px = col + 0.5f, py = row + 0.5f;
  const int64_t list = static_cast<int64_t>(image) * a.tiles_x * a.tiles_y + tile;
  const int64_t start = a.tile_offsets[list], end = a.tile_offsets[list + 1];

  PixelForward st;
  forward_begin(st, inside);
  for (int64_t base = start; base < end; base += kTilePixels) {
    // Every thread reaches this barrier; it also guards the shared batch against being refilled
    // while a slower thread still reads the previous one.
    if (__syncthreads_count(st.done) == kTilePixels) break;
    load_batch(a, batch, base, end, thread);
    __syncthreads();
    const int n = static_cast<int>(min(static_cast<int64_t>(kTilePixels), end - base));
    for (int m = 0; m < n && !st.done; ++m) {
      const float2 mean = batch.mean[m];
      const float4 co = batch.conic_opacity[m];
      const float mean_xy[2] = {mean.x, mean.y}, conic[3] = {co.x, co.y, co.z};
      forward_step(st, px, py, mean_xy, conic, co.w, a.features + static_cast<int64_t>(batch.id[m]) * CH, CH,
                   a.min_T, static_cast<int>(base - start) + m);
    }
  }
  if (!inside) return;
  const int64_t pixel = (static_cast<int64_t>(image) * a.height + row) * a.width + col;
#pragma unroll
  for (int c = 0; c < CH; ++c) a.image[pixel * CH + c] = st.acc[c];
  a.T_final[pixel] = st.T;
  a.last[pixel] = st.last;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(kFullMask, x, offset);
  return x;
}

template <int CH>
__global__ void __launch_bounds__(kTilePixels) raster_backward_kernel(RasterArgs a) {
  __shared__ SharedBatch batch;
  __shared__ int max_last;
  const int tile = blockIdx.x, image = blockIdx.y;
  const int thread = threadIdx.y * kTile + threadIdx.x;
  const int lane = thread % 32;
  const int col = (tile % a.tiles_x) * kTile + threadIdx.x, row = (tile / a.tiles_x) * kTile + threadIdx.y;
  const bool inside = col < a.width && row < a.height;
  const float px = col + 0.5f, py = row + 0.5f;
  const int64_t list = static_cast<int64_t>(image) * a.tiles_x * a.tiles_y + tile;
  const int64_t start = a.tile_offsets[list], end = a.tile_offsets[list + 1];
  const int64_t pixel = inside ? (static_cast<int64_t>(image) * a.height + row) * a.width + col : 0;

  PixelBackward st;
  backward_begin(st, inside, a.image + pixel * CH, a.v_image + pixel * CH, inside ? a.T_final[pixel] : 1.0f,
                 inside ? a.v_alpha[pixel] : 0.0f, inside ? a.last[pixel] : 0, CH);
  if (thread == 0) max_last = 0;
  __syncthreads();
  atomicMax(&max_last, st.last);
  __syncthreads();
  const int64_t stop = min(end, start + max_last);

  for (int64_t base = start; base < stop; base += kTilePixels) {
    __syncthreads();  // the previous batch is no longer read
    load_batch(a, batch, base, stop, thread);
    __syncthreads();
    const int n = static_cast<int>(min(static_cast<int64_t>(kTilePixels), stop - base));
    for (int m = 0; m < n; ++m) {
      const float2 mean = batch.mean[m];
      const float4 co = batch.conic_opacity[m];
      const float mean_xy[2] = {mean.x, mean.y}, conic[3] = {co.x, co.y, co.z};
      const int64_t g = batch.id[m];
      PairGrad grad = {0, 0, 0, 0, 0, 0};
      float v_feature[CH];
#pragma unroll
      for (int c = 0; c < CH; ++c) v_feature[c] = 0.0f;
      const bool hit = backward_step(st, px, py, mean_xy, conic, co.w, a.features + g * CH, CH,
                                     static_cast<int>(base - start) + m, grad, v_feature);
      if (!__any_sync(kFullMask, hit)) continue;  // most pairs touch few pixels of a tile
      const float gu = warp_sum(grad.u), gv = warp_sum(grad.v);
      const float gA = warp_sum(grad.A), gB = warp_sum(grad.B), gC = warp_sum(grad.C), go = warp_sum(grad.o);
      float gf[CH];
#pragma unroll
      for (int c = 0; c < CH; ++c) gf[c] = warp_sum(v_feature[c]);
      if (lane == 0) {
        atomicAdd(a.v_means2d + 2 * g, gu);
        atomicAdd(a.v_means2d + 2 * g + 1, gv);
        atomicAdd(a.v_conics + 3 * g, gA);
        atomicAdd(a.v_conics + 3 * g + 1, gB);
        atomicAdd(a.v_conics + 3 * g + 2, gC);
        atomicAdd(a.v_opacities + g, go);
#pragma unroll
        for (int c = 0; c < CH; ++c) atomicAdd(a.v_features + g * CH + c, gf[c]);
      }
    }
  }
}

}  // namespace

void launch_project_forward(const ProjectArgs& args, cudaStream_t stream) {
  launch_each_gaussian<ProjectArgs, project_forward_one>(args, stream);
}

void launch_project_backward(const ProjectArgs& args, cudaStream_t stream) {
  launch_each_gaussian<ProjectArgs, project_backward_one>(args, stream);
}

void launch_isect_count(const IsectArgs& args, cudaStream_t stream) {
  launch_each_gaussian<IsectArgs, isect_count_one>(args, stream);
}

void launch_isect_write(const IsectArgs& args, cudaStream_t stream) {
  launch_each_gaussian<IsectArgs, isect_write_one>(args, stream);
}

cudaError_t sort_pairs(const int64_t* keys_in, int64_t* keys_out, const int32_t* ids_in, int32_t* ids_out, int count,
                int end_bit, void* temp, size_t& temp_bytes, cudaStream_t stream) {
  // Unsigned, so cub compares the bits as they are (the keys are never negative).
  using Key = unsigned long long;
  static_assert(sizeof(Key) == sizeof(int64_t), "64-bit keys");
  return cub::DeviceRadixSort::SortPairs(temp, temp_bytes, reinterpret_cast<const Key*>(keys_in),
                                         reinterpret_cast<Key*>(keys_out), ids_in, ids_out, count, 0, end_bit, stream);
}

void launch_raster_forward(const RasterArgs& args, int images, cudaStream_t stream) {
  const dim3 grid(args.tiles_x * args.tiles_y, images), block(kTile, kTile);
  switch (args.channels) {
#define GSA_CASE(CH) case CH: GSA_LAUNCH(grid, block, stream, raster_forward_kernel<CH>)(args); break;
    GSA_CASE(1) GSA_CASE(2) GSA_CASE(3) GSA_CASE(4) GSA_CASE(5) GSA_CASE(6) GSA_CASE(7) GSA_CASE(8)
#undef GSA_CASE
    default: break;  // raster_ops.cpp checks 1 <= channels <= kMaxChannels
  }
}

void launch_raster_backward(const RasterArgs& args, int images, cudaStream_t stream) {
  const dim3 grid(args.tiles_x * args.tiles_y, images), block(kTile, kTile);
  switch (args.channels) {
#define GSA_CASE(CH) case CH: GSA_LAUNCH(grid, block, stream, raster_backward_kernel<CH>)(args); break;
    GSA_CASE(1) GSA_CASE(2) GSA_CASE(3) GSA_CASE(4) GSA_CASE(5) GSA_CASE(6) GSA_CASE(7) GSA_CASE(8)
#undef GSA_CASE
    default: break;
  }
}

}  // namespace gsa
