// C++ tests of the CUDA execution-model emulator (csrc/simt) itself: small CUDA kernels, written
// here and compiled like the project's kernels (-DIMGTX_SIMT, memory accesses instrumented), are
// launched through IMGTX_LAUNCH and their results checked against what CUDA specifies. This file:
// warp shuffles and votes, block barriers, atomics, shared memory (poison, sizes) and the seed.
// test_simt_ptx.cpp covers mma/ldmatrix/cp.async, test_simt_detectors.cpp the checks that fail a
// kernel. Built with -DIMGTX_FAST_SIMT=ON -DIMGTX_FAST_BUILD_TESTS=ON (target imgtx_simt_tests);
// run by tests/test_simt_emulator.py. Prints "N passed, N failed", exits non-zero on a failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "check.h"
#include "common/cuda_kernel.cuh"
#include "simt_check.h"

void run_simt_ptx_tests();        // test_simt_ptx.cpp
void run_simt_detector_tests();   // test_simt_detectors.cpp

namespace {

using imgtx_test::check;
using imgtx_test::expect_clean;
using imgtx_test::g_failed;
using imgtx_test::g_passed;

constexpr unsigned kFull = 0xffffffffu;

// ---- shuffles ----------------------------------------------------------------------------------
// Each lane shuffles lane * 10 (and a 64-bit value) in the ways below; out[lane * kShfl + k].
constexpr int kShfl = 13;

__global__ void shuffles(long long* out) {
  const int lane = int(threadIdx.x);
  const int v = lane * 10;
  long long* o = out + lane * kShfl;
  o[0] = __shfl_sync(kFull, v, (lane + 3) % 32);
  o[1] = __shfl_sync(kFull, v, 9, 8);  // src lane 9 of an 8-lane segment is lane 1 of it
  o[2] = __shfl_up_sync(kFull, v, 3);
  o[3] = __shfl_up_sync(kFull, v, 2, 8);
  o[4] = __shfl_down_sync(kFull, v, 5);
  o[5] = __shfl_down_sync(kFull, v, 3, 16);
  o[6] = __shfl_xor_sync(kFull, v, 4, 8);
  o[7] = __shfl_xor_sync(kFull, v, 8, 8);  // reaches across 8-lane segments
  int sum = v;
  for (int m = 16; m >= 1; m /= 2) sum += __shfl_xor_sync(kFull, sum, m);
  o[8] = sum;
  o[9] = __shfl_sync(kFull, (long long)lane << 40, 31 - lane);  // 64-bit values move whole
  o[10] = (long long)__shfl_xor_sync(kFull, 0.5 + lane, 1);     // as do doubles
  // A partial mask: only lanes 0-15 take part, in 16-lane segments.
  o[11] = lane < 16 ? __shfl_down_sync(0x0000ffffu, v, 1, 16) : -1;
  o[12] = lane >= 16 ? __shfl_sync(0xffff0000u, v, 20) : -1;  // lane 20 of the warp
}

// The expected results, from the CUDA Programming Guide's description of each shuffle: a source
// lane outside the caller's width-segment leaves the caller's own value, except that __shfl_sync
// takes srcLane modulo width and __shfl_xor_sync may read earlier segments (not later ones).
long long expected_shuffle(int lane, int k) {
  const auto val = [](int l) { return (long long)l * 10; };
  switch (k) {
    case 0: return val((lane + 3) % 32);
    case 1: return val(lane / 8 * 8 + 9 % 8);
    case 2: return val(lane >= 3 ? lane - 3 : lane);
    case 3: return val(lane % 8 >= 2 ? lane - 2 : lane);
    case 4: return val(lane + 5 < 32 ? lane + 5 : lane);
    case 5: return val(lane % 16 + 3 < 16 ? lane + 3 : lane);
    case 6: return val(lane ^ 4);
    case 7: return val((lane ^ 8) < lane ? lane ^ 8 : lane);
    case 8: return val(31 * 32 / 2);
    case 9: return (long long)(31 - lane) << 40;
    case 10: return (long long)(0.5 + (lane ^ 1));
    case 11: return lane < 16 ? val(lane % 16 + 1 < 16 ? lane + 1 : lane) : -1;
    default: return lane >= 16 ? val(20) : -1;
  }
}

void test_shuffles() {
  std::vector<long long> out(32 * kShfl, -7);
  if (!expect_clean([&] { IMGTX_LAUNCH(1, 32, 0, 0, shuffles)(out.data()); }, "shuffles")) return;
  int bad = 0;
  for (int lane = 0; lane < 32; ++lane)
    for (int k = 0; k < kShfl; ++k)
      if (out[size_t(lane * kShfl + k)] != expected_shuffle(lane, k)) {
        if (bad++ < 5)
          std::printf("  shuffle %d lane %d: got %lld, expected %lld\n", k, lane,
                      out[size_t(lane * kShfl + k)], expected_shuffle(lane, k));
      }
  check(bad == 0, "shuffles (idx/up/down/xor, width < 32, 64-bit, partial masks) match CUDA");
}

// ---- votes and __syncwarp ----------------------------------------------------------------------
__global__ void votes(unsigned* out) {
  const int lane = int(threadIdx.x);
  unsigned* o = out + lane * 8;
  o[0] = __ballot_sync(kFull, lane % 3 == 0);
  o[1] = __any_sync(kFull, lane == 17);
  o[2] = __any_sync(kFull, 0);
  o[3] = __all_sync(kFull, lane < 32);
  o[4] = __all_sync(kFull, lane != 5);
  __syncwarp();
  if (lane >= 8 && lane < 24) {  // a partial mask: only these lanes vote
    o[5] = __ballot_sync(0x00ffff00u, lane & 1);
    o[6] = __all_sync(0x00ffff00u, lane >= 8);
    o[7] = __any_sync(0x00ffff00u, lane == 30);  // lane 30 is not in the mask
  } else {
    o[5] = o[6] = o[7] = 99;
  }
}

void test_votes() {
  std::vector<unsigned> out(32 * 8, 12345);
  if (!expect_clean([&] { IMGTX_LAUNCH(1, 32, 0, 0, votes)(out.data()); }, "votes")) return;
  unsigned thirds = 0;
  for (int l = 0; l < 32; l += 3) thirds |= 1u << l;
  bool ok = true;
  for (int lane = 0; lane < 32; ++lane) {
    const unsigned* o = &out[size_t(lane) * 8];
    const bool in = lane >= 8 && lane < 24;
    ok = ok && o[0] == thirds && o[1] == 1 && o[2] == 0 && o[3] == 1 && o[4] == 0;
    ok = ok && o[5] == (in ? 0x00aaaa00u : 99u) && o[6] == (in ? 1u : 99u) && o[7] == (in ? 0u : 99u);
  }
  check(ok, "__ballot_sync/__any_sync/__all_sync (full and partial masks), __syncwarp");
}

// ---- block barriers ----------------------------------------------------------------------------
// A 3-D block of 8 x 4 x 3 = 96 threads (three warps): the reductions span warps, and
// threadIdx follows the linear order x fastest.
__global__ void block_reductions(int* out) {
  const int tid = int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  int* o = out + tid * 7;
  o[0] = __syncthreads_count(tid % 5 == 0);
  o[1] = __syncthreads_count(threadIdx.y == 1);
  o[2] = __syncthreads_and(tid < 96);
  o[3] = __syncthreads_and(tid != 50);
  o[4] = __syncthreads_or(tid == 77);
  o[5] = __syncthreads_or(0);
  __syncthreads();
  o[6] = int(threadIdx.x) | int(threadIdx.y) << 8 | int(threadIdx.z) << 16;
}

void test_block_reductions() {
  std::vector<int> out(96 * 7, -1);
  if (!expect_clean([&] { IMGTX_LAUNCH(1, dim3(8, 4, 3), 0, 0, block_reductions)(out.data()); },
                    "block reductions"))
    return;
  bool ok = true;
  for (int tid = 0; tid < 96; ++tid) {
    const int* o = &out[size_t(tid) * 7];
    ok = ok && o[0] == 20 && o[1] == 8 * 3 && o[2] == 1 && o[3] == 0 && o[4] == 1 && o[5] == 0;
    ok = ok && o[6] == ((tid % 8) | (tid / 8 % 4) << 8 | (tid / 32) << 16);
  }
  check(ok, "__syncthreads_count/_and/_or across three warps of a 3-D block; threadIdx order");
}

// ---- atomics -----------------------------------------------------------------------------------
struct AtomicsOut {
  int total;
  int maximum;
  int minimum;
  float sum;
  unsigned claim;
  int winners;
  unsigned long long wide;
  int shared_total[2];
  unsigned shared_or[2];
  int old_values[2][64];
};

__global__ void atomics(AtomicsOut* g) {
  IMGTX_SHARED(int, s_total);
  IMGTX_SHARED(unsigned, s_or);
  const int tid = int(threadIdx.x);
  if (tid == 0) {
    s_total = 0;
    s_or = 0;
  }
  __syncthreads();
  g->old_values[blockIdx.x][tid] = atomicAdd(&s_total, 2);
  atomicOr(&s_or, 1u << (tid % 32));
  atomicAdd(&g->total, 1);
  atomicMax(&g->maximum, tid * 3);
  atomicMin(&g->minimum, 100 - tid);
  atomicAdd(&g->sum, 0.5f);
  atomicAdd(&g->wide, 1ull << 33);
  if (atomicCAS(&g->claim, 0u, unsigned(tid + 1)) == 0u) atomicAdd(&g->winners, 1);
  __syncthreads();
  if (tid == 0) {
    g->shared_total[blockIdx.x] = s_total;
    g->shared_or[blockIdx.x] = s_or;
  }
}

void test_atomics() {
  AtomicsOut g{};
  g.minimum = 1000;
  if (!expect_clean([&] { IMGTX_LAUNCH(2, 64, 0, 0, atomics)(&g); }, "atomics")) return;
  check(g.total == 128 && g.maximum == 63 * 3 && g.minimum == 100 - 63 && g.sum == 64.0f &&
            g.wide == 128ull << 33,
        "global atomicAdd (int, float, u64), atomicMax, atomicMin");
  check(g.winners == 1 && g.claim >= 1 && g.claim <= 64, "atomicCAS: exactly one thread claims");
  bool ok = true;
  for (int b = 0; b < 2; ++b) {
    std::vector<int> old(g.old_values[b], g.old_values[b] + 64);
    std::sort(old.begin(), old.end());
    for (int i = 0; i < 64; ++i) ok = ok && old[size_t(i)] == 2 * i;
    ok = ok && g.shared_total[b] == 128 && g.shared_or[b] == kFull;
  }
  check(ok, "shared atomicAdd returns each old value once; shared atomicOr");
}

// ---- shared memory -----------------------------------------------------------------------------
constexpr int kStatic = 40, kDynamic = 72;

// Each thread checks that its bytes of the static and dynamic allocations start as poison (0xFF)
// and then overwrites them: every block of the grid must see fresh poison, not the last block's
// data. Thread 0 also reports each allocation's extent as the emulator sees it.
__global__ void shared_poison(int* bad, int* extents) {
  IMGTX_SHARED(unsigned char[kStatic], s);
  IMGTX_DYNAMIC_SHARED(unsigned char, d);
  const int tid = int(threadIdx.x);
  int n = 0;
  for (int i = tid; i < kStatic; i += int(blockDim.x)) n += s[i] != 0xFF;
  for (int i = tid; i < kDynamic; i += int(blockDim.x)) n += d[i] != 0xFF;
  float f;
  std::memcpy(&f, &s[tid % 9 * 4], 4);
  n += !std::isnan(f);  // poison reads as NaN through every float type
  atomicAdd(&bad[blockIdx.x], n);
  __syncthreads();  // the reads above cover bytes other threads write below
  for (int i = tid; i < kStatic; i += int(blockDim.x)) s[i] = (unsigned char)i;
  for (int i = tid; i < kDynamic; i += int(blockDim.x)) d[i] = (unsigned char)i;
  if (tid == 0 && blockIdx.x == 0) {
    extents[0] = simt::in_shared(s, kStatic) && !simt::in_shared(s, kStatic + 1);
    extents[1] = simt::in_shared(d, kDynamic) && !simt::in_shared(d, kDynamic + 1);
    extents[2] = reinterpret_cast<uintptr_t>(s) % 16 == 0 && reinterpret_cast<uintptr_t>(d) % 16 == 0;
    const uintptr_t sa = reinterpret_cast<uintptr_t>(s), da = reinterpret_cast<uintptr_t>(d);
    extents[3] = sa + kStatic <= da || da + kDynamic <= sa;
  }
}

// A __device__ helper's shared declaration is one variable per block, however often it is called.
__device__ float* helper_tile() {
  IMGTX_SHARED(float[2][64], tile);
  return &tile[0][0];
}
__global__ void shared_helper(int* same) {
  float* a = helper_tile();
  float* b = helper_tile();
  same[threadIdx.x] = a == b && simt::in_shared(a, 2 * 64 * sizeof(float));
}

void test_shared_memory() {
  std::vector<int> bad(4, 0), extents(4, 0);
  if (expect_clean([&] { IMGTX_LAUNCH(4, 32, kDynamic, 0, shared_poison)(bad.data(), extents.data()); },
                   "shared poison")) {
    check(bad == std::vector<int>(4, 0), "shared memory starts as 0xFF poison in every block");
    check(extents[0] == 1 && extents[1] == 1,
          "static and dynamic allocations have exactly the declared / launched sizes");
    check(extents[2] == 1 && extents[3] == 1, "shared allocations are 16-byte aligned and disjoint");
  }
  std::vector<int> same(32, 0);
  if (expect_clean([&] { IMGTX_LAUNCH(1, 32, 0, 0, shared_helper)(same.data()); }, "shared helper"))
    check(same == std::vector<int>(32, 1), "a helper's IMGTX_SHARED is one allocation per block");
}

// ---- the seed ----------------------------------------------------------------------------------
// Threads append their index to a list in the order they run (no barrier): the order is the
// scheduler's, which the seed chooses. Blocks append their index the same way.
__global__ void record_order(unsigned* counter, int* order) {
  order[atomicAdd(counter, 1u)] = int(threadIdx.x + blockIdx.x * blockDim.x);
}

std::vector<int> run_order(uint64_t seed) {
  simt::reseed(seed);
  unsigned counter = 0;
  std::vector<int> order(4 * 64, -1);
  expect_clean([&] { IMGTX_LAUNCH(4, 64, 0, 0, record_order)(&counter, order.data()); },
               "record order, seed " + std::to_string(seed));
  return order;
}

void test_seed() {
  const uint64_t before = simt::settings().seed;
  const std::vector<int> a = run_order(1), b = run_order(2), a_again = run_order(1);
  simt::reseed(before);
  std::vector<int> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  bool permutation = true;
  for (int i = 0; i < 4 * 64; ++i) permutation = permutation && sorted[size_t(i)] == i;
  check(permutation, "every thread of every block ran once");
  check(a != b, "two seeds run the threads in different orders");
  check(a == a_again, "the same seed runs them in the same order, whatever ran in between");
  bool block_order_differs = false;
  for (int i = 0; i < 4; ++i) block_order_differs |= a[size_t(i * 64)] / 64 != b[size_t(i * 64)] / 64;
  check(block_order_differs, "the seed also shuffles the order of the blocks");
}

}  // namespace

int main() {
  test_shuffles();
  test_votes();
  test_block_reductions();
  test_atomics();
  test_shared_memory();
  test_seed();
  run_simt_ptx_tests();
  run_simt_detector_tests();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
