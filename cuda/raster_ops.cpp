// Tensor-level rasterizer ops: checks, allocation, and dispatch (kernel_dispatch.h) to the kernels'
// launchers (raster_kernels.cu) or to the host twins below, which run the same per-element
// functions of raster_math.h in plain loops.
#include "raster.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>

#include "kernel_dispatch.h"
#include "raster_math.h"

#ifdef GSA_HAS_KERNELS
#include "raster_launch.h"
#endif

namespace gsa {
namespace {

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, " (got ", t.scalar_type(), ")");
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (got ", t.device(), ")");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == static_cast<int64_t>(shape.size()), name, " must have ", shape.size(), " dimensions (got ",
              t.sizes(), ")");
  int64_t d = 0;
  for (int64_t s : shape) {
    TORCH_CHECK(s < 0 || t.size(d) == s, name, " has shape ", t.sizes(), "; dimension ", d, " must be ", s);
    ++d;
  }
}

const float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }
float* f32m(at::Tensor& t) { return t.data_ptr<float>(); }

// Run fn(i) for i in [0, n) on the host, spread over torch's intra-op threads.
template <typename Fn>
void host_for(int64_t n, Fn fn) {
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
}

#ifdef GSA_HAS_KERNELS
// Launch on the tensor's device and stream (kernel_dispatch.h); report launch errors as exceptions.
#define GSA_LAUNCH_ON(tensor, launch)        \
  do {                                       \
    GSA_KERNEL_GUARD(tensor);                \
    launch(a, kernel_stream(tensor));        \
    GSA_CHECK_LAUNCH();                      \
  } while (0)
#define GSA_LAUNCH_IMAGES_ON(tensor, launch, images)                \
  do {                                                              \
    GSA_KERNEL_GUARD(tensor);                                       \
    launch(a, static_cast<int>(images), kernel_stream(tensor));     \
    GSA_CHECK_LAUNCH();                                             \
  } while (0)

// cub's radix sort of the pairs on the bits that can differ: the depth's 32 and as many tile bits
// as `tiles` (all images) needs; the padding key (all ones) still sorts last. Fewer passes than
// at::sort's 64 bits, and the ids move with the keys (no gather).
std::pair<at::Tensor, at::Tensor> sort_pairs_on_device(const at::Tensor& keys, const at::Tensor& ids, int64_t tiles) {
  const int64_t count = keys.size(0);
  TORCH_CHECK(count < std::numeric_limits<int>::max(), "too many (tile, Gaussian) pairs to sort: ", count);
  int tile_bits = 1;
  while ((int64_t{1} << tile_bits) <= tiles) ++tile_bits;
  const int end_bit = 32 + tile_bits;
  at::Tensor keys_out = at::empty_like(keys), ids_out = at::empty_like(ids);
  if (count == 0) return {keys_out, ids_out};
  GSA_KERNEL_GUARD(keys);
  const cudaStream_t stream = kernel_stream(keys);
  size_t temp_bytes = 0;
  GSA_CHECK_CUDA(sort_pairs(keys.data_ptr<int64_t>(), keys_out.data_ptr<int64_t>(), ids.data_ptr<int32_t>(),
                            ids_out.data_ptr<int32_t>(), static_cast<int>(count), end_bit, nullptr, temp_bytes,
                            stream));
  // At least one byte: a null scratch pointer would make the second call another size query.
  temp_bytes = std::max<size_t>(temp_bytes, 1);
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, keys.options().dtype(at::kByte));
  GSA_CHECK_CUDA(sort_pairs(keys.data_ptr<int64_t>(), keys_out.data_ptr<int64_t>(), ids.data_ptr<int32_t>(),
                            ids_out.data_ptr<int32_t>(), static_cast<int>(count), end_bit, temp.data_ptr(), temp_bytes,
                            stream));
  return {keys_out, ids_out};
}
#else
#define GSA_LAUNCH_ON(tensor, launch) TORCH_CHECK(false, "gsavatar kernels were built without CUDA")
#define GSA_LAUNCH_IMAGES_ON(tensor, launch, images) TORCH_CHECK(false, "gsavatar kernels were built without CUDA")
std::pair<at::Tensor, at::Tensor> sort_pairs_on_device(const at::Tensor&, const at::Tensor&, int64_t) {
  TORCH_CHECK(false, "gsavatar kernels were built without CUDA");
}
#endif

ProjectArgs project_args(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                         const std::optional<at::Tensor>& sh, int64_t sh_degree, const at::Tensor& image_ids,
                         const at::Tensor& viewmats, const at::Tensor& Ks, int64_t width, int64_t height,
                         double eps2d, double near_plane, double far_plane) {
  const auto device = means.device();
  const int64_t n = means.size(0);
  check_tensor(means, "means", at::kFloat, device, {n, 3});
  check_tensor(quats, "quats", at::kFloat, device, {n, 4});
  check_tensor(scales, "scales", at::kFloat, device, {n, 3});
  check_tensor(image_ids, "image_ids", at::kInt, device, {n});
  check_tensor(viewmats, "viewmats", at::kFloat, device, {-1, 4, 4});
  check_tensor(Ks, "Ks", at::kFloat, device, {viewmats.size(0), 3, 3});
  TORCH_CHECK(width > 0 && height > 0, "width and height must be positive");
  ProjectArgs a{};
  a.n = n;
  a.means = f32(means);
  a.quats = f32(quats);
  a.scales = f32(scales);
  if (sh.has_value()) {
    check_tensor(*sh, "sh", at::kFloat, device, {n, -1, 3});
    TORCH_CHECK(sh_degree >= 0 && sh_degree <= 3, "sh_degree must be 0..3 (got ", sh_degree, ")");
    TORCH_CHECK(sh->size(1) >= (sh_degree + 1) * (sh_degree + 1), "sh has ", sh->size(1),
                " coefficients, too few for degree ", sh_degree);
    a.sh = f32(*sh);
    a.sh_degree = static_cast<int>(sh_degree);
    a.sh_stride = static_cast<int>(sh->size(1));
  }
  a.image_ids = image_ids.data_ptr<int32_t>();
  a.viewmats = f32(viewmats);
  a.Ks = f32(Ks);
  a.images = static_cast<int>(viewmats.size(0));
  a.width = static_cast<int>(width);
  a.height = static_cast<int>(height);
  a.eps2d = static_cast<float>(eps2d);
  a.near_plane = static_cast<float>(near_plane);
  a.far_plane = static_cast<float>(far_plane);
  return a;
}

}  // namespace

std::vector<at::Tensor> project_forward(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                        const std::optional<at::Tensor>& sh, int64_t sh_degree,
                                        const at::Tensor& image_ids, const at::Tensor& viewmats, const at::Tensor& Ks,
                                        int64_t width, int64_t height, double eps2d, double near_plane,
                                        double far_plane) {
  ProjectArgs a = project_args(means, quats, scales, sh, sh_degree, image_ids, viewmats, Ks, width, height, eps2d,
                               near_plane, far_plane);
  const int64_t n = a.n;
  const auto opts = means.options();
  at::Tensor means2d = at::empty({n, 2}, opts), conics = at::empty({n, 3}, opts), cov2d = at::empty({n, 3}, opts);
  at::Tensor depths = at::empty({n}, opts), radii = at::empty({n}, opts.dtype(at::kInt));
  at::Tensor colors = sh.has_value() ? at::empty({n, 3}, opts) : at::empty({0}, opts);
  a.means2d = f32m(means2d);
  a.conics = f32m(conics);
  a.cov2d = f32m(cov2d);
  a.depths = f32m(depths);
  a.radii = radii.data_ptr<int32_t>();
  a.colors = sh.has_value() ? f32m(colors) : nullptr;
  if (runs_kernels(means)) {
    GSA_LAUNCH_ON(means, launch_project_forward);
  } else {
    host_for(n, [&](int64_t i) { project_forward_one(a, i); });
  }
  return {means2d, conics, cov2d, depths, radii, colors};
}

std::vector<at::Tensor> project_backward(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                         const std::optional<at::Tensor>& sh, int64_t sh_degree,
                                         const at::Tensor& image_ids, const at::Tensor& viewmats, const at::Tensor& Ks,
                                         int64_t width, int64_t height, double eps2d, double near_plane,
                                         double far_plane, const at::Tensor& radii, const at::Tensor& v_means2d,
                                         const at::Tensor& v_conics, const at::Tensor& v_depths,
                                         const std::optional<at::Tensor>& v_colors) {
  ProjectArgs a = project_args(means, quats, scales, sh, sh_degree, image_ids, viewmats, Ks, width, height, eps2d,
                               near_plane, far_plane);
  const int64_t n = a.n;
  const auto device = means.device();
  check_tensor(radii, "radii", at::kInt, device, {n});
  check_tensor(v_means2d, "v_means2d", at::kFloat, device, {n, 2});
  check_tensor(v_conics, "v_conics", at::kFloat, device, {n, 3});
  check_tensor(v_depths, "v_depths", at::kFloat, device, {n});
  TORCH_CHECK(sh.has_value() == v_colors.has_value(), "v_colors must be given exactly when sh is");
  if (v_colors.has_value()) check_tensor(*v_colors, "v_colors", at::kFloat, device, {n, 3});
  const auto opts = means.options();
  at::Tensor v_means = at::empty({n, 3}, opts), v_quats = at::empty({n, 4}, opts), v_scales = at::empty({n, 3}, opts);
  at::Tensor v_sh = sh.has_value() ? at::empty_like(*sh) : at::empty({0}, opts);
  a.radii_in = radii.data_ptr<int32_t>();
  a.v_means2d = f32(v_means2d);
  a.v_conics = f32(v_conics);
  a.v_depths = f32(v_depths);
  a.v_colors = v_colors.has_value() ? f32(*v_colors) : nullptr;
  a.v_means = f32m(v_means);
  a.v_quats = f32m(v_quats);
  a.v_scales = f32m(v_scales);
  a.v_sh = sh.has_value() ? f32m(v_sh) : nullptr;
  if (runs_kernels(means)) {
    GSA_LAUNCH_ON(means, launch_project_backward);
  } else {
    host_for(n, [&](int64_t i) { project_backward_one(a, i); });
  }
  return {v_means, v_quats, v_scales, v_sh};
}

std::vector<at::Tensor> isect_tiles(const at::Tensor& means2d, const at::Tensor& cov2d, const at::Tensor& opacities,
                                    const at::Tensor& depths, const at::Tensor& radii, const at::Tensor& image_ids,
                                    int64_t images, int64_t width, int64_t height, int64_t capacity) {
  const auto device = means2d.device();
  const int64_t n = means2d.size(0);
  check_tensor(means2d, "means2d", at::kFloat, device, {n, 2});
  check_tensor(cov2d, "cov2d", at::kFloat, device, {n, 3});
  check_tensor(opacities, "opacities", at::kFloat, device, {n});
  check_tensor(depths, "depths", at::kFloat, device, {n});
  check_tensor(radii, "radii", at::kInt, device, {n});
  check_tensor(image_ids, "image_ids", at::kInt, device, {n});
  TORCH_CHECK(images > 0 && width > 0 && height > 0, "images, width and height must be positive");
  IsectArgs a{};
  a.n = n;
  a.means2d = f32(means2d);
  a.cov2d = f32(cov2d);
  a.opacities = f32(opacities);
  a.depths = f32(depths);
  a.radii = radii.data_ptr<int32_t>();
  a.image_ids = image_ids.data_ptr<int32_t>();
  a.width = static_cast<int>(width);
  a.height = static_cast<int>(height);
  a.tiles_x = static_cast<int>((width + kTile - 1) / kTile);
  a.tiles_y = static_cast<int>((height + kTile - 1) / kTile);
  // Tile ids sit in the keys' high 32 bits, below the padding key's.
  TORCH_CHECK(images * a.tiles_x * a.tiles_y < std::numeric_limits<int32_t>::max(), "too many tiles to bin");
  const auto int_opts = means2d.options().dtype(at::kInt);
  at::Tensor counts = at::empty({n}, int_opts);
  a.counts = counts.data_ptr<int32_t>();
  if (runs_kernels(means2d)) {
    GSA_LAUNCH_ON(means2d, launch_isect_count);
  } else {
    host_for(n, [&](int64_t i) { isect_count_one(a, i); });
  }
  at::Tensor ends = at::cumsum(counts, 0, at::kLong);
  at::Tensor starts = ends - counts;
  at::Tensor pairs = n > 0 ? ends.slice(0, n - 1) : at::zeros({1}, ends.options());
  if (capacity < 0) capacity = pairs.item<int64_t>();  // the one host synchronisation
  a.capacity = capacity;
  // Unused slots keep the largest key, which sorts after every real (tile, depth) key.
  at::Tensor keys = at::full({capacity}, std::numeric_limits<int64_t>::max(), means2d.options().dtype(at::kLong));
  at::Tensor ids = at::empty({capacity}, int_opts);
  a.starts = starts.data_ptr<int64_t>();
  a.keys = keys.data_ptr<int64_t>();
  a.ids = ids.data_ptr<int32_t>();
  if (runs_kernels(means2d)) {
    GSA_LAUNCH_ON(means2d, launch_isect_write);
  } else {
    host_for(n, [&](int64_t i) { isect_write_one(a, i); });
  }
  // Pairs are written in Gaussian order, so a stable sort keeps depth ties in input order.
  at::Tensor sorted_keys, gauss_ids;
  if (runs_kernels(means2d)) {
    std::tie(sorted_keys, gauss_ids) = sort_pairs_on_device(keys, ids, images * a.tiles_x * a.tiles_y);
  } else {
    auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted_keys = std::get<0>(sorted);
    gauss_ids = ids.index_select(0, std::get<1>(sorted));
  }
  at::Tensor tiles_of_pairs = at::bitwise_right_shift(sorted_keys, 32);
  at::Tensor boundaries = at::arange(images * a.tiles_x * a.tiles_y + 1, keys.options());
  at::Tensor tile_offsets = at::searchsorted(tiles_of_pairs, boundaries);
  return {tile_offsets, gauss_ids, pairs};
}

namespace {

RasterArgs raster_args(const at::Tensor& means2d, const at::Tensor& conics, const at::Tensor& opacities,
                       const at::Tensor& features, const at::Tensor& tile_offsets, const at::Tensor& gauss_ids,
                       int64_t images, int64_t width, int64_t height) {
  const auto device = means2d.device();
  const int64_t n = means2d.size(0);
  check_tensor(means2d, "means2d", at::kFloat, device, {n, 2});
  check_tensor(conics, "conics", at::kFloat, device, {n, 3});
  check_tensor(opacities, "opacities", at::kFloat, device, {n});
  check_tensor(features, "features", at::kFloat, device, {n, -1});
  TORCH_CHECK(features.size(1) >= 1 && features.size(1) <= kMaxChannels, "features must have 1..", kMaxChannels,
              " channels (got ", features.size(1), ")");
  // One CUDA grid row (gridDim.y) per image.
  TORCH_CHECK(images >= 1 && images <= 65535, "images must be in [1, 65535] (got ", images, ")");
  RasterArgs a{};
  a.channels = static_cast<int>(features.size(1));
  a.width = static_cast<int>(width);
  a.height = static_cast<int>(height);
  a.tiles_x = static_cast<int>((width + kTile - 1) / kTile);
  a.tiles_y = static_cast<int>((height + kTile - 1) / kTile);
  check_tensor(tile_offsets, "tile_offsets", at::kLong, device, {images * a.tiles_x * a.tiles_y + 1});
  check_tensor(gauss_ids, "gauss_ids", at::kInt, device, {-1});
  a.tile_offsets = tile_offsets.data_ptr<int64_t>();
  a.gauss_ids = gauss_ids.data_ptr<int32_t>();
  a.means2d = f32(means2d);
  a.conics = f32(conics);
  a.opacities = f32(opacities);
  a.features = f32(features);
  return a;
}

// The host twins walk each tile's list Gaussian by Gaussian (in list order), visiting only the
// tile's pixels inside the Gaussian's 1/255 box: every pixel still takes the same steps in the same
// order as in the kernel's pixel-by-pixel walk, since a pixel outside the box has alpha <= 1/255
// there (a skipped step), but the pairs that cannot count are never evaluated (most of a 16 x 16
// tile's pairs). Per-tile pixel state lives in small arrays.

// Half-widths (x, y) of the box around each Gaussian's mean holding every pixel centre where
// o exp(-d^T conic d / 2) > 1/255, plus a pixel of margin for rounding (tile_range's box, from the
// conic instead of cov2d); infinite for a degenerate conic (then the whole tile is walked).
std::vector<float> pixel_box_half_widths(const RasterArgs& a, int64_t n) {
  std::vector<float> half(2 * n);
  host_for(n, [&](int64_t g) {
    const float A = a.conics[3 * g], B = a.conics[3 * g + 1], C = a.conics[3 * g + 2], o = a.opacities[g];
    const float det = A * C - B * B;
    float hx = std::numeric_limits<float>::infinity(), hy = hx;
    if (o > kAlphaMin && det > 0.0f && A > 0.0f && C > 0.0f) {
      const float k2 = 2.0f * logf(o / kAlphaMin);
      hx = sqrtf(k2 * C / det) + 1.0f;
      hy = sqrtf(k2 * A / det) + 1.0f;
    }
    half[2 * g] = hx;
    half[2 * g + 1] = hy;
  });
  return half;
}

// The local pixel range [lo, hi] (inclusive, within [0, size)) of a tile whose first pixel is
// `first` and whose pixel k has its centre at first + k + 0.5, within `half` of `centre`. An
// infinite half-width or a NaN gives the whole range (the comparisons below are false for NaN).
inline void pixel_range(float centre, float half, int first, int size, int& lo, int& hi) {
  const float l = ceilf(centre - half - 0.5f - static_cast<float>(first));
  const float h = floorf(centre + half - 0.5f - static_cast<float>(first));
  lo = l > 0.0f ? (l < static_cast<float>(size) ? static_cast<int>(l) : size) : 0;
  hi = h < static_cast<float>(size - 1) ? (h > -1.0f ? static_cast<int>(h) : -1) : size - 1;
}

// One tile of one image: its pixel block and its list [start, stop) in gauss_ids.
struct TileWork {
  int64_t image, start, stop;
  int col0, row0, cols, rows;  // cols x rows pixels inside the image
};

// Calls fn(tile) for every (image, tile) list, spread over torch's threads.
template <typename Fn>
void for_each_tile(const RasterArgs& a, int64_t images, Fn fn) {
  const int64_t tiles = static_cast<int64_t>(a.tiles_x) * a.tiles_y;
  at::parallel_for(0, images * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t list = begin; list < end; ++list) {
      TileWork t;
      t.image = list / tiles;
      const int64_t tile = list % tiles;
      t.start = a.tile_offsets[list];
      t.stop = a.tile_offsets[list + 1];
      t.col0 = static_cast<int>(tile % a.tiles_x) * kTile;
      t.row0 = static_cast<int>(tile / a.tiles_x) * kTile;
      t.cols = imin(kTile, a.width - t.col0);
      t.rows = imin(kTile, a.height - t.row0);
      fn(t);
    }
  });
}

// Host twin of raster_forward_kernel.
void raster_forward_host(const RasterArgs& a, int64_t images, const std::vector<float>& half) {
  for_each_tile(a, images, [&](const TileWork& t) {
    PixelForward st[kTile * kTile];
    for (int p = 0; p < kTile * kTile; ++p) forward_begin(st[p], true);
    int running = t.cols * t.rows;  // pixels not yet done
    for (int64_t k = t.start; k < t.stop && running > 0; ++k) {
      const int64_t g = a.gauss_ids[k];
      const float* mean = a.means2d + 2 * g;
      int c0, c1, r0, r1;
      pixel_range(mean[0], half[2 * g], t.col0, t.cols, c0, c1);
      pixel_range(mean[1], half[2 * g + 1], t.row0, t.rows, r0, r1);
      for (int r = r0; r <= r1; ++r)
        for (int c = c0; c <= c1; ++c) {
          PixelForward& px = st[r * kTile + c];
          if (px.done) continue;
          forward_step(px, t.col0 + c + 0.5f, t.row0 + r + 0.5f, mean, a.conics + 3 * g, a.opacities[g],
                       a.features + g * a.channels, a.channels, a.min_T, static_cast<int>(k - t.start));
          running -= px.done;
        }
    }
    for (int r = 0; r < t.rows; ++r)
      for (int c = 0; c < t.cols; ++c) {
        const PixelForward& px = st[r * kTile + c];
        const int64_t pixel = (t.image * a.height + t.row0 + r) * a.width + t.col0 + c;
        for (int ch = 0; ch < a.channels; ++ch) a.image[pixel * a.channels + ch] = px.acc[ch];
        a.T_final[pixel] = px.T;
        a.last[pixel] = px.last;
      }
  });
}

// Host twin of raster_backward_kernel. Each worker thread sums into its own gradient buffer
// (rows of 6 + C: u, v, A, B, C, o, features); the buffers are added up at the end. A Gaussian's
// terms arrive in the same order as in a pixel-by-pixel walk (row-major within its tile).
at::Tensor raster_backward_host(const RasterArgs& a, int64_t images, int64_t n, const std::vector<float>& half) {
  const int64_t row_size = 6 + a.channels;
  at::Tensor buffers = at::zeros({at::get_num_threads(), n, row_size}, at::TensorOptions().dtype(at::kFloat));
  float* base = buffers.data_ptr<float>();
  for_each_tile(a, images, [&](const TileWork& t) {
    float* grads = base + static_cast<int64_t>(at::get_thread_num()) * n * row_size;
    PixelBackward st[kTile * kTile];
    int max_last = 0;
    for (int r = 0; r < t.rows; ++r)
      for (int c = 0; c < t.cols; ++c) {
        const int64_t pixel = (t.image * a.height + t.row0 + r) * a.width + t.col0 + c;
        PixelBackward& px = st[r * kTile + c];
        backward_begin(px, true, a.image + pixel * a.channels, a.v_image + pixel * a.channels, a.T_final[pixel],
                       a.v_alpha[pixel], a.last[pixel], a.channels);
        max_last = imax(max_last, px.last);
      }
    const int64_t stop = std::min(t.stop, t.start + max_last);
    for (int64_t k = t.start; k < stop; ++k) {
      const int64_t g = a.gauss_ids[k];
      const float* mean = a.means2d + 2 * g;
      int c0, c1, r0, r1;
      pixel_range(mean[0], half[2 * g], t.col0, t.cols, c0, c1);
      pixel_range(mean[1], half[2 * g + 1], t.row0, t.rows, r0, r1);
      float* out = grads + g * row_size;
      for (int r = r0; r <= r1; ++r)
        for (int c = c0; c <= c1; ++c) {
          PairGrad pg;
          float v_feature[kMaxChannels];
          if (!backward_step(st[r * kTile + c], t.col0 + c + 0.5f, t.row0 + r + 0.5f, mean, a.conics + 3 * g,
                             a.opacities[g], a.features + g * a.channels, a.channels, static_cast<int>(k - t.start), pg,
                             v_feature))
            continue;
          out[0] += pg.u;
          out[1] += pg.v;
          out[2] += pg.A;
          out[3] += pg.B;
          out[4] += pg.C;
          out[5] += pg.o;
          for (int ch = 0; ch < a.channels; ++ch) out[6 + ch] += v_feature[ch];
        }
    }
  });
  return buffers.sum(0);
}

}  // namespace

std::vector<at::Tensor> rasterize_forward(const at::Tensor& means2d, const at::Tensor& conics,
                                          const at::Tensor& opacities, const at::Tensor& features,
                                          const at::Tensor& tile_offsets, const at::Tensor& gauss_ids, int64_t images,
                                          int64_t width, int64_t height, double min_T) {
  RasterArgs a = raster_args(means2d, conics, opacities, features, tile_offsets, gauss_ids, images, width, height);
  TORCH_CHECK(min_T >= 0.0 && min_T < 1.0, "min_T must be in [0, 1) (got ", min_T, ")");
  a.min_T = static_cast<float>(min_T);
  const auto opts = means2d.options();
  at::Tensor image = at::empty({images, height, width, a.channels}, opts);
  at::Tensor T_final = at::empty({images, height, width}, opts);
  at::Tensor last = at::empty({images, height, width}, opts.dtype(at::kInt));
  a.image = f32m(image);
  a.T_final = f32m(T_final);
  a.last = last.data_ptr<int32_t>();
  if (runs_kernels(means2d)) {
    GSA_LAUNCH_IMAGES_ON(means2d, launch_raster_forward, images);
  } else {
    raster_forward_host(a, images, pixel_box_half_widths(a, means2d.size(0)));
  }
  return {image, T_final, last};
}

std::vector<at::Tensor> rasterize_backward(const at::Tensor& means2d, const at::Tensor& conics,
                                           const at::Tensor& opacities, const at::Tensor& features,
                                           const at::Tensor& tile_offsets, const at::Tensor& gauss_ids,
                                           const at::Tensor& image, const at::Tensor& T_final,
                                           const at::Tensor& last, const at::Tensor& v_image,
                                           const at::Tensor& v_alpha, int64_t width, int64_t height) {
  const int64_t images = image.size(0);
  RasterArgs a = raster_args(means2d, conics, opacities, features, tile_offsets, gauss_ids, images, width, height);
  const auto device = means2d.device();
  check_tensor(image, "image", at::kFloat, device, {images, height, width, a.channels});
  check_tensor(T_final, "T_final", at::kFloat, device, {images, height, width});
  check_tensor(last, "last", at::kInt, device, {images, height, width});
  check_tensor(v_image, "v_image", at::kFloat, device, {images, height, width, a.channels});
  check_tensor(v_alpha, "v_alpha", at::kFloat, device, {images, height, width});
  a.image = const_cast<float*>(f32(image));
  a.T_final = const_cast<float*>(f32(T_final));
  a.last = const_cast<int32_t*>(last.data_ptr<int32_t>());
  a.v_image = f32(v_image);
  a.v_alpha = f32(v_alpha);
  const int64_t n = means2d.size(0);
  if (runs_kernels(means2d)) {
    const auto opts = means2d.options();
    at::Tensor v_means2d = at::zeros({n, 2}, opts), v_conics = at::zeros({n, 3}, opts);
    at::Tensor v_opacities = at::zeros({n}, opts), v_features = at::zeros({n, a.channels}, opts);
    a.v_means2d = f32m(v_means2d);
    a.v_conics = f32m(v_conics);
    a.v_opacities = f32m(v_opacities);
    a.v_features = f32m(v_features);
    GSA_ALERT_ATOMICS("gsavatar rasterize_backward (float atomicAdd on CUDA)");
    GSA_LAUNCH_IMAGES_ON(means2d, launch_raster_backward, images);
    return {v_means2d, v_conics, v_opacities, v_features};
  }
  at::Tensor grads = raster_backward_host(a, images, n, pixel_box_half_widths(a, n));
  return {grads.slice(1, 0, 2).contiguous(), grads.slice(1, 2, 5).contiguous(), grads.select(1, 5).contiguous(),
          grads.slice(1, 6, 6 + a.channels).contiguous()};
}

}  // namespace gsa
