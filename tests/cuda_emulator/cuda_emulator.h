// A CPU emulation of the part of CUDA our kernels use, for tests only: the "emulated" build of
// gsavatar/kernels.py compiles raster_kernels.cu and hashgrid_kernels.cu as C++ against this header
// (-DGSA_EMULATE_CUDA, through emulated_kernels.cpp), so a machine without a GPU runs the kernels
// themselves: their arithmetic and what a per-element check cannot see: thread and block indexing,
// launch configurations, shared-memory batching, barriers and their consensus counts, warp
// shuffles and votes, atomics, and the sort of the tile pairs.
//
// Model. The blocks of a grid run one after another on the calling thread. The threads of a block
// are fibers (own stacks; switched by hand on x86-64, by ucontext elsewhere or with
// -DGSA_EMU_UCONTEXT) that run, one at a time, until they reach a barrier or a warp operation; it
// completes once every live thread of the block (every lane of the warp) has reached it; threads
// that exited no longer count (as on sm_70+). Between two such points the threads run in a
// shuffled order (a fixed seed, so runs repeat), so a missing barrier between a write and another
// thread's read shows up as wrong results whichever thread writes. One block at a time, so a
// `static thread_local` local is a block's shared memory (`__shared__`); unlike a GPU's, it keeps
// the previous block's values (zeros at first) instead of garbage, so a kernel that reads shared
// memory before writing it is not caught.
// Stricter than a GPU, where these are undefined: threads waiting at different `__syncthreads`
// call sites or kinds of barrier, a warp operation that not every lane reaches (divergent code,
// exited lanes, a partial warp), a partial mask, a kernel launched from a kernel or a block over
// CUDA's limits is an error naming the block and thread, not a hang or garbage.
// Not emulated: true concurrency (threads interleave only at barriers and warp operations, so a
// race between atomics and plain stores goes unseen), memory spaces (a pointer is a pointer),
// streams (a launch runs to completion at once), the GPU's fused multiply-adds (results differ
// from a GPU's in the last bits).
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
#include <source_location>
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
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {  // CUDA's alignment, so a misaligned vector load fails here too
  float x, y;
};
struct alignas(16) float4 {
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
#if defined(__x86_64__) && !defined(GSA_EMU_UCONTEXT)
extern "C" void gsa_emu_switch(void** save_sp, void* resume_sp);
// Saves the caller's state on its stack and its stack pointer in *save_sp, then resumes the
// context whose stack pointer is resume_sp (saved by an earlier switch, or prepared by
// Context::start). Only emulated_kernels.cpp includes this header, so the symbol is defined once.
asm(R"(
    .pushsection .text
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
    .popsection
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
  std::source_location site;  // where a barrier was called (all threads must wait at the same one)
};

struct Block {
  dim3 index, dim, grid;
  std::vector<Fiber> fibers;
  int current = -1;
  Context scheduler;
  const std::function<void()>* body = nullptr;
  std::exception_ptr error;
  uint64_t random = 0;  // state of the generator that shuffles the order threads run in
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
    count_ = threads;
    for (int i = 0; i < threads; ++i)
      if (mprotect(static_cast<char*>(base_) + slot_ * i, page_, PROT_NONE) != 0) fail("cannot protect a stack guard page");
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
inline double wait_in(State state, Op op, double value, unsigned mask = kFullMask, unsigned delta = 0,
                      const std::source_location& site = std::source_location::current()) {
  Block* b = running_block();
  if (b == nullptr || b->current < 0) fail("a barrier or warp operation outside a kernel");
  Fiber& f = b->fibers[b->current];
  f.state = state;
  f.op = op;
  f.value = value;
  f.mask = mask;
  f.delta = delta;
  f.site = site;
  switch_to(f.context, b->scheduler);
  return f.result;
}

inline std::string site_text(const std::source_location& site) {
  return std::string(site.file_name()) + ":" + std::to_string(site.line());
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
  std::source_location site;
  for (int t = 0; t < static_cast<int>(b.fibers.size()); ++t) {
    const Fiber& f = b.fibers[t];
    if (f.state == State::Exited) continue;
    ++live;
    if (f.state != State::AtBarrier) continue;
    if (op != Op::None && f.op != op) fail("threads of a block wait in different kinds of barrier (" + where(b, t) + ")");
    if (op != Op::None && (f.site.line() != site.line() || f.site.column() != site.column() ||
                           std::string(f.site.file_name()) != site.file_name()))
      fail("threads of a block wait at different barriers (" + site_text(site) + " and " + site_text(f.site) + ", " +
           where(b, t) + ")");
    op = f.op;
    site = f.site;
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

// The next value of a splitmix64 generator.
inline uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline void run_block(const dim3& grid, const dim3& dim, const dim3& index, const std::function<void()>& body) {
  if (running_block() != nullptr) fail("a kernel launched from inside a kernel (dynamic parallelism is not emulated)");
  const int n = static_cast<int>(dim.x * dim.y * dim.z);
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
  b.random = (static_cast<uint64_t>(index.z) << 42) ^ (static_cast<uint64_t>(index.y) << 21) ^ index.x;
  std::vector<int> order(n);
  running_block() = &b;
  struct Restore {
    ~Restore() { running_block() = nullptr; }
  } restore;
  for (;;) {
    // A fresh shuffle for every pass (Fisher-Yates): any order is one a GPU could take.
    std::iota(order.begin(), order.end(), 0);
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random(b.random) % (i + 1)]);
    for (int t : order) {
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
  auto text = [](const dim3& d) {
    return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    fail("a grid of " + text(grid) + " blocks (CUDA allows 1..2^31-1 x 1..65535 x 1..65535)");
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024)
    fail("a block of " + text(block) + " threads (CUDA allows up to 1024 x 1024 x 64, 1024 in all)");
  return {grid, block, kernel};
}

}  // namespace gsa_emu

#define threadIdx (::gsa_emu::self().thread)
#define blockIdx (::gsa_emu::running_block()->index)
#define blockDim (::gsa_emu::running_block()->dim)
#define gridDim (::gsa_emu::running_block()->grid)

// The call site is recorded, so that threads waiting at different barriers are reported.
inline void __syncthreads(const std::source_location& site = std::source_location::current()) {
  gsa_emu::wait_in(gsa_emu::State::AtBarrier, gsa_emu::Op::SyncThreads, 0, gsa_emu::kFullMask, 0, site);
}
inline int __syncthreads_count(int predicate, const std::source_location& site = std::source_location::current()) {
  return static_cast<int>(gsa_emu::wait_in(gsa_emu::State::AtBarrier, gsa_emu::Op::SyncThreadsCount, predicate != 0,
                                           gsa_emu::kFullMask, 0, site));
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
