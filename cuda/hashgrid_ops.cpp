// Hash-grid encoder ops: input checks, output allocation, and dispatch (kernel_dispatch.h) to the
// kernels' launchers (hashgrid_kernels.cu) or to the host twins below, which run the math of
// hashgrid_math.h in plain loops.
#include "hashgrid.h"

#include <ATen/Parallel.h>

#include "kernel_dispatch.h"

#ifdef GSA_HAS_KERNELS
#include "hashgrid_launch.h"
#endif

namespace gsa {
namespace {

using hashgrid::Params;

// Points per at::parallel_for chunk (each point costs all its levels).
constexpr int64_t kPointGrain = 1024;

Params make_params(const at::Tensor& x, const at::Tensor& table, const std::vector<int64_t>& resolutions) {
  TORCH_CHECK(x.dim() == 2 && (x.size(1) == 2 || x.size(1) == 3), "hashgrid: x must be [P, 2] or [P, 3] (got ",
              x.sizes(), ")");
  TORCH_CHECK(table.dim() == 3, "hashgrid: table must be [L, T, F] (got ", table.sizes(), ")");
  TORCH_CHECK(x.scalar_type() == at::kFloat && table.scalar_type() == at::kFloat,
              "hashgrid: x and table must be float32 (got ", x.scalar_type(), ", ", table.scalar_type(), ")");
  TORCH_CHECK(x.device() == table.device(), "hashgrid: x and table must be on one device (got ", x.device(), ", ",
              table.device(), ")");
  TORCH_CHECK(x.is_cpu() || x.is_cuda(), "hashgrid: tensors must be on CPU or CUDA (got ", x.device(), ")");
  const int64_t levels = table.size(0), size = table.size(1), features = table.size(2);
  TORCH_CHECK(levels >= 1 && levels <= hashgrid::kMaxLevels, "hashgrid: 1 to ", hashgrid::kMaxLevels,
              " levels supported (got ", levels, ")");
  TORCH_CHECK(features >= 1 && features <= hashgrid::kMaxFeatures, "hashgrid: 1 to ", hashgrid::kMaxFeatures,
              " features per level supported (got ", features, ")");
  TORCH_CHECK(size >= 2 && size <= (int64_t(1) << 31) && (size & (size - 1)) == 0,
              "hashgrid: table size T must be a power of two in [2, 2^31] (got ", size, ")");
  TORCH_CHECK(int64_t(resolutions.size()) == levels, "hashgrid: ", levels, " resolutions expected (got ",
              resolutions.size(), ")");

  Params p{};
  p.points = x.size(0);
  p.dim = int(x.size(1));
  p.features = int(features);
  p.levels = int(levels);
  p.table_size = uint32_t(size);
  for (int l = 0; l < p.levels; ++l) {
    const int64_t n = resolutions[l];
    TORCH_CHECK(n >= 1 && n <= hashgrid::kMaxResolution, "hashgrid: resolutions must be in [1, 2^24] (got ", n, ")");
    p.res[l] = int(n);
    int64_t vertices = 1;  // (n + 1)^dim, stopping once past T (no overflow)
    for (int d = 0; d < p.dim && vertices <= size; ++d) vertices *= n + 1;
    if (vertices <= size) p.dense_mask |= uint64_t(1) << l;
  }
  return p;
}

struct PlainAdd {
  void operator()(float* dst, float value) const { *dst += value; }
};

// Level-major (index l * P + i): consecutive points share one level's table, which stays in cache.
void host_forward(const Params& p, const float* x, const float* table, float* out) {
  hashgrid::dispatch(p, [&](auto dim, auto features) {
    constexpr int D = dim.value, F = features.value;
    at::parallel_for(0, p.levels * p.points, kPointGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int l = int(j / p.points);
        const int64_t i = j % p.points;
        hashgrid::forward_level<D, F>(p, x + i * D, table, l, out + (i * p.levels + l) * F);
      }
    });
  });
}

// Deterministic: each level's rows of grad_table are written by one thread, points in order.
void host_backward(const Params& p, const float* x, const float* table, const float* grad_out, float* grad_table,
                   float* grad_x) {
  hashgrid::dispatch(p, [&](auto dim, auto features) {
    constexpr int D = dim.value, F = features.value;
    at::parallel_for(0, p.levels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l)
        for (int64_t i = 0; i < p.points; ++i)
          hashgrid::table_grad_level<D, F>(p, x + i * D, grad_out + (i * p.levels + l) * F, int(l), grad_table,
                                           PlainAdd{});
    });
    if (grad_x == nullptr) return;
    at::parallel_for(0, p.points, kPointGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        hashgrid::x_grad_point<D, F>(p, x + i * D, table, grad_out + i * p.levels * F, grad_x + i * D);
    });
  });
}

}  // namespace

at::Tensor hashgrid_forward(const at::Tensor& x_in, const at::Tensor& table_in,
                            const std::vector<int64_t>& resolutions) {
  const Params p = make_params(x_in, table_in, resolutions);
  const at::Tensor x = x_in.contiguous(), table = table_in.contiguous();
  at::Tensor out = at::empty({p.points, int64_t(p.levels) * p.features}, x.options());
  if (runs_kernels(x)) {
#ifdef GSA_HAS_KERNELS
    GSA_KERNEL_GUARD(x);
    hashgrid::launch_forward(p, x.data_ptr<float>(), table.data_ptr<float>(), out.data_ptr<float>(),
                             kernel_stream(x));
    GSA_CHECK_LAUNCH();
#else
    TORCH_CHECK(false, "gsavatar kernels were built without CUDA");
#endif
  } else {
    host_forward(p, x.data_ptr<float>(), table.data_ptr<float>(), out.data_ptr<float>());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> hashgrid_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                     const at::Tensor& table_in,
                                                     const std::vector<int64_t>& resolutions, bool need_x_grad) {
  const Params p = make_params(x_in, table_in, resolutions);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == p.points &&
                  grad_out_in.size(1) == int64_t(p.levels) * p.features,
              "hashgrid: grad_out must be [", p.points, ", ", p.levels * p.features, "] (got ", grad_out_in.sizes(),
              ")");
  TORCH_CHECK(grad_out_in.scalar_type() == at::kFloat && grad_out_in.device() == x_in.device(),
              "hashgrid: grad_out must be float32 on ", x_in.device(), " (got ", grad_out_in.scalar_type(), " on ",
              grad_out_in.device(), ")");
  const at::Tensor x = x_in.contiguous(), table = table_in.contiguous(), grad_out = grad_out_in.contiguous();
  at::Tensor grad_table = at::zeros_like(table);
  at::Tensor grad_x = need_x_grad ? at::empty_like(x) : at::Tensor();
  float* grad_x_ptr = need_x_grad ? grad_x.data_ptr<float>() : nullptr;
  if (runs_kernels(x)) {
#ifdef GSA_HAS_KERNELS
    GSA_ALERT_ATOMICS("gsavatar hashgrid_backward (float atomicAdd on CUDA)");
    GSA_KERNEL_GUARD(x);
    hashgrid::launch_backward(p, x.data_ptr<float>(), table.data_ptr<float>(), grad_out.data_ptr<float>(),
                              grad_table.data_ptr<float>(), grad_x_ptr, kernel_stream(x));
    GSA_CHECK_LAUNCH();
#else
    TORCH_CHECK(false, "gsavatar kernels were built without CUDA");
#endif
  } else {
    host_backward(p, x.data_ptr<float>(), table.data_ptr<float>(), grad_out.data_ptr<float>(),
                  grad_table.data_ptr<float>(), grad_x_ptr);
  }
  return {grad_table, grad_x};
}

}  // namespace gsa
