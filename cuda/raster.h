// Rasterizer ops: the tensor-level entry points bound in bindings.cpp, implemented in
// raster_ops.cpp (input checks, allocation, CUDA launch or the CPU path). The Python side is
// gsavatar/render/_compiled.py; the reference it mirrors is gsavatar/render/_torch_impl.py.
#pragma once

// ATen only (not torch/extension.h): half the parse time; only bindings.cpp needs pybind11.
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace gsa {

// Projection of G Gaussians, each seen by camera image_ids[i] (viewmats [B,4,4], Ks [B,3,3]).
// Returns {means2d [G,2], conics [G,3], cov2d [G,3], depths [G], radii [G] int32, colors [G,3]
// (SH evaluated; empty when sh is None)}.
std::vector<at::Tensor> project_forward(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                        const std::optional<at::Tensor>& sh, int64_t sh_degree,
                                        const at::Tensor& image_ids, const at::Tensor& viewmats, const at::Tensor& Ks,
                                        int64_t width, int64_t height, double eps2d, double near_plane,
                                        double far_plane);

// Gradients {v_means, v_quats, v_scales, v_sh (empty when sh is None)}; viewmats and Ks are constants.
std::vector<at::Tensor> project_backward(const at::Tensor& means, const at::Tensor& quats, const at::Tensor& scales,
                                         const std::optional<at::Tensor>& sh, int64_t sh_degree,
                                         const at::Tensor& image_ids, const at::Tensor& viewmats, const at::Tensor& Ks,
                                         int64_t width, int64_t height, double eps2d, double near_plane,
                                         double far_plane, const at::Tensor& radii, const at::Tensor& v_means2d,
                                         const at::Tensor& v_conics, const at::Tensor& v_depths,
                                         const std::optional<at::Tensor>& v_colors);

// Tile binning: {tile_offsets [images * tiles + 1] int64, gauss_ids [capacity] int32, pairs [1] int64},
// each tile's list sorted by depth (ties in input order); `pairs` is the number of (tile, Gaussian)
// pairs the frame needs, on the device. capacity < 0: buffers of exactly that size, which costs one
// host synchronisation (reading the number). capacity >= 0: buffers of that size and no
// synchronisation; pairs past it are dropped (the caller compares `pairs` with it later).
std::vector<at::Tensor> isect_tiles(const at::Tensor& means2d, const at::Tensor& cov2d, const at::Tensor& opacities,
                                    const at::Tensor& depths, const at::Tensor& radii, const at::Tensor& image_ids,
                                    int64_t images, int64_t width, int64_t height, int64_t capacity);

// Front-to-back compositing: {image [B,H,W,C] = sum_i w_i f_i, T_final [B,H,W], last [B,H,W] int32}.
// min_T > 0 stops a pixel before the Gaussian that would take its transmittance below min_T.
std::vector<at::Tensor> rasterize_forward(const at::Tensor& means2d, const at::Tensor& conics,
                                          const at::Tensor& opacities, const at::Tensor& features,
                                          const at::Tensor& tile_offsets, const at::Tensor& gauss_ids, int64_t images,
                                          int64_t width, int64_t height, double min_T);

// {v_means2d, v_conics, v_opacities, v_features} given dL/d image and dL/d alpha (alpha = 1 - T_final).
std::vector<at::Tensor> rasterize_backward(const at::Tensor& means2d, const at::Tensor& conics,
                                           const at::Tensor& opacities, const at::Tensor& features,
                                           const at::Tensor& tile_offsets, const at::Tensor& gauss_ids,
                                           const at::Tensor& image, const at::Tensor& T_final,
                                           const at::Tensor& last, const at::Tensor& v_image,
                                           const at::Tensor& v_alpha, int64_t width, int64_t height);

}  // namespace gsa
