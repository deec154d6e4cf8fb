// The emulated PTX instructions (csrc/simt/ptx.cpp, reached through common/ptx.cuh) against the
// PTX ISA: mma.sync m16n8k16 (f16, bf16) and m16n8k8 (tf32), ldmatrix .x4 (.trans), cp.async
// groups. The fragment tables below are written from the PTX ISA manual ("Matrix Fragments for
// mma.m16n8k8 / mma.m16n8k16 with floating point type", and 9.7.14.5.15 "Warp-level matrix load
// instruction: ldmatrix") in the manual's own piecewise form, independently of the emulator's
// arithmetic form, so a slip in either shows up as a mismatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "common/cuda_kernel.cuh"
#include "common/ptx.cuh"
#include "simt_check.h"

namespace {

using imgtx_test::check;
using imgtx_test::expect_clean;

// ---- fragment tables (PTX ISA) -----------------------------------------------------------------
// groupID = %laneid >> 2, threadID_in_group = %laneid % 4.
struct RowCol {
  int row, col;
};
int group_id(int lane) { return lane >> 2; }
int thread_in_group(int lane) { return lane % 4; }

// m16n8k16 .f16/.bf16 multiplicand A (16 x 16), elements a0..a7 (two per .f16x2 register):
//   row = groupID for ai with 0 <= i < 2 || 4 <= i < 6, groupID + 8 otherwise
//   col = threadID_in_group * 2 + (i & 1) for i < 4, the same + 8 for i >= 4
RowCol k16_a(int lane, int i) {
  const int row = (i < 2 || (i >= 4 && i < 6)) ? group_id(lane) : group_id(lane) + 8;
  const int col = thread_in_group(lane) * 2 + (i & 1) + (i >= 4 ? 8 : 0);
  return {row, col};
}
// m16n8k16 .f16/.bf16 multiplicand B (16 x 8), elements b0..b3:
//   row = threadID_in_group * 2 + (i & 1) for i < 2, the same + 8 for i >= 2; col = groupID
RowCol k16_b(int lane, int i) {
  return {thread_in_group(lane) * 2 + (i & 1) + (i >= 2 ? 8 : 0), group_id(lane)};
}
// Accumulators C/D (16 x 8, .f32) of both shapes, c0..c3:
//   row = groupID for i < 2, groupID + 8 for i >= 2; col = threadID_in_group * 2 + (i & 1)
RowCol acc(int lane, int i) {
  return {i < 2 ? group_id(lane) : group_id(lane) + 8, thread_in_group(lane) * 2 + (i & 1)};
}
// m16n8k8 .tf32 multiplicand A (16 x 8), a0..a3 (one per register):
//   row = groupID for a0 and a2, groupID + 8 for a1 and a3
//   col = threadID_in_group for a0 and a1, threadID_in_group + 4 for a2 and a3
RowCol k8_tf32_a(int lane, int i) {
  const int row = (i == 0 || i == 2) ? group_id(lane) : group_id(lane) + 8;
  const int col = (i == 0 || i == 1) ? thread_in_group(lane) : thread_in_group(lane) + 4;
  return {row, col};
}
// m16n8k8 .tf32 multiplicand B (8 x 8), b0 and b1: row = threadID_in_group (+ 4 for b1), col = groupID
RowCol k8_tf32_b(int lane, int i) {
  return {i == 0 ? thread_in_group(lane) : thread_in_group(lane) + 4, group_id(lane)};
}

// ---- mma ---------------------------------------------------------------------------------------
enum class Half { kF16, kBF16 };

uint32_t half_bits(float v, Half type) {
  return type == Half::kF16 ? __half_as_ushort(__float2half_rn(v))
                            : __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

// One warp: each lane packs its fragments of A (16 x 16), B (16 x 8, row-major k x n) and
// C (16 x 8) by the tables, issues the mma, and stores its part of D by the table.
template <Half kType>
__global__ void mma_k16(const float* A, const float* B, const float* C, float* D) {
  const int lane = int(threadIdx.x);
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4];
  for (int i = 0; i < 8; ++i) {  // "elements low to high": a0 in the low half of register 0
    const RowCol rc = k16_a(lane, i);
    a[i / 2] |= half_bits(A[rc.row * 16 + rc.col], kType) << (16 * (i % 2));
  }
  for (int i = 0; i < 4; ++i) {
    const RowCol rc = k16_b(lane, i);
    b[i / 2] |= half_bits(B[rc.row * 8 + rc.col], kType) << (16 * (i % 2));
  }
  for (int i = 0; i < 4; ++i) c[i] = C[acc(lane, i).row * 8 + acc(lane, i).col];
  if (kType == Half::kF16)
    imgtx::ptx::mma_m16n8k16_f16(c, a, b[0], b[1]);
  else
    imgtx::ptx::mma_m16n8k16_bf16(c, a, b[0], b[1]);
  for (int i = 0; i < 4; ++i) D[acc(lane, i).row * 8 + acc(lane, i).col] = c[i];
}

__global__ void mma_k8_tf32(const float* A, const float* B, const float* C, float* D) {
  const int lane = int(threadIdx.x);
  uint32_t a[4], b[2];
  float c[4];
  for (int i = 0; i < 4; ++i) a[i] = __float_as_uint(A[k8_tf32_a(lane, i).row * 8 + k8_tf32_a(lane, i).col]);
  for (int i = 0; i < 2; ++i) b[i] = __float_as_uint(B[k8_tf32_b(lane, i).row * 8 + k8_tf32_b(lane, i).col]);
  for (int i = 0; i < 4; ++i) c[i] = C[acc(lane, i).row * 8 + acc(lane, i).col];
  imgtx::ptx::mma_m16n8k8_tf32(c, a, b[0], b[1]);
  for (int i = 0; i < 4; ++i) D[acc(lane, i).row * 8 + acc(lane, i).col] = c[i];
}

// Small integers and halves: exact in f16, bf16 and tf32, and every sum of products is exact in
// fp32, so D must equal the double-precision reference bit for bit. Random values make any
// permutation of a fragment table change the result.
std::vector<float> small_values(std::mt19937& rng, size_t n) {
  std::uniform_int_distribution<int> d(-12, 12);
  std::vector<float> v(n);
  for (float& x : v) x = float(d(rng)) * 0.5f;
  return v;
}

template <class Launch>
void check_mma(Launch&& launch, const std::vector<float>& A, const std::vector<float>& B,
               const std::vector<float>& C, int K, const std::string& what) {
  std::vector<float> D(16 * 8, NAN);
  const uint64_t mma_before = simt::counters().mma;
  if (!expect_clean([&] { launch(D.data()); }, what)) return;
  int bad = 0;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double ref = C[size_t(m * 8 + n)];
      for (int k = 0; k < K; ++k) ref += double(A[size_t(m * K + k)]) * double(B[size_t(k * 8 + n)]);
      if (D[size_t(m * 8 + n)] != float(ref) && bad++ < 4)
        std::printf("  %s D[%d][%d] = %g, expected %g\n", what.c_str(), m, n, D[size_t(m * 8 + n)], ref);
    }
  check(bad == 0, what + ": D = A B + C exactly, through the PTX ISA fragment tables");
  check(simt::counters().mma == mma_before + 1, what + ": counted as one mma");
}

void test_mma() {
  std::mt19937 rng(2024);
  for (int rep = 0; rep < 3; ++rep) {
    const std::vector<float> A = small_values(rng, 16 * 16), B = small_values(rng, 16 * 8),
                             C = small_values(rng, 16 * 8);
    check_mma([&](float* D) { IMGTX_LAUNCH(1, 32, 0, 0, mma_k16<Half::kF16>)(A.data(), B.data(), C.data(), D); },
              A, B, C, 16, "mma m16n8k16 f16");
    check_mma([&](float* D) { IMGTX_LAUNCH(1, 32, 0, 0, mma_k16<Half::kBF16>)(A.data(), B.data(), C.data(), D); },
              A, B, C, 16, "mma m16n8k16 bf16");
    const std::vector<float> A8 = small_values(rng, 16 * 8), B8 = small_values(rng, 8 * 8);
    check_mma([&](float* D) { IMGTX_LAUNCH(1, 32, 0, 0, mma_k8_tf32)(A8.data(), B8.data(), C.data(), D); },
              A8, B8, C, 8, "mma m16n8k8 tf32");
  }
}

// ---- ldmatrix ----------------------------------------------------------------------------------
// Four 8 x 8 matrices of 16-bit elements, element (j, r, c) = 0x1000 j + 0x100 r + c. Lane l
// supplies row l % 8 of matrix l / 8; rows are stored in a scrambled order with padding, since
// the manual says "consecutive instances of row need not be stored contiguously".
constexpr int kRowPitch = 24;  // 48 bytes: rows stay 16-byte aligned but are not contiguous

int row_slot(int lane) { return (lane * 5 + 3) % 32; }
uint16_t element(int j, int r, int c) { return uint16_t(0x1000 * j + 0x100 * r + c); }

__global__ void ldmatrix_x4(int trans, uint32_t* out) {
  IMGTX_SHARED(uint16_t[32][kRowPitch], rows);
  const int lane = int(threadIdx.x);
  for (int c = 0; c < 8; ++c) rows[row_slot(lane)][c] = element(lane / 8, lane % 8, c);
  __syncwarp();  // the other lanes' rows are read by the ldmatrix below
  uint32_t r[4];
  imgtx::ptx::ldmatrix_x4(r, &rows[row_slot(lane)][0], trans != 0);
  for (int j = 0; j < 4; ++j) out[lane * 4 + j] = r[j];
}

// The manual's distribution (Figure 104): a group of four lanes holds one row, lane l holding
// row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1, the lower-indexed in the low 16 bits; register
// j holds matrix j. With .trans the matrix is read column-major: lane l holds column l / 4,
// rows 2 (l % 4) and 2 (l % 4) + 1.
uint32_t expected_ldmatrix(int lane, int j, bool trans) {
  const int fixed = lane / 4, first = 2 * (lane % 4);
  const uint16_t lo = trans ? element(j, first, fixed) : element(j, fixed, first);
  const uint16_t hi = trans ? element(j, first + 1, fixed) : element(j, fixed, first + 1);
  return uint32_t(lo) | uint32_t(hi) << 16;
}

void test_ldmatrix() {
  for (int trans = 0; trans < 2; ++trans) {
    const std::string what = trans ? "ldmatrix .x4.trans" : "ldmatrix .x4";
    std::vector<uint32_t> out(32 * 4, 0);
    if (!expect_clean([&] { IMGTX_LAUNCH(1, 32, 0, 0, ldmatrix_x4)(trans, out.data()); }, what)) continue;
    int bad = 0;
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < 4; ++j)
        if (out[size_t(lane * 4 + j)] != expected_ldmatrix(lane, j, trans) && bad++ < 4)
          std::printf("  %s lane %d r%d = %08x, expected %08x\n", what.c_str(), lane, j,
                      out[size_t(lane * 4 + j)], expected_ldmatrix(lane, j, trans));
    check(bad == 0, what + ": every lane's registers follow the PTX ISA distribution");
  }
}

// ---- cp.async ----------------------------------------------------------------------------------
// One thread: two groups ({dst0}, {dst1, dst2 zero-filled}); the destination is snapshot (as
// 32-bit words) before any wait, after wait_group 1 and after wait_group 0. The destination
// holds data before the copies are issued: an issued copy makes it read as poison (0xFF bytes)
// until the wait that lands it.
__global__ void cp_async_groups(const uint4* src, uint32_t* snapshots) {
  IMGTX_SHARED(uint4[3], dst);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(&dst[0]);
  for (int i = 0; i < 3; ++i) dst[i] = make_uint4(7, 7, 7, 7);
  imgtx::ptx::cp_async_cg16(&dst[0], &src[0], 16);
  imgtx::ptx::cp_async_commit();
  imgtx::ptx::cp_async_cg16(&dst[1], &src[1], 16);
  imgtx::ptx::cp_async_cg16(&dst[2], &src[2], 0);  // src-size 0: 16 bytes of zeros
  imgtx::ptx::cp_async_commit();
  for (int i = 0; i < 12; ++i) snapshots[i] = words[i];
  imgtx::ptx::cp_async_wait<1>();  // at most one group pending: the older one has landed
  for (int i = 0; i < 12; ++i) snapshots[12 + i] = words[i];
  imgtx::ptx::cp_async_wait<0>();
  for (int i = 0; i < 12; ++i) snapshots[24 + i] = words[i];
}

void test_cp_async() {
  std::vector<uint4> src(3);
  for (unsigned i = 0; i < 3; ++i) src[i] = make_uint4(0x100 * i + 1, 0x100 * i + 2, 0x100 * i + 3, 0x100 * i + 4);
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src.data());
  std::vector<uint32_t> snap(36, 0);
  if (!expect_clean([&] { IMGTX_LAUNCH(1, 1, 0, 0, cp_async_groups)(src.data(), snap.data()); }, "cp.async"))
    return;
  bool before = true, after1 = true, after0 = true;
  for (int w = 0; w < 12; ++w) {
    const uint32_t landed = w < 8 ? s[w] : 0u;  // dst2 was zero-filled
    before = before && snap[size_t(w)] == 0xFFFFFFFFu;
    after1 = after1 && snap[size_t(12 + w)] == (w < 4 ? landed : 0xFFFFFFFFu);
    after0 = after0 && snap[size_t(24 + w)] == landed;
  }
  check(before, "cp.async: before any wait the destinations read as poison (0xFF)");
  check(after1, "cp.async: wait_group 1 with two groups lands only the older group");
  check(after0, "cp.async: wait_group 0 lands everything; src-size 0 writes zeros");
}

}  // namespace

void run_simt_ptx_tests() {
  test_mma();
  test_ldmatrix();
  test_cp_async();
}
