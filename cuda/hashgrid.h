// Hash-grid encoder ops (multiresolution hash grid, Instant-NGP): tensor-level entry points.
// Implemented in hashgrid_ops.cpp (checks, host twin, dispatch to the CUDA launchers of
// hashgrid_launch.h). The contract is the PyTorch reference's, gsavatar.model.encoding.HashGrid;
// the Python side is gsavatar.model.encoding._CompiledHashGrid.
#pragma once
// ATen only (not torch/extension.h): half the parse time; only bindings.cpp needs pybind11.
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "hashgrid_math.h"

namespace gsa {

// x [P, dim] float32 (dim 2 or 3), table [L, T, F] float32 on the same device (T a power of two,
// L <= 64, F <= 8), resolutions: the L values N_l -> features [P, L*F], level-major. A level is
// dense when (N_l + 1)^dim <= T.
at::Tensor hashgrid_forward(const at::Tensor& x, const at::Tensor& table, const std::vector<int64_t>& resolutions);

// grad_out [P, L*F] -> (grad_table [L, T, F], grad_x [P, dim], or undefined (None) unless
// need_x_grad). The x gradient is zero where x is outside [0, 1] (the clamp's).
std::tuple<at::Tensor, at::Tensor> hashgrid_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                     const at::Tensor& table,
                                                     const std::vector<int64_t>& resolutions, bool need_x_grad);

}  // namespace gsa
