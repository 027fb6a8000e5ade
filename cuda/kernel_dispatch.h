// How the tensor-level ops (*_ops.cpp) reach the kernels, in each of the three builds made by
// gsavatar/kernels.py:
//   "cuda"     (-DGSA_WITH_CUDA):    CUDA tensors -> the CUDA kernels; CPU tensors -> the CPU path.
//   "cpu"      (neither define):     CPU tensors -> the CPU path; CUDA tensors are refused.
//   "emulated" (-DGSA_EMULATE_CUDA): CPU tensors -> the CUDA kernels themselves, run by the CPU
//                                    emulator (cuda_emulator.h); for tests on machines without a GPU.
// An op does `if (runs_kernels(t)) { GSA_KERNEL_GUARD(t); launch(..., kernel_stream(t)); GSA_CHECK_LAUNCH(); }`
// inside `#ifdef GSA_HAS_KERNELS`, else the CPU path.
#pragma once

#include <ATen/ATen.h>

#if defined(GSA_WITH_CUDA) && defined(GSA_EMULATE_CUDA)
#error "GSA_WITH_CUDA and GSA_EMULATE_CUDA are two different builds"
#endif

#if defined(GSA_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define GSA_HAS_KERNELS 1
namespace gsa {
inline bool runs_kernels(const at::Tensor& t) { return t.is_cuda(); }
inline cudaStream_t kernel_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
}  // namespace gsa
#define GSA_KERNEL_GUARD(tensor) const c10::cuda::CUDAGuard gsa_device_guard((tensor).device())
#define GSA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define GSA_CHECK_CUDA(expr) C10_CUDA_CHECK(expr)
// The CUDA backward passes sum with float atomicAdd: their results vary in the last bits.
#define GSA_ALERT_ATOMICS(what) at::globalContext().alertNotDeterministic(what)

#elif defined(GSA_EMULATE_CUDA)
#include "emulated_runtime.h"

#define GSA_HAS_KERNELS 1
namespace gsa {
inline bool runs_kernels(const at::Tensor& t) {
  TORCH_CHECK(t.is_cpu(), "the emulated kernels take CPU tensors (got ", t.device(), ")");
  return true;
}
inline cudaStream_t kernel_stream(const at::Tensor&) { return nullptr; }
}  // namespace gsa
#define GSA_KERNEL_GUARD(tensor) (void)0
#define GSA_CHECK_LAUNCH() (void)0  // the emulator throws (a RuntimeError in Python) instead
#define GSA_CHECK_CUDA(expr) TORCH_CHECK((expr) == cudaSuccess, "CUDA emulator: " #expr " failed")
#define GSA_ALERT_ATOMICS(what) (void)0  // one thread at a time: deterministic

#else
namespace gsa {
inline bool runs_kernels(const at::Tensor& t) {
  TORCH_CHECK(!t.is_cuda(), "gsavatar kernels were built without CUDA");
  return false;
}
}  // namespace gsa
#define GSA_ALERT_ATOMICS(what) (void)0  // no kernels in this build
#endif
