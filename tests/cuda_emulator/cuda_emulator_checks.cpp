// Small kernels that pin down the CPU emulator of cuda/cuda_emulator.h (tests/test_cuda_emulator.py
// compiles this file with g++ and runs one check per call: `checks NAME`). Each check prints one
// line: "ok" when what CUDA would do happened, else what happened; checks of the emulator's errors
// print the error message.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_emulator.h"

namespace {

__global__ void warp_sum(const float* in, float* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  float x = in[t];
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  out[t] = x;  // lane 0 of each warp holds the warp's sum; the others partial sums
}

__global__ void shuffle_edge(int* out) {
  // A source lane past the warp's end gives the lane its own value.
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x) * 10, 5);
}

__global__ void votes(const int* flags, int* any_out, int* count_out) {
  const int t = threadIdx.x;
  any_out[t] = __any_sync(0xffffffffu, flags[t]);
  count_out[t] = __syncthreads_count(flags[t]);
}

__global__ void shared_per_block(int* out) {
  __shared__ int value[64];
  value[threadIdx.x] = blockIdx.x * 100 + threadIdx.x;
  __syncthreads();
  // Read a neighbour's slot: only right if every thread wrote before any read.
  out[blockIdx.x * blockDim.x + threadIdx.x] = value[(threadIdx.x + 1) % blockDim.x];
}

__global__ void grid_shape(int* out) {
  const int block = blockIdx.y * gridDim.x + blockIdx.x;
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  out[block * blockDim.x * blockDim.y + t] = block * 1000 + t;
}

__global__ void atomics(float* sum, int* max_value) {
  atomicAdd(sum, 1.0f);
  atomicMax(max_value, static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x));
}

__global__ void exited_threads_leave_the_barrier(int* out) {
  if (threadIdx.x >= 40) return;  // on sm_70+, exited threads no longer hold a barrier up
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_barrier_kinds(int* out) {
  if (threadIdx.x < 10)
    __syncthreads();
  else
    out[0] = __syncthreads_count(1);
}

__global__ void divergent_warp_op(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void partial_mask(float* out) { out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1); }

__global__ void barrier_while_warp_ops_in_flight(int* out) {
  // Warp 0 shuffles three times before it writes; warp 1 waits at the barrier meanwhile. The
  // barrier must hold warp 1 until warp 0 has written.
  __shared__ int written[64];
  written[threadIdx.x] = -1;
  __syncthreads();
  if (threadIdx.x < 32) {
    int x = static_cast<int>(threadIdx.x);
    for (int i = 0; i < 3; ++i) x = __shfl_down_sync(0xffffffffu, x, 1);
    written[threadIdx.x] = 7;
  }
  __syncthreads();
  out[threadIdx.x] = written[threadIdx.x % 32];
}

__global__ void missing_barrier(int* out) {
  // Each thread writes its slot, then reads its neighbour's with no barrier between: a race.
  __shared__ int slot[256];
  slot[threadIdx.x] = -1;
  __syncthreads();
  slot[threadIdx.x] = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = slot[(threadIdx.x + 255) % 256];
}

__global__ void different_barrier_sites(int*) {
  if (threadIdx.x < 10)
    __syncthreads();
  else
    __syncthreads();
}

__global__ void inner(int* out) { out[threadIdx.x] = 1; }

__global__ void nested_launch(int* out) {
  if (threadIdx.x == 0) gsa_emu::launch(1, 32, inner)(out);
}

__global__ void throws(int*) {
  if (threadIdx.x == 7) throw std::runtime_error("thrown in thread 7");
  __syncthreads();
}

bool run(const std::string& name) {
  if (name == "warp_sum") {
    std::vector<float> in(128), out(128);
    for (int i = 0; i < 128; ++i) in[i] = static_cast<float>(i);
    gsa_emu::launch(2, 64, warp_sum)(in.data(), out.data());
    for (int w = 0; w < 4; ++w) {
      float want = 0;
      for (int l = 0; l < 32; ++l) want += in[w * 32 + l];
      if (out[w * 32] != want) return std::printf("warp %d sum %g, want %g\n", w, out[w * 32], want), false;
    }
    return true;
  }
  if (name == "shuffle_edge") {
    std::vector<int> out(32);
    gsa_emu::launch(1, 32, shuffle_edge)(out.data());
    for (int l = 0; l < 32; ++l) {
      const int want = (l + 5 < 32 ? l + 5 : l) * 10;
      if (out[l] != want) return std::printf("lane %d got %d, want %d\n", l, out[l], want), false;
    }
    return true;
  }
  if (name == "votes") {
    std::vector<int> flags(64, 0), any(64), count(64);
    flags[40] = flags[41] = flags[63] = 1;  // only in the second warp
    gsa_emu::launch(1, 64, votes)(flags.data(), any.data(), count.data());
    for (int t = 0; t < 64; ++t) {
      if (any[t] != (t >= 32)) return std::printf("thread %d: __any_sync %d\n", t, any[t]), false;
      if (count[t] != 3) return std::printf("thread %d: __syncthreads_count %d\n", t, count[t]), false;
    }
    return true;
  }
  if (name == "shared_per_block") {
    std::vector<int> out(3 * 64);
    gsa_emu::launch(3, 64, shared_per_block)(out.data());
    for (int b = 0; b < 3; ++b)
      for (int t = 0; t < 64; ++t)
        if (out[b * 64 + t] != b * 100 + (t + 1) % 64)
          return std::printf("block %d thread %d read %d\n", b, t, out[b * 64 + t]), false;
    return true;
  }
  if (name == "grid_shape") {
    std::vector<int> out(6 * 48, -1);
    gsa_emu::launch(dim3(3, 2), dim3(16, 3), grid_shape)(out.data());
    for (int i = 0; i < 6 * 48; ++i)
      if (out[i] != (i / 48) * 1000 + i % 48) return std::printf("slot %d holds %d\n", i, out[i]), false;
    return true;
  }
  if (name == "atomics") {
    float sum = 0;
    int max_value = -1;
    gsa_emu::launch(5, 96, atomics)(&sum, &max_value);
    if (sum != 480.0f || max_value != 479) return std::printf("sum %g max %d\n", sum, max_value), false;
    return true;
  }
  if (name == "exited_threads_leave_the_barrier") {
    std::vector<int> out(64, 0);
    gsa_emu::launch(1, 64, exited_threads_leave_the_barrier)(out.data());
    for (int t = 0; t < 64; ++t)
      if (out[t] != (t < 40)) return std::printf("thread %d wrote %d\n", t, out[t]), false;
    return true;
  }
  if (name == "barrier_while_warp_ops_in_flight") {
    std::vector<int> out(64, 0);
    gsa_emu::launch(1, 64, barrier_while_warp_ops_in_flight)(out.data());
    for (int t = 0; t < 64; ++t)
      if (out[t] != 7) return std::printf("thread %d read %d\n", t, out[t]), false;
    return true;
  }
  if (name == "shuffled_order_exposes_a_missing_barrier") {
    // In thread order every read but thread 0's would come after its neighbour's write (1 stale
    // read of 256; in reverse order 255): a shuffled order reads about half of them stale.
    std::vector<int> out(256, 0);
    gsa_emu::launch(1, 256, missing_barrier)(out.data());
    int stale = 0;
    for (int t = 0; t < 256; ++t) stale += out[t] == -1;
    if (stale < 64 || stale > 192) return std::printf("%d of 256 reads stale\n", stale), false;
    return true;
  }
  if (name == "sort") {
    // Stable, on bits [0, 8) only: 0x105 and 0x205 tie there (input order kept); keys come out whole.
    const unsigned long long keys[5] = {0x100, 0x105, 0x003, 0x205, 0x0ff};
    const int ids[5] = {0, 1, 2, 3, 4};
    const int want[5] = {0, 2, 1, 3, 4};  // low bytes 0x00, 0x03, 0x05, 0x05, 0xff
    unsigned long long keys_out[5];
    int ids_out[5];
    size_t bytes = 0;
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, keys_out, ids, ids_out, 5, 0, 8);
    std::vector<char> temp(bytes);
    if (cub::DeviceRadixSort::SortPairs(temp.data(), bytes, keys, keys_out, ids, ids_out, 5, 0, 8) != cudaSuccess)
      return std::printf("SortPairs failed\n"), false;
    for (int i = 0; i < 5; ++i) {
      if (ids_out[i] != want[i]) return std::printf("position %d holds id %d, want %d\n", i, ids_out[i], want[i]), false;
      if (keys_out[i] != keys[want[i]]) return std::printf("key at %d is %llx\n", i, keys_out[i]), false;
    }
    return true;
  }
  // The errors: each must throw, with a message naming the problem.
  try {
    std::vector<int> ints(64, 0);
    std::vector<float> floats(64, 0);
    if (name == "divergent_barrier_kinds") gsa_emu::launch(1, 64, divergent_barrier_kinds)(ints.data());
    else if (name == "divergent_warp_op") gsa_emu::launch(1, 32, divergent_warp_op)(floats.data());
    else if (name == "partial_mask") gsa_emu::launch(1, 32, partial_mask)(floats.data());
    else if (name == "partial_warp") gsa_emu::launch(1, 48, shuffle_edge)(ints.data());
    else if (name == "throws") gsa_emu::launch(1, 32, throws)(ints.data());
    else if (name == "oversized_block") gsa_emu::launch(1, dim3(32, 33), throws)(ints.data());
    else if (name == "different_barrier_sites") gsa_emu::launch(1, 64, different_barrier_sites)(ints.data());
    else if (name == "nested_launch") gsa_emu::launch(1, 32, nested_launch)(ints.data());
    else return std::printf("unknown check %s\n", name.c_str()), false;
    std::printf("no error\n");
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  if (run(argv[1])) std::printf("ok\n");
  return 0;
}
