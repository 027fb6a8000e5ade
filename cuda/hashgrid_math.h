// Multiresolution hash-grid encoding: the per-point, per-level math, written once for the CUDA
// kernels (hashgrid_kernels.cu) and their host twins (hashgrid_ops.cpp). No torch headers: nvcc
// compiles this into the .cu file.
//
// The contract is the module docstring of gsavatar/model/encoding.py (the PyTorch reference):
// level l has resolution N = res[l]; a point x (clamped to [0, 1]) sits at pos = x * N in float32,
// its cell is floor(pos) clamped to N - 1 and f = pos - cell. Corner k takes the upper vertex along
// axis d when bit (DIM - 1 - d) of k is set (axis 0 slowest). A dense level's vertex c uses entry
// c_0 + c_1 (N+1) [+ c_2 (N+1)^2]; a hashed level's uses (c_0 * 1 ^ c_1 * 2654435761 [^ c_2 *
// 805459861]) & (T - 1). uint32 arithmetic: the reference computes in int64 and keeps the low
// log2(T) bits, which wrap-around products leave unchanged. The corner weight is the product over
// axes of (1 - f_d) or f_d, multiplied in axis order as the reference does: cells and weights come
// out bit for bit the same, the outputs up to the order of the sum over corners.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "gsa_common.h"

namespace gsa {
namespace hashgrid {

// Levels are described in a by-value kernel parameter (no device buffer to keep in sync), so
// their number is bounded; the dense flags are one bit per level.
constexpr int kMaxLevels = 64;
// Features per level: the kernels are instantiated for F = 1 .. kMaxFeatures.
constexpr int kMaxFeatures = 8;
// Largest resolution: float32 represents every vertex coordinate up to 2^24 exactly.
constexpr int64_t kMaxResolution = int64_t(1) << 24;

struct Params {
  int64_t points;         // P
  int dim;                // 2 or 3
  int features;           // F
  int levels;             // L
  uint32_t table_size;    // T entries per level, a power of two
  uint64_t dense_mask;    // bit l set: level l is dense
  int res[kMaxLevels];    // N_l
};

GSA_HD uint32_t hash_prime(int d) { return d == 0 ? 1u : (d == 1 ? 2654435761u : 805459861u); }

// As torch.clamp(x, 0, 1): NaN stays NaN (fminf / fmaxf would return a bound instead).
GSA_HD float clamp01(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

// One point's cell on one level: the corners' table entries and the interpolation weights.
template <int DIM>
struct Cell {
  static constexpr int kCorners = 1 << DIM;
  uint32_t entry[kCorners];  // row of corner k in the level's [T, F] table
  float weight[kCorners];    // corner k's weight
  float w[DIM][2];           // per axis: (1 - f, f), the lower / upper vertex's factor
};

template <int DIM>
GSA_HD bool upper(int corner, int d) { return (corner >> (DIM - 1 - d)) & 1; }

template <int DIM>
GSA_HD Cell<DIM> locate(const float* x, int n, bool dense, uint32_t table_size) {
  Cell<DIM> cell;
  uint32_t lower[DIM], step[DIM];
  uint32_t stride = 1;
  for (int d = 0; d < DIM; ++d) {
    const float pos = clamp01(x[d]) * float(n);
    // A NaN input uses cell 0 (a valid entry); its NaN weights carry it into the output.
    const float c = pos == pos ? fminf(floorf(pos), float(n - 1)) : 0.f;
    const float f = pos - c;
    cell.w[d][0] = 1.f - f;
    cell.w[d][1] = f;
    step[d] = dense ? stride : hash_prime(d);
    lower[d] = uint32_t(c) * step[d];
    stride *= uint32_t(n + 1);
  }
  const uint32_t mask = table_size - 1;
  for (int k = 0; k < Cell<DIM>::kCorners; ++k) {
    uint32_t entry = 0;
    float weight = 1.f;
    for (int d = 0; d < DIM; ++d) {
      const bool up = upper<DIM>(k, d);
      const uint32_t piece = lower[d] + (up ? step[d] : 0u);
      entry = dense ? entry + piece : entry ^ piece;
      weight *= cell.w[d][up];
    }
    // A no-op on dense levels ((N+1)^DIM <= T); keeps any index inside the level's table.
    cell.entry[k] = entry & mask;
    cell.weight[k] = weight;
  }
  return cell;
}

GSA_HD bool level_dense(const Params& p, int level) { return (p.dense_mask >> level) & 1u; }

template <int DIM>
GSA_HD Cell<DIM> locate_level(const Params& p, const float* x, int level) {
  return locate<DIM>(x, p.res[level], level_dense(p, level), p.table_size);
}

// Level `level` of the table [L, T, F] as a [T, F] array.
template <int F>
GSA_HD const float* level_rows(const Params& p, const float* table, int level) {
  return table + int64_t(level) * p.table_size * F;
}

// Forward of point x [DIM] on one level: its F features, written to out [F].
template <int DIM, int F>
GSA_HD void forward_level(const Params& p, const float* x, const float* table, int level, float* out) {
  const Cell<DIM> cell = locate_level<DIM>(p, x, level);
  const float* rows = level_rows<F>(p, table, level);
  float acc[F];
  for (int f = 0; f < F; ++f) acc[f] = 0.f;
  for (int k = 0; k < Cell<DIM>::kCorners; ++k) {
    const float* v = rows + int64_t(cell.entry[k]) * F;
    for (int f = 0; f < F; ++f) acc[f] += v[f] * cell.weight[k];
  }
  for (int f = 0; f < F; ++f) out[f] = acc[f];
}

// Backward to the table of point x on one level: add(&grad_table[entry], weight * g) for every
// corner and feature; g [F] is the output gradient of this point and level. `add` is an atomic
// add on the device and a plain one on the host.
template <int DIM, int F, class Add>
GSA_HD void table_grad_level(const Params& p, const float* x, const float* g, int level, float* grad_table,
                             const Add& add) {
  const Cell<DIM> cell = locate_level<DIM>(p, x, level);
  float* rows = grad_table + int64_t(level) * p.table_size * F;
  for (int k = 0; k < Cell<DIM>::kCorners; ++k) {
    float* dst = rows + int64_t(cell.entry[k]) * F;
    for (int f = 0; f < F; ++f) add(dst + f, g[f] * cell.weight[k]);
  }
}

// Backward to x of one point, summed over the levels: grad_out_row [L*F] -> grad_x [DIM].
// d weight_k / d f_d is +-(product of the other axes' factors); d pos / d x = N. Zero where x is
// outside [0, 1] (the clamp's gradient, which passes on the closed interval as torch's does).
template <int DIM, int F>
GSA_HD void x_grad_point(const Params& p, const float* x, const float* table, const float* grad_out_row,
                         float* grad_x) {
  float acc[DIM];
  for (int d = 0; d < DIM; ++d) acc[d] = 0.f;
  for (int level = 0; level < p.levels; ++level) {
    const Cell<DIM> cell = locate_level<DIM>(p, x, level);
    const float* rows = level_rows<F>(p, table, level);
    const float* g = grad_out_row + level * F;
    float dfrac[DIM];
    for (int d = 0; d < DIM; ++d) dfrac[d] = 0.f;
    for (int k = 0; k < Cell<DIM>::kCorners; ++k) {
      const float* v = rows + int64_t(cell.entry[k]) * F;
      float dweight = 0.f;
      for (int f = 0; f < F; ++f) dweight += g[f] * v[f];
      for (int d = 0; d < DIM; ++d) {
        float partial = upper<DIM>(k, d) ? dweight : -dweight;
        for (int e = 0; e < DIM; ++e)
          if (e != d) partial *= cell.w[e][upper<DIM>(k, e)];
        dfrac[d] += partial;
      }
    }
    for (int d = 0; d < DIM; ++d) acc[d] += dfrac[d] * float(p.res[level]);
  }
  for (int d = 0; d < DIM; ++d) grad_x[d] = (x[d] >= 0.f && x[d] <= 1.f) ? acc[d] : 0.f;
}

// Calls fn(std::integral_constant<int, DIM>{}, std::integral_constant<int, F>{}) for the runtime
// p.dim (2 or 3) and p.features (1 .. kMaxFeatures, checked by the caller). Host code only.
template <int DIM, class Fn>
inline void dispatch_features(int features, Fn&& fn) {
  using D = std::integral_constant<int, DIM>;
  switch (features) {
    case 1: fn(D{}, std::integral_constant<int, 1>{}); break;
    case 2: fn(D{}, std::integral_constant<int, 2>{}); break;
    case 3: fn(D{}, std::integral_constant<int, 3>{}); break;
    case 4: fn(D{}, std::integral_constant<int, 4>{}); break;
    case 5: fn(D{}, std::integral_constant<int, 5>{}); break;
    case 6: fn(D{}, std::integral_constant<int, 6>{}); break;
    case 7: fn(D{}, std::integral_constant<int, 7>{}); break;
    case 8: fn(D{}, std::integral_constant<int, 8>{}); break;
  }
}
static_assert(kMaxFeatures == 8, "dispatch_features lists F = 1 .. 8");

template <class Fn>
inline void dispatch(const Params& p, Fn&& fn) {
  if (p.dim == 2)
    dispatch_features<2>(p.features, fn);
  else
    dispatch_features<3>(p.features, fn);
}

}  // namespace hashgrid
}  // namespace gsa
