// The one binding file: every compiled op that Python sees is declared in raster.h / hashgrid.h
// and bound here. Built three ways by gsavatar/kernels.py: with -DGSA_WITH_CUDA (CUDA kernels for
// CUDA tensors, host twins for CPU tensors), without (host twins only), and with -DGSA_EMULATE_CUDA
// (the CUDA kernels on the CPU emulator, for tests; see kernel_dispatch.h).
// torch/python.h, not torch/extension.h: the bindings need pybind11 and the tensor casters, not the
// C++ frontend (torch/all.h), whose headers were about a fifth of the CPU build's compile time.
#include <torch/python.h>

#include "hashgrid.h"
#include "raster.h"
#include "raster_host.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("with_cuda") =
#ifdef GSA_WITH_CUDA
      true;
#else
      false;
#endif
  m.attr("emulated") =
#ifdef GSA_EMULATE_CUDA
      true;
#else
      false;
#endif

  // ---- rasterizer (raster.h) ----
  m.def("project_forward", &gsa::project_forward, "EWA projection (+ SH colours) of Gaussians");
  m.def("project_backward", &gsa::project_backward, "gradients of project_forward");
  m.def("isect_tiles", &gsa::isect_tiles, "tile binning: per-tile depth-sorted Gaussian lists");
  m.def("rasterize_forward", &gsa::rasterize_forward, "front-to-back alpha compositing per tile");
  m.def("rasterize_backward", &gsa::rasterize_backward, "gradients of rasterize_forward");
  // ---- the CPU rasterizer's parts worth testing on their own (raster_host.h) ----
  m.def("fast_exp", &gsa::fast_exp, "the CPU rasterizer's exp, elementwise (float32 CPU tensor)");
  m.attr("fast_exp_max_rel_error") = gsa::kFastExpMaxRelError;
  m.attr("fast_exp_min") = gsa::kFastExpMin;
  m.attr("simd_lanes") = gsa::host_simd_lanes();
  m.def("over", &gsa::over, "color + (1 - alpha) * under, one pass (float32 CPU images of any strides)");
  m.def("cpu_threads", &gsa::host_threads, "threads of the CPU ops (projection, binning, rasterization)");
  m.def("set_cpu_threads", &gsa::set_host_threads, "set them (0: every processor this process may use)",
        py::arg("threads"));

  // ---- hash grid (hashgrid.h) ----
  m.def("hashgrid_forward", &gsa::hashgrid_forward, "multiresolution hash-grid encoding: x [P,dim] -> [P,L*F]",
        py::arg("x"), py::arg("table"), py::arg("resolutions"));
  m.def("hashgrid_backward", &gsa::hashgrid_backward, "gradients of hashgrid_forward: (grad_table, grad_x or None)",
        py::arg("grad_out"), py::arg("x"), py::arg("table"), py::arg("resolutions"), py::arg("need_x_grad"));
  m.attr("hashgrid_max_levels") = gsa::hashgrid::kMaxLevels;
  m.attr("hashgrid_max_features") = gsa::hashgrid::kMaxFeatures;
}
