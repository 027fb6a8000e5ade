// The CPU rasterizer (see raster_host.h for why it exists and what it shares with the kernels).
//
// Layout of the work: a tile is 16 x 16 pixels; a tile row of 16 pixels is kRowVecs SIMD vectors
// of kLanes floats (GCC/Clang vector extensions, so the same code compiles to AVX-512, AVX2 or
// SSE; gsavatar/kernels.py builds it for the CPU it runs on). Each Gaussian of a tile's list visits
// only the rows and vectors of its 1/255 box; lanes outside the ellipse get alpha <= 1/255 and are
// skipped by the same test as in the reference, so the box changes no result.
#include "raster_host.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

namespace gsa {
namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
constexpr int kRowVecs = kTile / kLanes;
static_assert(kTile % kLanes == 0, "a tile row must be a whole number of vectors");

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

inline vf splat(float x) { return vf{} + x; }
inline vi splat_i(int32_t x) { return vi{} + x; }
inline bool any(vi mask) {  // some lane set
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)mask, (__m512i)mask) != 0;
#elif defined(__AVX__)
  return !_mm256_testz_si256((__m256i)mask, (__m256i)mask);
#elif defined(__SSE__)
  return _mm_movemask_ps((__m128)mask) != 0;
#else
  int32_t bits = 0;
  for (int l = 0; l < kLanes; ++l) bits |= mask[l];
  return bits != 0;
#endif
}
// a * b + c, fused (one rounding) where the CPU has FMA: used where the order of rounding is ours
// to choose (the exponent's row quadratic, the exp polynomial, the colour sums).
inline vf madd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline float hsum(vf x) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += x[l];
  return s;
}

// exp(x) for x <= 0 (arguments above 88 are clamped; below kFastExpMin give exp(kFastExpMin)):
// x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact), exp(r) by the degree-7
// minimax polynomial of the Cephes library's expf, 2^n put into the exponent bits. At most
// kFastExpMaxRelError from exp (tested); NaN stays NaN.
inline vf exp_fast(vf x) {
  x = x < kFastExpMin ? splat(kFastExpMin) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * 1.44269504088896341f + shifter;
  const vf n = t - shifter;
  const vi n_int = (vi)t - (vi)shifter;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = madd(p, r, splat(1.3981999507e-3f));
  p = madd(p, r, splat(8.3334519073e-3f));
  p = madd(p, r, splat(4.1665795894e-2f));
  p = madd(p, r, splat(1.6666665459e-1f));
  p = madd(p, r, splat(5.0000001201e-1f));
  p = madd(p, r * r, r) + 1.0f;
  return p * (vf)((n_int + 127) << 23);
}

// One Gaussian as a tile's list walk reads it.
struct Splat {
  float u, v, A, B, C, o;
};

inline Splat splat_of(const RasterArgs& a, int64_t g) {
  return {a.means2d[2 * g], a.means2d[2 * g + 1], a.conics[3 * g], a.conics[3 * g + 1], a.conics[3 * g + 2],
          a.opacities[g]};
}

// The exponent of pixel_alpha (raster_math.h) along one tile row, dy below the mean, as a quadratic
// in dx with the row's coefficients: two multiply-adds a vector where the kernels' expression takes
// six operations. It rounds differently from theirs (within the parity tests' float32 tolerances);
// both passes use it, so they see the same alphas.
struct RowPower {
  vf a, b, c;  // power = (a dx + b) dx + c
};

inline RowPower row_power(float dy, const Splat& s) {
  return {splat(-0.5f * s.A), splat(-s.B * dy), splat(-0.5f * s.C * dy * dy)};
}

// No lane can have alpha > 1/255 (exp(kSkipPower) < 1/255 and o <= 1): the exp is not needed.
inline bool all_skipped(vf power, const Splat& s) { return s.o <= 1.0f && !any(power >= kSkipPower); }

// pixel_alpha for those pixels from their exponent: the same cap and skip; `capped` marks the
// lanes at the cap.
inline vf pixel_alpha_lanes(vf power, const Splat& s, vi& capped) {
  const vf raw = s.o * exp_fast(power);
  capped = raw >= kAlphaMax;
  const vf alpha = capped ? splat(kAlphaMax) : raw;
  return alpha > kAlphaMin ? alpha : splat(0.0f);
}

inline vf lane_centres() {  // x of each lane's pixel centre relative to its vector's first pixel
  vf c;
  for (int l = 0; l < kLanes; ++l) c[l] = static_cast<float>(l) + 0.5f;
  return c;
}

// Half-widths (x, y) of the box around each Gaussian's mean holding every pixel centre where
// o exp(-d^T conic d / 2) > 1/255, plus a pixel of margin for rounding; infinite for a degenerate
// conic (then the whole tile is walked).
std::vector<float> pixel_box_half_widths(const RasterArgs& a, int64_t n) {
  std::vector<float> half(2 * n);
  host_parallel_for(n, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
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
    }
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

TileWork tile_work(const RasterArgs& a, int64_t list) {
  const int64_t tiles = static_cast<int64_t>(a.tiles_x) * a.tiles_y;
  TileWork t;
  t.image = list / tiles;
  const int64_t tile = list % tiles;
  t.start = a.tile_offsets[list];
  t.stop = a.tile_offsets[list + 1];
  t.col0 = static_cast<int>(tile % a.tiles_x) * kTile;
  t.row0 = static_cast<int>(tile / a.tiles_x) * kTile;
  t.cols = imin(kTile, a.width - t.col0);
  t.rows = imin(kTile, a.height - t.row0);
  return t;
}

// The rows and vectors of tile `t` that Gaussian g's box covers; false when none.
struct Box {
  int r0, r1, j0, j1;
};

inline bool box_of(const TileWork& t, const Splat& s, const float* half, int64_t g, Box& b) {
  int c0, c1;
  pixel_range(s.u, half[2 * g], t.col0, t.cols, c0, c1);
  pixel_range(s.v, half[2 * g + 1], t.row0, t.rows, b.r0, b.r1);
  if (c0 > c1 || b.r0 > b.r1) return false;
  b.j0 = c0 / kLanes;
  b.j1 = c1 / kLanes;
  return true;
}

// The exponent at the kLanes pixels of vector j of a row, and their dx; false when no lane can
// exceed 1/255 (the exp is skipped).
inline bool lanes_power(const TileWork& t, int j, const RowPower& p, const Splat& s, vf centres, vf& dx, vf& power) {
  dx = (splat(static_cast<float>(t.col0 + j * kLanes)) + centres) - s.u;
  power = madd(madd(p.a, dx, p.b), dx, p.c);
  return !all_skipped(power, s);
}

// Entry k of a tile's list as both passes walk it: the Gaussian, its box in the tile, its features.
template <int kC>
struct ListEntry {
  int64_t g;
  Splat s;
  Box b;
  float f[kC];
};

template <int kC>
inline bool list_entry(const RasterArgs& a, const TileWork& t, const float* half, int64_t k, ListEntry<kC>& e) {
  e.g = a.gauss_ids[k];
  e.s = splat_of(a, e.g);
  if (!box_of(t, e.s, half, e.g, e.b)) return false;
  for (int c = 0; c < kC; ++c) e.f[c] = a.features[e.g * kC + c];
  return true;
}

// Lanes inside the image (a tile on the right or bottom border is cut off).
inline vi inside_lanes(const TileWork& t, int r, int j) {
  vi m;
  for (int l = 0; l < kLanes; ++l) m[l] = (r < t.rows && j * kLanes + l < t.cols) ? -1 : 0;
  return m;
}

// Splits the lists [0, lists) into `parts` contiguous runs of about equal cost (a list's cost: its
// length plus a fixed overhead). Deterministic for a given number of parts, so the backward pass's
// per-part sums (and so its gradients) are too.
std::vector<int64_t> balanced_runs(const RasterArgs& a, int64_t lists, int parts) {
  std::vector<double> cost(lists + 1, 0.0);
  for (int64_t l = 0; l < lists; ++l) cost[l + 1] = cost[l] + static_cast<double>(a.tile_offsets[l + 1] - a.tile_offsets[l]) + 8.0;
  std::vector<int64_t> bounds(parts + 1, lists);
  bounds[0] = 0;
  int64_t l = 0;
  for (int p = 1; p < parts; ++p) {
    const double target = cost[lists] * p / parts;
    while (l < lists && cost[l + 1] <= target) ++l;
    bounds[p] = l;
  }
  return bounds;
}

// ---- forward -------------------------------------------------------------------------------------

template <int kC>
struct ForwardTile {
  vf T[kTile][kRowVecs];
  vf acc[kC][kTile][kRowVecs];
  vi last[kTile][kRowVecs];
  vi live[kTile][kRowVecs];  // inside the image and not stopped (all ones) or not (zero)
};

template <int kC>
void forward_tile(const RasterArgs& a, const TileWork& t, const float* half, ForwardTile<kC>& st) {
  const vf centres = lane_centres();
  for (int r = 0; r < kTile; ++r)
    for (int j = 0; j < kRowVecs; ++j) {
      st.T[r][j] = splat(1.0f);
      for (int c = 0; c < kC; ++c) st.acc[c][r][j] = splat(0.0f);
      st.last[r][j] = splat_i(0);
      st.live[r][j] = inside_lanes(t, r, j);
    }
  const bool can_stop = a.min_T > 0.0f;
  for (int64_t k = t.start; k < t.stop; ++k) {
    ListEntry<kC> e;
    if (!list_entry(a, t, half, k, e)) continue;
    const Splat& s = e.s;
    const Box& b = e.b;
    const float* f = e.f;
    const vi position = splat_i(static_cast<int32_t>(k - t.start + 1));
    for (int r = b.r0; r <= b.r1; ++r) {
      const RowPower p = row_power(static_cast<float>(t.row0 + r) + 0.5f - s.v, s);
      for (int j = b.j0; j <= b.j1; ++j) {
        const vi live = st.live[r][j];
        if (!any(live)) continue;  // these pixels have stopped (or lie outside the image)
        vf dx, power;
        if (!lanes_power(t, j, p, s, centres, dx, power)) continue;
        // pixel_alpha_lanes' values, without the cap mask only the backward pass needs.
        const vf raw = s.o * exp_fast(power);
        const vi hit = live & (raw > kAlphaMin);
        const vf alpha = hit ? (raw < kAlphaMax ? raw : splat(kAlphaMax)) : splat(0.0f);
        const vf w = alpha * st.T[r][j];
        for (int c = 0; c < kC; ++c) st.acc[c][r][j] = madd(w, splat(f[c]), st.acc[c][r][j]);
        st.T[r][j] *= 1.0f - alpha;
        st.last[r][j] = hit ? position : st.last[r][j];
        if (can_stop) st.live[r][j] = live & ~(st.T[r][j] < a.min_T);
      }
    }
    if (can_stop && ((k - t.start) & 31) == 31) {  // the whole tile stopped: the rest weighs < min_T
      vi any_live = splat_i(0);
      for (int r = 0; r < kTile; ++r)
        for (int j = 0; j < kRowVecs; ++j) any_live |= st.live[r][j];
      if (!any(any_live)) break;
    }
  }
  for (int r = 0; r < t.rows; ++r) {  // a tile row's vectors are its pixels in order
    const int64_t first = (t.image * a.height + t.row0 + r) * a.width + t.col0;
    std::memcpy(a.T_final + first, &st.T[r][0], sizeof(float) * t.cols);
    std::memcpy(a.last + first, &st.last[r][0], sizeof(int32_t) * t.cols);
    float* out = a.image + first * kC;
    for (int c = 0; c < kC; ++c) {
      const float* acc = reinterpret_cast<const float*>(&st.acc[c][r][0]);
      for (int col = 0; col < t.cols; ++col) out[col * kC + c] = acc[col];
    }
  }
}

// A tile no Gaussian reaches: nothing composited (colour 0, transmittance 1).
void empty_tile(const RasterArgs& a, const TileWork& t) {
  for (int r = 0; r < t.rows; ++r) {
    const int64_t first = (t.image * a.height + t.row0 + r) * a.width + t.col0;
    std::fill(a.T_final + first, a.T_final + first + t.cols, 1.0f);
    std::fill(a.last + first, a.last + first + t.cols, 0);
    std::fill(a.image + first * a.channels, a.image + (first + t.cols) * a.channels, 0.0f);
  }
}

template <int kC>
void forward_all(const RasterArgs& a, int64_t images, int64_t n) {
  const int64_t n_lists = images * a.tiles_x * a.tiles_y;
  const std::vector<float> half = pixel_box_half_widths(a, n);
  // Tiles handed out one at a time (their costs differ a lot); each writes only its own pixels,
  // so the order does not change the image.
  std::atomic<int64_t> next{0};
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(host_threads(), n_lists)));
#pragma omp parallel num_threads(workers)
  {
    ForwardTile<kC> st;
    for (int64_t list = next++; list < n_lists; list = next++) {
      const TileWork t = tile_work(a, list);
      if (t.start == t.stop)
        empty_tile(a, t);
      else
        forward_tile<kC>(a, t, half.data(), st);
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------

template <int kC>
struct BackwardTile {
  vf T[kTile][kRowVecs];
  vf prefix[kTile][kRowVecs];  // sum of w_j v_j over the Gaussians walked so far
  vf total[kTile][kRowVecs];   // the whole sum, from the forward outputs
  vf g[kC][kTile][kRowVecs];   // dL/d image
  vf g_alpha[kTile][kRowVecs];
  vi last[kTile][kRowVecs];
};

// backward_begin and backward_step (raster_math.h) for the pixels of a tile, kLanes at a time;
// each Gaussian's terms are summed over its box in the lanes, then added to its row of `grads`.
template <int kC>
void backward_tile(const RasterArgs& a, const TileWork& t, const float* half, BackwardTile<kC>& st, float* grads) {
  constexpr int kRow = 6 + kC;
  int max_last = 0;
  for (int r = 0; r < kTile; ++r)
    for (int j = 0; j < kRowVecs; ++j) {
      st.T[r][j] = splat(1.0f);
      st.prefix[r][j] = splat(0.0f);
      st.total[r][j] = splat(0.0f);
      st.g_alpha[r][j] = splat(0.0f);
      st.last[r][j] = splat_i(0);
      for (int c = 0; c < kC; ++c) st.g[c][r][j] = splat(0.0f);
    }
  for (int r = 0; r < t.rows; ++r)
    for (int col = 0; col < t.cols; ++col) {
      const int j = col / kLanes, l = col % kLanes;
      const int64_t pixel = (t.image * a.height + t.row0 + r) * a.width + t.col0 + col;
      float total = 0.0f;
      for (int c = 0; c < kC; ++c) {
        const float gc = a.v_image[pixel * kC + c];
        st.g[c][r][j][l] = gc;
        total += gc * a.image[pixel * kC + c];
      }
      st.g_alpha[r][j][l] = a.v_alpha[pixel];
      st.total[r][j][l] = total + a.v_alpha[pixel] * (1.0f - a.T_final[pixel]);
      st.last[r][j][l] = a.last[pixel];
      max_last = imax(max_last, a.last[pixel]);
    }
  const vf centres = lane_centres();
  const int64_t stop = std::min(t.stop, t.start + max_last);
  for (int64_t k = t.start; k < stop; ++k) {
    ListEntry<kC> e;
    if (!list_entry(a, t, half, k, e)) continue;
    const Splat& s = e.s;
    const Box& b = e.b;
    const float* f = e.f;
    const int64_t g = e.g;
    const vi position = splat_i(static_cast<int32_t>(k - t.start));
    vf sum[kRow];
    for (int q = 0; q < kRow; ++q) sum[q] = splat(0.0f);
    for (int r = b.r0; r <= b.r1; ++r) {
      const float dy = static_cast<float>(t.row0 + r) + 0.5f - s.v;
      const RowPower p = row_power(dy, s);
      for (int j = b.j0; j <= b.j1; ++j) {
        const vi walked = position < st.last[r][j];
        if (!any(walked)) continue;  // every pixel here stopped before this Gaussian
        vf dx, power;
        if (!lanes_power(t, j, p, s, centres, dx, power)) continue;
        vi capped;
        vf alpha = pixel_alpha_lanes(power, s, capped);
        const vi hit = walked & (alpha > 0.0f);
        if (!any(hit)) continue;
        alpha = hit ? alpha : splat(0.0f);
        const vf T = st.T[r][j];
        const vf w = alpha * T;
        vf v = st.g_alpha[r][j];
        for (int c = 0; c < kC; ++c) {
          v += st.g[c][r][j] * f[c];
          sum[6 + c] += w * st.g[c][r][j];
        }
        st.prefix[r][j] += w * v;
        const vf v_alpha = T * v - (st.total[r][j] - st.prefix[r][j]) / (1.0f - alpha);
        st.T[r][j] = T * (1.0f - alpha);
        const vf g_power = (hit & ~capped) ? alpha * v_alpha : splat(0.0f);
        sum[0] += g_power * (s.A * dx + s.B * dy);
        sum[1] += g_power * (s.B * dx + s.C * dy);
        sum[2] += (-0.5f * g_power * dx) * dx;
        sum[3] += (-g_power * dx) * dy;
        sum[4] += (-0.5f * g_power * dy) * dy;
        sum[5] += g_power / s.o;
      }
    }
    float* out = grads + g * kRow;
    for (int q = 0; q < kRow; ++q) out[q] += hsum(sum[q]);
  }
}

template <int kC>
at::Tensor backward_all(const RasterArgs& a, int64_t images, int64_t n) {
  constexpr int kRow = 6 + kC;
  const int64_t n_lists = images * a.tiles_x * a.tiles_y;
  const std::vector<float> half = pixel_box_half_widths(a, n);
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(host_threads(), n_lists)));
  const std::vector<int64_t> runs = balanced_runs(a, n_lists, parts);
  // One gradient buffer per run (not per thread: which thread runs a run does not matter), added
  // up in run order at the end: no races, and the same sums for the same number of threads.
  at::Tensor buffers = at::zeros({parts, n, kRow}, at::TensorOptions().dtype(at::kFloat));
  float* base = buffers.data_ptr<float>();
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    BackwardTile<kC> st;
    for (int64_t list = runs[p]; list < runs[p + 1]; ++list)
      backward_tile<kC>(a, tile_work(a, list), half.data(), st, base + static_cast<int64_t>(p) * n * kRow);
  }
  return parts == 1 ? buffers[0] : buffers.sum(0);
}

// Calls body.template operator()<C>() for the compile-time channel count equal to `channels`.
template <typename Body>
auto with_channels(int channels, Body&& body) {
  switch (channels) {
    case 1: return body.template operator()<1>();
    case 2: return body.template operator()<2>();
    case 3: return body.template operator()<3>();
    case 4: return body.template operator()<4>();
    case 5: return body.template operator()<5>();
    case 6: return body.template operator()<6>();
    case 7: return body.template operator()<7>();
    default: return body.template operator()<8>();
  }
}
static_assert(kMaxChannels == 8, "with_channels covers 1..8 channels");

}  // namespace

namespace {
std::atomic<int> configured_threads{0};
}  // namespace

int host_threads() {
  const int t = configured_threads.load();
  return t > 0 ? t : omp_get_num_procs();
}

void set_host_threads(int64_t threads) {
  TORCH_CHECK(threads >= 0 && threads <= 4096, "the CPU rasterizer's threads must be in [0, 4096] (got ", threads, ")");
  configured_threads = static_cast<int>(threads);
}

int host_simd_lanes() { return kLanes; }

at::Tensor over(const at::Tensor& color, const at::Tensor& alpha, const at::Tensor& under) {
  TORCH_CHECK(color.dim() == 3 && color.size(2) == 3 && alpha.dim() == 3 && alpha.size(2) == 1 && under.dim() == 3 &&
                  under.size(2) == 3,
              "over: color [H, W, 3], alpha [H, W, 1] and under [H, W, 3] (got ", color.sizes(), ", ", alpha.sizes(),
              ", ", under.sizes(), ")");
  for (const at::Tensor* t : {&color, &alpha, &under}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_cpu(), "over: float32 CPU tensors");
    TORCH_CHECK(t->size(0) == color.size(0) && t->size(1) == color.size(1), "over: the images differ in size");
  }
  const int64_t height = color.size(0), width = color.size(1);
  at::Tensor out = at::empty({height, width, 3}, color.options());
  const float *c = color.data_ptr<float>(), *a = alpha.data_ptr<float>(), *u = under.data_ptr<float>();
  const int64_t cs0 = color.stride(0), cs1 = color.stride(1), cs2 = color.stride(2);
  const int64_t as0 = alpha.stride(0), as1 = alpha.stride(1);
  const int64_t us0 = under.stride(0), us1 = under.stride(1), us2 = under.stride(2);
  float* o = out.data_ptr<float>();
  host_parallel_for(height, [&](int64_t begin, int64_t end) {  // by rows: no division per pixel
    for (int64_t y = begin; y < end; ++y) {
      const float *cy = c + y * cs0, *ay = a + y * as0, *uy = u + y * us0;
      float* oy = o + 3 * y * width;
      for (int64_t x = 0; x < width; ++x) {
        const float keep = 1.0f - ay[x * as1];
        for (int k = 0; k < 3; ++k) oy[3 * x + k] = cy[x * cs1 + k * cs2] + keep * uy[x * us1 + k * us2];
      }
    }
  }, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, width)));
  return out;
}

at::Tensor fast_exp(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu(), "fast_exp takes a float32 CPU tensor");
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = in.numel();
  for (int64_t i = 0; i < n; i += kLanes) {
    vf v = splat(0.0f);
    const int64_t m = std::min<int64_t>(kLanes, n - i);
    for (int l = 0; l < m; ++l) v[l] = src[i + l];
    const vf e = exp_fast(v);
    for (int l = 0; l < m; ++l) dst[i + l] = e[l];
  }
  return out;
}

// Sorts keys by their high 32 bits, stably (keys pushed in index order keep it among equal depths:
// the same order as sorting the whole keys). LSD radix sort, 11 bits a pass: a few linear passes
// where a comparison sort of a frame's Gaussians took most of the binning's time.
void sort_by_high_half(std::vector<uint64_t>& keys) {
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  std::vector<uint64_t> scratch(keys.size());
  for (int shift = 32; shift < 64; shift += kBits) {
    std::vector<int64_t> first(kBuckets + 1, 0);
    for (uint64_t k : keys) ++first[((k >> shift) & (kBuckets - 1)) + 1];
    if (first[1 + ((keys.empty() ? 0 : keys[0] >> shift) & (kBuckets - 1))] == static_cast<int64_t>(keys.size()))
      continue;  // every key in one bucket: this pass would not move anything
    for (int b = 0; b < kBuckets; ++b) first[b + 1] += first[b];
    for (uint64_t k : keys) scratch[first[(k >> shift) & (kBuckets - 1)]++] = k;
    keys.swap(scratch);
  }
}

std::vector<at::Tensor> host_isect_tiles(IsectArgs& a, int64_t images, const at::TensorOptions& options) {
  const int64_t n = a.n;
  const int64_t tiles = static_cast<int64_t>(a.tiles_x) * a.tiles_y;
  const int64_t lists = images * tiles;
  // Each Gaussian's tile rectangle (tile_range, as the kernels), once.
  struct Rect {
    int tx0, tx1, ty0, ty1;
  };
  std::vector<Rect> rects(n);
  std::vector<int64_t> starts(n + 1, 0);
  host_parallel_for(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Rect& r = rects[i];
      if (!isect_range(a, i, r.tx0, r.tx1, r.ty0, r.ty1)) r = {0, -1, 0, -1};
      starts[i + 1] = static_cast<int64_t>(r.tx1 - r.tx0 + 1) * (r.ty1 - r.ty0 + 1);
    }
  });
  for (int64_t i = 0; i < n; ++i) starts[i + 1] += starts[i];
  const int64_t needed = starts[n];
  const int64_t capacity = a.capacity < 0 ? needed : a.capacity;
  // Gaussians with pairs, by depth, ties in input order (the key's low half is the index): dealt
  // into their tiles in this order, every tile's list is depth-sorted without sorting the pairs.
  std::vector<uint64_t> order;
  order.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (starts[i + 1] > starts[i] && starts[i] < capacity) {
      uint32_t bits;
      std::memcpy(&bits, a.depths + i, sizeof bits);  // positive floats order like their bits
      order.push_back((static_cast<uint64_t>(bits) << 32) | static_cast<uint64_t>(i));
    }
  sort_by_high_half(order);
  auto for_each_pair = [&](int64_t i, auto&& fn) {  // the tiles of Gaussian i that fit in the capacity
    const Rect& r = rects[i];
    int64_t slot = starts[i];
    const int64_t image_tiles = static_cast<int64_t>(a.image_ids[i]) * tiles;
    for (int ty = r.ty0; ty <= r.ty1; ++ty)
      for (int tx = r.tx0; tx <= r.tx1 && slot < capacity; ++tx, ++slot) fn(image_tiles + static_cast<int64_t>(ty) * a.tiles_x + tx);
  };
  at::Tensor tile_offsets = at::zeros({lists + 1}, options.dtype(at::kLong));
  int64_t* offsets = tile_offsets.data_ptr<int64_t>();
  for (uint64_t key : order) for_each_pair(static_cast<int64_t>(key & 0xffffffffu), [&](int64_t list) { ++offsets[list + 1]; });
  for (int64_t l = 0; l < lists; ++l) offsets[l + 1] += offsets[l];
  at::Tensor gauss_ids = at::empty({capacity}, options.dtype(at::kInt));
  int32_t* ids = gauss_ids.data_ptr<int32_t>();
  std::vector<int64_t> cursor(offsets, offsets + lists);
  for (uint64_t key : order) {
    const int32_t i = static_cast<int32_t>(key & 0xffffffffu);
    for_each_pair(i, [&](int64_t list) { ids[cursor[list]++] = i; });
  }
  std::fill(ids + offsets[lists], ids + capacity, 0);  // unused slots past the pairs kept
  at::Tensor pairs = at::full({1}, needed, options.dtype(at::kLong));
  return {tile_offsets, gauss_ids, pairs};
}

void host_raster_forward(const RasterArgs& a, int64_t images, int64_t n) {
  with_channels(a.channels, [&]<int kC>() { forward_all<kC>(a, images, n); });
}

at::Tensor host_raster_backward(const RasterArgs& a, int64_t images, int64_t n) {
  return with_channels(a.channels, [&]<int kC>() { return backward_all<kC>(a, images, n); });
}

}  // namespace gsa
