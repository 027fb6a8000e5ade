// A CPU emulation of the part of CUDA our kernels use, for tests only: the "emulated" build of
// gsavatar/kernels.py compiles raster_kernels.cu and hashgrid_kernels.cu as C++ against this header
// (-DGSA_EMULATE_CUDA, through emulated_kernels.cpp), so a machine without a GPU runs the kernels
// themselves, not only their per-element math (the host twins do that). It checks what the host
// twins cannot: thread and block indexing, launch configurations, shared-memory batching, barriers
// and their consensus counts, warp shuffles and votes, atomics, and the sort of the tile pairs.
//
// Model. The blocks of a grid run one after another on the calling thread. The threads of a block
// are fibers (own stacks, switched by hand on x86-64, by ucontext elsewhere) that run, one at a time, until they reach a barrier or a warp operation;
// it completes once every live thread of the block (every lane of the warp) has reached it. Since
// one block runs at a time, a `static` local is exactly a block's shared memory (`__shared__`).
// Stricter than a GPU, where these are undefined: a barrier or warp operation that some threads
// never reach (divergent `__syncthreads`, a warp op under a partial mask, in a partial warp or
// with exited lanes) is an error, not a hang.
// Not emulated: concurrency (threads interleave only at barriers and warp operations, so data
// races go unseen), memory spaces (a pointer is a pointer), streams (a launch runs to completion
// at once), the GPU's fused multiply-adds (results differ from a GPU's in the last bits).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "emulated_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// CUDA's overloads for integers and floats alike.
template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }

namespace gsa_emu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStackBytes = 256 * 1024;  // per thread; a guard page below each stack

enum class State { Runnable, AtBarrier, AtWarpOp, Exited };
enum class Op { None, SyncThreads, SyncThreadsCount, ShuffleDown, Any };

// Switching between the scheduler and a thread. On x86-64, a few instructions (callee-saved
// registers, the x87 and SSE control words, the stack pointer); elsewhere ucontext, whose
// swapcontext also saves the signal mask with a system call (several times slower).
#if defined(__x86_64__)
#define GSA_EMU_FAST_SWITCH 1
extern "C" void gsa_emu_switch(void** save_sp, void* resume_sp);
// Saves the caller's state on its stack and its stack pointer in *save_sp, then resumes the
// context whose stack pointer is resume_sp (saved by an earlier switch, or prepared by
// Context::start). Only emulated_kernels.cpp includes this header, so the symbol is defined once.
asm(R"(
    .text
    .globl gsa_emu_switch
    .hidden gsa_emu_switch
    .type gsa_emu_switch, @function
gsa_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gsa_emu_switch, .-gsa_emu_switch
)");

struct Context {
  void* sp = nullptr;
  // A fresh context that starts in entry() on the stack below `top`; entry must never return.
  void start(char* top, void (*entry)()) {
    auto* p = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
    *--p = 0;                                         // entry's return address (never used)
    *--p = reinterpret_cast<uint64_t>(entry);         // where the first switch "returns" to
    for (int r = 0; r < 6; ++r) *--p = 0;             // rbp rbx r12 r13 r14 r15
    uint32_t mxcsr;
    uint16_t x87;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(x87));
    *--p = (static_cast<uint64_t>(x87) << 32) | mxcsr;  // the control words, as gsa_emu_switch stores them
    sp = p;
  }
};
inline void switch_to(Context& save, Context& resume) { gsa_emu_switch(&save.sp, resume.sp); }
#else
struct Context {
  ucontext_t uc;
  void start(char* top, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = top - kStackBytes;
    uc.uc_stack.ss_size = kStackBytes;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
};
inline void switch_to(Context& save, Context& resume) { swapcontext(&save.uc, &resume.uc); }
#endif

struct Fiber {
  Context context;
  dim3 thread;
  State state = State::Runnable;
  // The collective operation this thread waits in: its kind, operands and (once done) result.
  Op op = Op::None;
  unsigned mask = 0, delta = 0;
  double value = 0;  // a shuffled value (float or int) or a predicate
  double result = 0;
};

struct Block {
  dim3 index, dim, grid;
  std::vector<Fiber> fibers;
  int current = -1;
  Context scheduler;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
};

inline Block*& running_block() {
  static thread_local Block* block = nullptr;
  return block;
}

inline Fiber& self() {
  Block* b = running_block();
  return b->fibers[b->current];
}

[[noreturn]] inline void fail(const std::string& what) {
  throw std::runtime_error("CUDA emulator: " + what);
}

// One stack per thread of the largest block so far, each above a PROT_NONE guard page, reused
// by every launch on this OS thread.
class Stacks {
 public:
  ~Stacks() {
    if (base_ != nullptr) munmap(base_, slot_ * count_);
  }
  char* top_of(int i) { return static_cast<char*>(base_) + slot_ * (i + 1); }  // stacks grow down
  void reserve(int threads) {
    if (threads <= count_) return;
    if (base_ != nullptr) munmap(base_, slot_ * count_);
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    slot_ = kStackBytes + page_;
    base_ = mmap(nullptr, slot_ * threads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) {
      base_ = nullptr;
      count_ = 0;
      fail("cannot allocate the thread stacks");
    }
    for (int i = 0; i < threads; ++i) mprotect(static_cast<char*>(base_) + slot_ * i, page_, PROT_NONE);
    count_ = threads;
  }

 private:
  void* base_ = nullptr;
  size_t page_ = 0, slot_ = 0;
  int count_ = 0;
};

inline Stacks& stacks() {
  static thread_local Stacks s;
  return s;
}

// Where every thread starts: runs the kernel, then hands control back to the scheduler for good.
[[noreturn]] inline void fiber_main() {
  Block* b = running_block();
  try {
    (*b->body)();
  } catch (...) {
    if (!b->error) b->error = std::current_exception();
  }
  Fiber& f = self();
  f.state = State::Exited;
  switch_to(f.context, b->scheduler);
  std::abort();  // an exited thread is never resumed
}

// Called by a thread: wait in a collective operation until the scheduler completes it.
inline double wait_in(State state, Op op, double value, unsigned mask = kFullMask, unsigned delta = 0) {
  Block* b = running_block();
  Fiber& f = b->fibers[b->current];
  f.state = state;
  f.op = op;
  f.value = value;
  f.mask = mask;
  f.delta = delta;
  switch_to(f.context, b->scheduler);
  return f.result;
}

inline std::string where(const Block& b, int t) {
  const dim3& i = b.fibers[t].thread;
  return "block (" + std::to_string(b.index.x) + "," + std::to_string(b.index.y) + "," + std::to_string(b.index.z) +
         ") thread (" + std::to_string(i.x) + "," + std::to_string(i.y) + "," + std::to_string(i.z) + ")";
}

// Completes the warp operations whose lanes have all arrived; true if any completed.
inline bool complete_warp_ops(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  bool completed = false;
  for (int first = 0; first < n; first += kWarpSize) {
    const int lanes = std::min(kWarpSize, n - first);
    int waiting = 0;
    for (int l = 0; l < lanes; ++l) waiting += b.fibers[first + l].state == State::AtWarpOp;
    if (waiting == 0) continue;
    const Fiber& lead = b.fibers[first];
    if (waiting != kWarpSize)
      fail("a warp operation that not all 32 lanes of the warp reach (" + where(b, first) +
           "): divergent code, exited lanes or a partial warp");
    for (int l = 0; l < lanes; ++l) {
      const Fiber& f = b.fibers[first + l];
      if (f.op != lead.op || f.mask != lead.mask || f.delta != lead.delta)
        fail("the lanes of a warp are in different warp operations (" + where(b, first + l) + ")");
    }
    if (lead.mask != kFullMask) fail("warp operations under a partial mask are not emulated (" + where(b, first) + ")");
    double any = 0;
    for (int l = 0; l < lanes; ++l) any = any || b.fibers[first + l].value != 0;
    for (int l = 0; l < lanes; ++l) {
      Fiber& f = b.fibers[first + l];
      if (f.op == Op::ShuffleDown) {
        const unsigned source = l + f.delta;  // outside the warp: the lane keeps its own value
        f.result = source < static_cast<unsigned>(kWarpSize) ? b.fibers[first + source].value : f.value;
      } else {
        f.result = any;
      }
      f.state = State::Runnable;
    }
    completed = true;
  }
  return completed;
}

// Completes a block barrier once every live thread waits in it; false if none completed.
inline bool complete_barrier(Block& b) {
  int live = 0, waiting = 0;
  double count = 0;
  Op op = Op::None;
  for (int t = 0; t < static_cast<int>(b.fibers.size()); ++t) {
    const Fiber& f = b.fibers[t];
    if (f.state == State::Exited) continue;
    ++live;
    if (f.state != State::AtBarrier) continue;
    if (op != Op::None && f.op != op) fail("threads of a block wait in different kinds of barrier (" + where(b, t) + ")");
    op = f.op;
    ++waiting;
    count += f.value != 0;
  }
  if (live == 0 || waiting != live) return false;
  for (Fiber& f : b.fibers) {
    if (f.state != State::AtBarrier) continue;
    f.result = count;
    f.state = State::Runnable;
  }
  return true;
}

inline void run_block(const dim3& grid, const dim3& dim, const dim3& index, const std::function<void()>& body) {
  const int n = static_cast<int>(dim.x * dim.y * dim.z);
  if (n <= 0 || n > 1024) fail("a block of " + std::to_string(n) + " threads (CUDA allows 1..1024)");
  Block b;
  b.index = index;
  b.dim = dim;
  b.grid = grid;
  b.body = &body;
  b.fibers.resize(n);
  stacks().reserve(n);
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    // Linear thread id x + y*dim.x + z*dim.x*dim.y, as CUDA numbers threads into warps.
    f.thread = dim3(t % dim.x, (t / dim.x) % dim.y, t / (dim.x * dim.y));
    f.context.start(stacks().top_of(t), fiber_main);
  }
  Block* outer = running_block();
  if (outer != nullptr) fail("a kernel launched from inside a kernel");
  running_block() = &b;
  struct Restore {
    ~Restore() { running_block() = nullptr; }
  } restore;
  for (;;) {
    for (int t = 0; t < n; ++t) {
      if (b.fibers[t].state != State::Runnable) continue;
      b.current = t;
      switch_to(b.scheduler, b.fibers[t].context);
      if (b.error) std::rethrow_exception(b.error);
    }
    b.current = -1;
    if (complete_warp_ops(b) || complete_barrier(b)) continue;
    bool all_exited = true;
    for (const Fiber& f : b.fibers) all_exited = all_exited && f.state == State::Exited;
    if (all_exited) return;
    for (int t = 0; t < n; ++t)
      if (b.fibers[t].state != State::Exited)
        fail("deadlock: " + where(b, t) +
             " waits in a barrier or warp operation that other threads never reach (divergent __syncthreads?)");
  }
}

// kernel<<<grid, block, 0, stream>>>(args...) becomes launch(grid, block, kernel)(args...).
template <class... Params>
struct Launch {
  dim3 grid, block;
  void (*kernel)(Params...);
  template <class... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    // Arguments are copied once, as a launch copies them to the device.
    const std::function<void()> body = [k = kernel, params = std::tuple<Params...>(std::forward<Args>(args)...)] {
      std::apply(k, params);
    };
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) run_block(grid, block, dim3(x, y, z), body);
  }
};

template <class... Params>
Launch<Params...> launch(dim3 grid, dim3 block, void (*kernel)(Params...)) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("an invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
         ")");
  return {grid, block, kernel};
}

}  // namespace gsa_emu

#define threadIdx (::gsa_emu::self().thread)
#define blockIdx (::gsa_emu::running_block()->index)
#define blockDim (::gsa_emu::running_block()->dim)
#define gridDim (::gsa_emu::running_block()->grid)

inline void __syncthreads() { gsa_emu::wait_in(gsa_emu::State::AtBarrier, gsa_emu::Op::SyncThreads, 0); }
inline int __syncthreads_count(int predicate) {
  return static_cast<int>(gsa_emu::wait_in(gsa_emu::State::AtBarrier, gsa_emu::Op::SyncThreadsCount, predicate != 0));
}
inline int __any_sync(unsigned mask, int predicate) {
  return gsa_emu::wait_in(gsa_emu::State::AtWarpOp, gsa_emu::Op::Any, predicate != 0, mask) != 0;
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= 4, "32-bit shuffles only");  // a double holds any of them exactly
  return static_cast<T>(gsa_emu::wait_in(gsa_emu::State::AtWarpOp, gsa_emu::Op::ShuffleDown, value, mask, delta));
}

// Threads interleave only at barriers and warp operations, so a read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
inline int atomicMax(int* address, int value) {
  const int old = *address;
  if (value > old) *address = value;
  return old;
}

// cub's stable LSD radix sort of (key, value) pairs on the key bits [begin_bit, end_bit), with its
// two-call protocol (a null scratch pointer asks for the scratch size). Keys come out whole.
namespace cub {
struct DeviceRadixSort {
  template <class Key, class Value>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const Key* keys_in, Key* keys_out,
                               const Value* values_in, Value* values_out, int count, int begin_bit = 0,
                               int end_bit = static_cast<int>(sizeof(Key) * 8), cudaStream_t = nullptr) {
    const size_t needed = sizeof(int64_t) * static_cast<size_t>(count > 0 ? count : 1);
    if (temp == nullptr) {
      temp_bytes = needed;
      return cudaSuccess;
    }
    if (temp_bytes < needed || count < 0 || begin_bit < 0 || end_bit > static_cast<int>(sizeof(Key) * 8) ||
        begin_bit > end_bit)
      return cudaErrorInvalidValue;
    const int bits = end_bit - begin_bit;
    const Key mask = bits >= static_cast<int>(sizeof(Key) * 8) ? ~Key(0) : (Key(1) << bits) - 1;
    std::vector<int> order(count);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      return ((keys_in[a] >> begin_bit) & mask) < ((keys_in[b] >> begin_bit) & mask);
    });
    for (int i = 0; i < count; ++i) {
      keys_out[i] = keys_in[order[i]];
      values_out[i] = values_in[order[i]];
    }
    return cudaSuccess;
  }
};
}  // namespace cub
