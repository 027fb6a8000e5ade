// Tensor-level rasterizer ops: checks, allocation, and dispatch (kernel_dispatch.h) to the kernels'
// launchers (raster_kernels.cu) or, for CPU tensors, to the CPU rasterizer (raster_host.cpp);
// projection runs raster_math.h's per-Gaussian functions on either.
#include "raster.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>

#include "kernel_dispatch.h"
#include "raster_host.h"
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

// Run fn(i) for i in [0, n) on the host, spread over the CPU ops' threads (raster_host.h).
template <typename Fn>
void host_for(int64_t n, Fn fn) {
  host_parallel_for(n, [&](int64_t begin, int64_t end) {
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
  if (!runs_kernels(means2d)) {
    a.capacity = capacity;
    return host_isect_tiles(a, images, means2d.options());
  }
  const auto int_opts = means2d.options().dtype(at::kInt);
  at::Tensor counts = at::empty({n}, int_opts);
  a.counts = counts.data_ptr<int32_t>();
  GSA_LAUNCH_ON(means2d, launch_isect_count);
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
  GSA_LAUNCH_ON(means2d, launch_isect_write);
  // Pairs are written in Gaussian order, so a stable sort keeps depth ties in input order.
  at::Tensor sorted_keys, gauss_ids;
  std::tie(sorted_keys, gauss_ids) = sort_pairs_on_device(keys, ids, images * a.tiles_x * a.tiles_y);
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
    host_raster_forward(a, images, means2d.size(0));
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
  at::Tensor grads = host_raster_backward(a, images, n);
  return {grads.slice(1, 0, 2).contiguous(), grads.slice(1, 2, 5).contiguous(), grads.select(1, 5).contiguous(),
          grads.slice(1, 6, 6 + a.channels).contiguous()};
}

}  // namespace gsa
