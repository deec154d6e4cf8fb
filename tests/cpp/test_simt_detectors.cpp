// The emulator's checks, each on a small deliberately broken kernel: the launch must fail, and
// the message must name the kernel and the problem; the corrected kernel must run cleanly (so a
// check that fires on everything fails too). Shared-memory races and out-of-bounds reads are
// seen only through the access hooks (-fsanitize=kernel-address, csrc/simt/race.cpp): without
// them (IMGTX_FAST_SIMT_ACCESS_HOOKS=OFF) those tests are skipped, and an out-of-bounds write is
// caught by the guard-zone canaries instead.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "check.h"
#include "common/cuda_kernel.cuh"
#include "common/ptx.cuh"
#include "simt_check.h"

namespace {

using imgtx_test::check;
using imgtx_test::expect_clean;
using imgtx_test::expect_kernel_error;
using imgtx_test::launch_error;

constexpr unsigned kFull = 0xffffffffu;

// Runs fn once per seed: a check must fire whichever order the threads happen to run in.
template <class Fn>
void for_seeds(Fn&& fn) {
  const uint64_t before = simt::settings().seed;
  for (uint64_t seed : {0, 1, 2, 3, 4}) {
    simt::reseed(seed);
    fn(" (seed " + std::to_string(seed) + ")");
  }
  simt::reseed(before);
}

// ---- (a) shared-memory races ---------------------------------------------------------------
// Thread 0 writes, `reader` reads; `sync`: 0 none, 1 __syncthreads, 2 __syncwarp between them.
__global__ void write_then_read(int sync, int reader, int* out) {
  IMGTX_SHARED(int[4], s);
  if (threadIdx.x == 0) s[0] = 42;
  if (sync == 1) __syncthreads();
  if (sync == 2) __syncwarp();
  if (int(threadIdx.x) == reader) out[0] = s[0];
}

__global__ void both_write(int* out) {
  IMGTX_SHARED(int[4], s);
  if (threadIdx.x < 2) s[0] = int(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[0] = s[0];
}

void test_races() {
#if defined(IMGTX_SIMT_ACCESS_HOOKS)
  for_seeds([](const std::string& seed) {
    int out = -1;
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, write_then_read)(0, 1, &out); }, "write_then_read",
                        {"shared-memory race", "`s` + 0"}, "write/read race, no barrier" + seed);
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, both_write)(&out); }, "both_write",
                        {"shared-memory race", "write"}, "write/write race" + seed);
    // __syncwarp orders the lanes of its warp only.
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 64, 0, 0, write_then_read)(2, 32, &out); }, "write_then_read",
                        {"shared-memory race"}, "__syncwarp does not order two warps" + seed);
  });
#else
  std::printf("note: built without IMGTX_FAST_SIMT_ACCESS_HOOKS: race-detector tests skipped\n");
#endif
  for_seeds([](const std::string& seed) {
    int out = -1;
    if (expect_clean([&] { IMGTX_LAUNCH(1, 32, 0, 0, write_then_read)(1, 1, &out); },
                     "write, __syncthreads, read" + seed))
      check(out == 42, "the read after __syncthreads sees the write" + seed);
    out = -1;
    if (expect_clean([&] { IMGTX_LAUNCH(1, 64, 0, 0, write_then_read)(2, 1, &out); },
                     "write, __syncwarp, read in one warp" + seed))
      check(out == 42, "the read after __syncwarp sees the write" + seed);
  });
}

// ---- (b) divergent mma -------------------------------------------------------------------------
__global__ void divergent_mma(float* out) {
  uint32_t a[4] = {0, 0, 0, 0};
  float c[4] = {0, 0, 0, 0};
  if (threadIdx.x < 16)
    imgtx::ptx::mma_m16n8k16_f16(c, a, 0u, 0u);
  else
    imgtx::ptx::mma_m16n8k16_f16(c, a, 0u, 0u);
  out[threadIdx.x] = c[0];
}

void test_divergent_mma() {
  std::vector<float> out(32);
  for_seeds([&](const std::string& seed) {
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, divergent_mma)(out.data()); }, "divergent_mma",
                        {"divergent warp collective", "mma.sync.m16n8k16.f16"}, "mma at two call sites" + seed);
  });
}

// ---- (c) a missing cp.async wait ---------------------------------------------------------------
// Thread 0 copies 16 bytes into shared memory; thread 1 reads them after a __syncthreads. On a
// GPU the barrier does not wait for the copy, only cp.async.wait_group does. `wait`:
//   0 never: the thread exits with the copy in flight (an error of its own);
//   1 right after the barrier: the copy lands under the reader's feet (a race);
//   2 only after a second barrier: no race, but the reader saw the destination before the copy
//     landed, i.e. poison;
//   3 before the barrier: correct.
__global__ void cp_async_then_read(const uint4* src, int wait, unsigned* out) {
  IMGTX_SHARED(uint4[1], dst);
  if (threadIdx.x == 0) {
    imgtx::ptx::cp_async_cg16(&dst[0], &src[0], 16);
    imgtx::ptx::cp_async_commit();
    if (wait == 3) imgtx::ptx::cp_async_wait<0>();
  }
  __syncthreads();
  if (threadIdx.x == 1) out[0] = reinterpret_cast<const unsigned*>(&dst[0])[0];
  if (threadIdx.x == 0 && wait == 1) imgtx::ptx::cp_async_wait<0>();
  __syncthreads();
  if (threadIdx.x == 0 && wait == 2) imgtx::ptx::cp_async_wait<0>();
}

void test_missing_cp_async_wait() {
  const std::vector<uint4> src(1, make_uint4(0x1234, 5, 6, 7));
  for_seeds([&](const std::string& seed) {
    unsigned out = 0;
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, cp_async_then_read)(src.data(), 0, &out); },
                        "cp_async_then_read", {"exited with 1 cp.async copies in flight"},
                        "cp.async never waited" + seed);
#if defined(IMGTX_SIMT_ACCESS_HOOKS)
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, cp_async_then_read)(src.data(), 1, &out); },
                        "cp_async_then_read", {"shared-memory race"},
                        "cp.async waited only after the barrier: the landing races the read" + seed);
#endif
    out = 0;
    if (expect_clean([&] { IMGTX_LAUNCH(1, 32, 0, 0, cp_async_then_read)(src.data(), 2, &out); },
                     "cp.async waited after the read" + seed))
      check(out == 0xFFFFFFFFu, "a read before the wait sees poison, not the copy" + seed);
    out = 0;
    if (expect_clean([&] { IMGTX_LAUNCH(1, 32, 0, 0, cp_async_then_read)(src.data(), 3, &out); },
                     "cp.async waited before the barrier" + seed))
      check(out == 0x1234u, "with the wait before the barrier the reader sees the copy" + seed);
  });
}

// ---- (d) launch limits ---------------------------------------------------------------------------
// Each instance is its own function, so cudaFuncSetAttribute on one does not opt in another.
template <int kId>
__global__ void smem_user(int* ran) {
  IMGTX_DYNAMIC_SHARED(unsigned char, d);
  d[threadIdx.x] = 1;
  if (threadIdx.x == 0) ran[0] = kId;
}

__global__ void set_flag(int* ran) {
  if (threadIdx.x == 0) ran[0] = 1;
}

__global__ void big_static(int* ran) {
  IMGTX_SHARED(unsigned char[48 * 1024 + 16], big);
  big[threadIdx.x] = 1;
  ran[0] = 1;
}

__global__ void static_and_dynamic(int* ran) {
  IMGTX_SHARED(unsigned char[8 * 1024], s);
  IMGTX_DYNAMIC_SHARED(unsigned char, d);
  s[threadIdx.x] = d[threadIdx.x] = 1;
  ran[0] = 1;
}

template <int kId>
cudaError_t launch_smem(size_t bytes, int* ran) {
  return launch_error([&] { IMGTX_LAUNCH(1, 32, bytes, 0, smem_user<kId>)(ran); });
}

void test_launch_limits() {
  const int arch_before = simt::settings().arch;
  const int attr = cudaFuncAttributeMaxDynamicSharedMemorySize;
  int ran = 0;
  simt::settings().arch = 80;
  check(launch_smem<1>(48 * 1024, &ran) == cudaSuccess && ran == 1, "48 KB of dynamic shared memory needs no opt-in");
  ran = 0;
  check(launch_smem<2>(48 * 1024 + 16, &ran) == cudaErrorInvalidValue && ran == 0,
        "over 48 KB without cudaFuncSetAttribute: cudaErrorInvalidValue, the kernel does not run");
  check(cudaGetLastError() == cudaSuccess, "cudaGetLastError clears the launch error");
  check(cudaFuncSetAttribute(smem_user<2>, cudaFuncAttribute(attr), 100 * 1024) == cudaSuccess,
        "sm_80: opting in to 100 KB");
  check(launch_smem<2>(100 * 1024, &ran) == cudaSuccess && ran == 2, "sm_80: 100 KB runs after the opt-in");
  check(launch_smem<2>(100 * 1024 + 16, &ran) == cudaErrorInvalidValue, "more than the opted-in size fails");
  check(cudaFuncSetAttribute(smem_user<3>, cudaFuncAttribute(attr), 163 * 1024) == cudaSuccess &&
            cudaFuncSetAttribute(smem_user<3>, cudaFuncAttribute(attr), 163 * 1024 + 1) == cudaErrorInvalidValue,
        "sm_80: the opt-in limit is 163 KB");
  ran = 0;
  check(launch_smem<3>(163 * 1024, &ran) == cudaSuccess && ran == 3, "sm_80: 163 KB runs");

  simt::settings().arch = 86;
  ran = 0;
  check(launch_smem<3>(120 * 1024, &ran) == cudaErrorInvalidValue && ran == 0,
        "sm_86: 120 KB fails even for a kernel opted in to 163 KB");
  check(cudaFuncSetAttribute(smem_user<4>, cudaFuncAttribute(attr), 99 * 1024 + 1) == cudaErrorInvalidValue,
        "sm_86: opting in beyond 99 KB is an error");
  check(cudaFuncSetAttribute(smem_user<4>, cudaFuncAttribute(attr), 99 * 1024) == cudaSuccess &&
            launch_smem<4>(99 * 1024, &ran) == cudaSuccess && ran == 4,
        "sm_86: 99 KB runs after the opt-in");
  check(cudaFuncSetAttribute(static_and_dynamic, cudaFuncAttribute(attr), 99 * 1024) == cudaSuccess,
        "sm_86: static_and_dynamic opts in to 99 KB");
  expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 99 * 1024, 0, static_and_dynamic)(&ran); }, "static_and_dynamic",
                      {"exceeds sm_86's limit"}, "static + dynamic shared memory above the arch limit");
  simt::settings().arch = 80;

  ran = 0;
  expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, big_static)(&ran); }, "big_static",
                      {"static shared memory exceeds 48 KB", "`big`"}, "static shared memory over 48 KB");
  check(ran == 0, "the kernel with too much static shared memory does not get past the declaration");

  for (const dim3 block : {dim3(1025), dim3(32, 33), dim3(1, 1, 65), dim3(0)}) {
    ran = 0;
    const cudaError_t err = launch_error([&] { IMGTX_LAUNCH(1, block, 0, 0, set_flag)(&ran); });
    check(err == cudaErrorInvalidConfiguration && ran == 0,
          "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," + std::to_string(block.z) +
              "): cudaErrorInvalidConfiguration, not run");
  }
  check(launch_error([&] { IMGTX_LAUNCH(dim3(1, 65536), 32, 0, 0, set_flag)(&ran); }) ==
            cudaErrorInvalidConfiguration,
        "gridDim.y > 65535: cudaErrorInvalidConfiguration");
  ran = 0;
  check(launch_error([&] { IMGTX_LAUNCH(1, 1024, 0, 0, set_flag)(&ran); }) == cudaSuccess && ran == 1,
        "1024 threads are allowed");
  simt::settings().arch = arch_before;
}

// ---- (e) out-of-bounds shared memory -----------------------------------------------------------
// The index is a parameter, so the compiler cannot see (or exploit) the overflow.
__global__ void write_past_static(int index) {
  IMGTX_SHARED(float[8], s);
  float* p = &s[0];
  if (threadIdx.x == 0) p[index] = 1.0f;
}

__global__ void read_past_static(int index, float* out) {
  IMGTX_SHARED(float[8], s);
  const float* p = &s[0];
  if (threadIdx.x == 0) out[0] = p[index];
}

__global__ void write_past_dynamic(int index) {
  IMGTX_DYNAMIC_SHARED(unsigned char, d);
  if (threadIdx.x == 0) d[index] = 1;
}

void test_out_of_bounds() {
#if defined(__SANITIZE_ADDRESS__) && !defined(IMGTX_SIMT_ACCESS_HOOKS)
  // Under AddressSanitizer (scripts/sanitize.sh) the guard zones are ASan-poisoned: ASan itself
  // stops the process at such a write, which a test cannot survive. (GCC also defines
  // __SANITIZE_ADDRESS__ for the hooks' -fsanitize=kernel-address, which has no ASan runtime.)
  std::printf("note: built with AddressSanitizer: out-of-bounds tests skipped (ASan checks them)\n");
  return;
#endif
#if defined(IMGTX_SIMT_ACCESS_HOOKS)
  const char* write_msg = "out-of-bounds shared-memory write";  // the hook, at the access
#else
  const char* write_msg = "written out of bounds";  // the canaries, at the next barrier or exit
#endif
  expect_kernel_error([] { IMGTX_LAUNCH(1, 32, 0, 0, write_past_static)(8); }, "write_past_static",
                      {write_msg, "`s`"}, "write one past the end of an IMGTX_SHARED array");
  expect_kernel_error([] { IMGTX_LAUNCH(1, 32, 0, 0, write_past_static)(-1); }, "write_past_static",
                      {write_msg}, "write one before the start of an IMGTX_SHARED array");
  expect_kernel_error([] { IMGTX_LAUNCH(1, 32, 100, 0, write_past_dynamic)(100); }, "write_past_dynamic",
                      {write_msg, "dynamic shared memory"}, "write one past the end of dynamic shared memory");
  expect_clean([] { IMGTX_LAUNCH(1, 32, 100, 0, write_past_dynamic)(99); }, "write to the last dynamic byte");
  expect_clean([] { IMGTX_LAUNCH(1, 32, 0, 0, write_past_static)(7); }, "write to the last element");
#if defined(IMGTX_SIMT_ACCESS_HOOKS)
  float out = 0;
  expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, read_past_static)(8, &out); }, "read_past_static",
                      {"out-of-bounds shared-memory read", "`s`"}, "read one past the end of an IMGTX_SHARED array");
#endif
}

// ---- (f) a barrier only some threads reach -------------------------------------------------------
__global__ void barrier_in_branch(int* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1;
  __syncthreads();
}

// The other threads wait at a warp collective that needs the lanes stuck at the barrier.
__global__ void barrier_against_shuffle(int* out) {
  if (threadIdx.x < 16)
    __syncthreads();
  else
    out[threadIdx.x] = __shfl_sync(kFull, int(threadIdx.x), 0);
}

void test_divergent_barrier() {
  std::vector<int> out(32);
  for_seeds([&](const std::string& seed) {
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, barrier_in_branch)(out.data()); }, "barrier_in_branch",
                        {"divergent barrier|deadlock"}, "__syncthreads inside a branch" + seed);
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, barrier_against_shuffle)(out.data()); },
                        "barrier_against_shuffle", {"deadlock|divergent"},
                        "__syncthreads against a full-warp shuffle" + seed);
  });
}

// ---- (g) a lane exits while its warp shuffles ----------------------------------------------------
__global__ void lane_returns_early(int* out) {
  if (threadIdx.x == 5) return;
  const int v = int(threadIdx.x);
  out[threadIdx.x] = v + __shfl_xor_sync(kFull, v, 1);
}

void test_exited_lane() {
  std::vector<int> out(32);
  for_seeds([&](const std::string& seed) {
    expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, lane_returns_early)(out.data()); }, "lane_returns_early",
                        {"exited", "__shfl_xor_sync"}, "full-mask shuffle with an exited lane" + seed);
  });
}

// ---- (h) misaligned or non-shared ldmatrix / cp.async addresses ----------------------------------
// `mode` 0: all rows aligned (correct), 1: lane 3's row 2 bytes off, 2: lane 3's row in global memory.
__global__ void ldmatrix_rows(int mode, const uint16_t* global_rows, uint32_t* out) {
  IMGTX_SHARED(uint16_t[32][8], rows);
  const int lane = int(threadIdx.x);
  for (int c = 0; c < 8; ++c) rows[lane][c] = uint16_t(lane * 8 + c);
  __syncwarp();
  const void* row = &rows[lane][0];
  if (lane == 3 && mode == 1) row = reinterpret_cast<const char*>(row) + 2;
  if (lane == 3 && mode == 2) row = global_rows;
  uint32_t r[4];
  imgtx::ptx::ldmatrix_x4(r, row, false);
  out[lane] = r[0];
}

// `mode` 0: aligned (correct), 1: destination 8 bytes off, 2: source 8 bytes off, 3: global destination.
__global__ void cp_async_addresses(int mode, const unsigned char* src, unsigned char* global_dst) {
  IMGTX_SHARED(unsigned char[64], dst);
  unsigned char* d = mode == 1 ? &dst[8] : mode == 3 ? global_dst : &dst[0];
  const unsigned char* s = mode == 2 ? src + 8 : src;
  imgtx::ptx::cp_async_cg16(d, s, 16);
  imgtx::ptx::cp_async_commit();
  imgtx::ptx::cp_async_wait<0>();
}

void test_bad_addresses() {
  alignas(16) static uint16_t global_rows[8] = {};
  std::vector<uint32_t> out(32);
  expect_clean([&] { IMGTX_LAUNCH(1, 32, 0, 0, ldmatrix_rows)(0, global_rows, out.data()); }, "ldmatrix, aligned rows");
  expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, ldmatrix_rows)(1, global_rows, out.data()); }, "ldmatrix_rows",
                      {"ldmatrix", "lane 3", "not 16-byte aligned"}, "ldmatrix with a misaligned row");
  expect_kernel_error([&] { IMGTX_LAUNCH(1, 32, 0, 0, ldmatrix_rows)(2, global_rows, out.data()); }, "ldmatrix_rows",
                      {"ldmatrix", "lane 3", "not inside a shared-memory allocation"},
                      "ldmatrix with a row outside shared memory");

  alignas(16) static unsigned char src[32] = {}, global_dst[16] = {};
  expect_clean([&] { IMGTX_LAUNCH(1, 1, 0, 0, cp_async_addresses)(0, src, global_dst); }, "cp.async, aligned");
  expect_kernel_error([&] { IMGTX_LAUNCH(1, 1, 0, 0, cp_async_addresses)(1, src, global_dst); }, "cp_async_addresses",
                      {"destination is not 16-byte aligned"}, "cp.async to a misaligned destination");
  expect_kernel_error([&] { IMGTX_LAUNCH(1, 1, 0, 0, cp_async_addresses)(2, src, global_dst); }, "cp_async_addresses",
                      {"source is not 16-byte aligned"}, "cp.async from a misaligned source");
  expect_kernel_error([&] { IMGTX_LAUNCH(1, 1, 0, 0, cp_async_addresses)(3, src, global_dst); }, "cp_async_addresses",
                      {"not inside a shared-memory allocation"}, "cp.async to global memory");
}

}  // namespace

void run_simt_detector_tests() {
  test_races();
  test_divergent_mma();
  test_missing_cp_async_wait();
  test_launch_limits();
  test_out_of_bounds();
  test_divergent_barrier();
  test_exited_lane();
  test_bad_addresses();
}
