// CUDA codebook lookup (semantics: imgtx/codebook.h). Three stream-ordered kernels:
//   1. pack:     codebook -> fp32 [Dpad][Kpad] (coalesced tiles), norm32, |c|^2 in fp64, and C;
//                for the tensor-core pass also the tf32 low parts of the packed codes.
//   2. score:    z . c with an argmin epilogue; each block owns 128 rows and one contiguous
//                range of code tiles, and writes a per-row (best, second, index). Two versions:
//                score_tc_kernel (tensor cores, 3xTF32 mma.sync, sm_80+: the default) and
//                score_kernel (fp32 SIMT FMAs: the fallback, and IMGTX_FAST_CODEBOOK_SIMT=1).
//   3. finalize: one block per row: merges the code ranges, certifies the fast argmin with the
//                pass's rounding bound (certify.h), else re-checks in float64 the candidate codes
//                (those an fp32 re-score puts within the bound of the best), or re-searches all
//                codes where the fast scores are meaningless (overflow); then writes every output.
// The fp64 parts mirror codebook_cpu.cpp operation by operation (the summation order of
// common/fp64_sum.h, no FMA contraction) so both backends give bit-identical outputs.
//
// Why 3xTF32 and not bf16x3. Exactness never depends on the choice (uncertified rows are
// re-checked); the error bound decides how many rows need the re-check. In units of u = 2^-24
// the dot product's bound is c |z||c| with (certify.h; the same conservative mma model for both
// tensor-core passes, 2u per addend and per truncation):
//   fp32 SIMT FMA chain:  c ~ D
//   3xTF32 (tf32 = 11 bits; the split leaves 2^-22 |x|, 3 products): c ~ 14 + 36 D / 8
//   bf16x3 (bf16 = 8 bits; the split leaves 2^-16 |x|, 3 products): c ~ 770 + 68 D / 16
// so at D = 32 / 64 / 256: 158 / 302 / 1166 for 3xTF32 against 906 / 1042 / 1858 for bf16x3.
// The dropped lo*lo term and the rounded lo parts give bf16x3 a D-independent floor of ~770u:
// 5.7x / 3.5x / 1.6x the 3xTF32 bound at those D, 16-27x the fp32 bound at the small D of most
// VQ codebooks, while 3xTF32 stays within ~5x of fp32 (its uncertified rows are about the CPU's).
// bf16x3 would halve the tensor-core time (bf16 mma runs at twice tf32's rate), but a re-checked
// row costs an fp32 re-score over all K codes, ~3 rows' worth of the 3xTF32 pass (A100/H100
// fp32 vs tf32 rates), so bf16x3 only wins while its extra uncertified rows stay under ~19% of
// all rows: true on random data, not where latents sit close to their codes (near-ties are the
// case the certification exists for), where a 3.5-6x wider bound multiplies the re-checks. fp16
// and bf16 inputs are exact in tf32 (x_l = 0). Timing both on a GPU is left open.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "codebook/certify.h"
#include "common/cuda_check.h"
#include "common/cuda_dtype.cuh"
#include "common/cuda_kernel.cuh"
#include "common/fp64_sum.h"
#include "common/ptx.cuh"
#include "imgtx/codebook.h"

namespace imgtx {
namespace {

// ---- tile shape of the score kernel --------------------------------------------------------
constexpr int kBM = 128, kBN = 64, kBK = 16;  // rows x codes per block, dims per smem stage
constexpr int kTM = 8, kTN = 4;               // per-thread register tile
constexpr int kThreads = 256;                 // (kBM / kTM) x (kBN / kTN) = 16 x 16
constexpr int kLDA = kBM + 4;                 // pad: fewer bank conflicts on the z transpose
constexpr int kZPerThread = kBM * kBK / kThreads;
static_assert(kBM / kTM * (kBN / kTN) == kThreads, "thread grid must cover the tile");
static_assert(kBK * kBN == 4 * kThreads, "one float4 of codes per thread per stage");

// ---- tile shape of the tensor-core score kernel ---------------------------------------------
// The same 128 x 64 block tile and 256 threads (so both kernels share the plan and the packed
// codebook); 8 warps as 4 (rows) x 2 (codes), each warp 32 rows x 32 codes = 2 x 4 mma tiles of
// m16n8, 8 dims per shared-memory stage (one k8 step: 24 mma per warp). z and codes are kept as
// tf32 hi and lo planes, fp32 in shared memory: the +8 pads make every A and B fragment load
// hit 32 different banks (bank 8 t + g).
constexpr int kTcBK = 8;
constexpr int kTcLDA = kBM + 8, kTcLDB = kBN + 8;
constexpr int kTcWarpsM = 4, kTcWarpsN = 2;
constexpr int kTcWarpRows = kBM / kTcWarpsM, kTcWarpCodes = kBN / kTcWarpsN;
constexpr int kTcMTiles = kTcWarpRows / 16, kTcNTiles = kTcWarpCodes / 8;
constexpr int kTcZPerThread = kBM * kTcBK / kThreads;
static_assert(kTcWarpsM * kTcWarpsN * 32 == kThreads, "one warp per 32 x 32 sub-tile");
static_assert(kTcBK * kBN / 4 * 2 == kThreads, "one float4 of hi or lo codes per thread per stage");
static_assert(kTcMTiles == 2 && kTcNTiles == 4, "the epilogue's row slots assume 2 x 4 mma tiles");

constexpr int kPackThreads = 128;
constexpr int kFinThreads = 128;               // 4 warps; the reductions below assume this
constexpr int kZCache = 2048;                  // z rows up to this dim are kept in smem
constexpr int64_t kTargetBlocks = 512;         // split the codes until about this many blocks
constexpr int64_t kMinTilesPerSplit = 4;       // ...but give each block >= 256 codes

// 1 / max(|c|, 1e-12) exactly as codebook_cpu.cpp's cosine_scale (std::max keeps a NaN norm).
__device__ __forceinline__ double cosine_scale(double norm2) {
  const double n = sqrt(norm2);
  return 1.0 / (n < 1e-12 ? 1e-12 : n);
}

// Merge two (best, index, second) summaries of disjoint code sets. Exact ties -> lower index.
__device__ __forceinline__ void merge_top2(float& best, float& second, int& idx, float ob,
                                           float os, int oi) {
  second = fminf(fminf(second, os), fmaxf(best, ob));
  if (ob < best || (ob == best && oi < idx)) {
    best = ob;
    idx = oi;
  }
}

// x rounded to tf32 (11 significant bits), to nearest with ties away from zero (cvt.rna's
// rounding), done on the bits; NaN and Inf pass unchanged, finite values past tf32's range
// round to Inf.
__device__ __forceinline__ float tf32_round(float x) {
  uint32_t b = __float_as_uint(x);
  if ((b & 0x7f800000u) != 0x7f800000u) b = (b + 0x1000u) & 0xffffe000u;
  return __uint_as_float(b);
}

// ---- workspace views and plan numbers, shared by the kernels ------------------------------
// Counters of the finalize kernel (in the workspace; counted when Work::count_stats).
enum Stat { kStatRowsRechecked, kStatRowsFullSearch, kStatCodesRechecked, kNumStats };

struct Work {
  float* packed;             // [Dpad][Kpad] fp32 codes (unit codes for cosine), 0 for dead ones
  float* packed_lo;          // [Dpad][Kpad] rt(packed - rt(packed)) (tensor cores only)
  float* norm32;             // [Kpad] |c|^2 as fp32 (0 for cosine); +inf for dead/padding codes
  double* norm2;             // [Kpad] |c|^2 in fp64, canonical order (non-finite: dead code)
  unsigned long long* cmax;  // C = max |c| over finite codes, as the bits of a double
  float* pbest;              // [splits][N] per code range: best score,
  float* psecond;            //   second-best score,
  int* pidx;                 //   and index of the best
  unsigned long long* stats;  // [kNumStats]
  int64_t N, Kpad, Dpad;
  int chunks, tiles, tiles_per_split, splits;  // Dpad / kBK, Kpad / kBN, code split
  int tc_chunks;             // ceil(D / kTcBK): the tensor-core kernel's stages per tile
  bool cosine;
  bool tensor_cores;         // the score pass: score_tc_kernel (else score_kernel)
  bool count_stats;
};

__device__ __forceinline__ int64_t z_offset(const CodebookLookupParams& p, int64_t n) {
  return (n / p.rows) * p.z_stride_batch + (n % p.rows) * p.z_stride_row;
}

// Both score passes: the element offset of each of the block's kBM rows of z (-1 past N), then
// a barrier.
__device__ __forceinline__ void fill_row_offsets(const CodebookLookupParams& p, const Work& w,
                                                 int64_t row0, int64_t* row_off) {
  for (int i = threadIdx.x; i < kBM; i += kThreads) {
    const int64_t n = row0 + i;
    row_off[i] = n < w.N ? z_offset(p, n) : -1;
  }
  __syncthreads();
}

// ---- 1. pack -----------------------------------------------------------------------------
// One thread per code: the fp64 norm is summed in common/fp64_sum.h's order, like the CPU's.
template <class LC>
__global__ __launch_bounds__(kPackThreads) void pack_codebook_kernel(CodebookLookupParams p,
                                                                     Work w) {
  const int64_t k = int64_t(blockIdx.x) * kPackThreads + threadIdx.x;
  if (k >= w.Kpad) return;
  float* col = w.packed + k;
  const int64_t base = k * p.cb_stride_code, D = p.dim;
  double n2 = __longlong_as_double(0x7ff8000000000000LL);  // padding codes: NaN = dead
  if (k < p.num_codes) {  // |c|^2 in the canonical order of common/fp64_sum.h, as the CPU
    double s[kSumLanes] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int64_t d0 = 0; d0 < D; d0 += kSumLanes) {
#pragma unroll
      for (int l = 0; l < kSumLanes; ++l) {
        if (d0 + l < D) {
          const double v = LC::load(p.codebook, base + (d0 + l) * p.cb_stride_dim);
          s[l] = __dadd_rn(s[l], __dmul_rn(v, v));  // v*v is exact; the order is what matters
        }
      }
    }
    n2 = combine_sum_lanes(s);
  }
  w.norm2[k] = n2;
  if (isfinite(n2)) {
    const double scale = w.cosine ? cosine_scale(n2) : 1.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = LC::load(p.codebook, base + d * p.cb_stride_dim);
      const float f = __double2float_rn(__dmul_rn(v, scale));
      col[d * w.Kpad] = f;
      if (w.tensor_cores) w.packed_lo[k + d * w.Kpad] = tf32_round(__fsub_rn(f, tf32_round(f)));
    }
    w.norm32[k] = w.cosine ? 0.f : __double2float_rn(n2);
    // Exactly the CPU's norm_max, so both backends certify the same rows; doubles >= +0
    // order like their bits.
    if (!w.cosine) atomicMax(w.cmax, (unsigned long long)__double_as_longlong(sqrt(n2)));
  } else {
    for (int64_t d = 0; d < D; ++d) col[d * w.Kpad] = 0.f;
    if (w.tensor_cores)
      for (int64_t d = 0; d < D; ++d) w.packed_lo[k + d * w.Kpad] = 0.f;
    w.norm32[k] = __int_as_float(0x7f800000);  // +inf: never picked, never a second best
  }
  for (int64_t d = D; d < w.Dpad; ++d) col[d * w.Kpad] = 0.f;  // zero dims add exact zeros
  if (w.tensor_cores)
    for (int64_t d = D; d < w.Dpad; ++d) w.packed_lo[k + d * w.Kpad] = 0.f;
}

// ---- 2. score ----------------------------------------------------------------------------
// score(n,k) = fl(norm32[k] - 2 * acc), acc = one sequential fp32 FMA chain over d per (n,k):
// exactly the rounding model certify.h assumes. Thread (ty,tx) owns rows ty*8.. and codes
// tx*4.. of every tile, seen in increasing k, so strict '<' keeps the lowest index on ties.
template <class LZ, bool kDimContig>
__global__ __launch_bounds__(kThreads, 2) void score_kernel(CodebookLookupParams p, Work w) {
  IMGTX_SHARED(float[2][kBK][kLDA], As);  // z chunk, [d][row]
  IMGTX_SHARED(float[2][kBK][kBN], Bs);  // code chunk, [d][code]
  IMGTX_SHARED(int64_t[kBM], row_off); // element offset of each row, -1 past N

  const int tid = threadIdx.x, tx = tid % (kBN / kTN), ty = tid / (kBN / kTN);
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int t_begin = blockIdx.y * w.tiles_per_split;
  const int t_end = min(t_begin + w.tiles_per_split, w.tiles);
  fill_row_offsets(p, w, row0, row_off);

  // Staging map: consecutive threads walk the contiguous axis of z (coalesced loads).
  float zr[kZPerThread];
  float4 cr;
  int lt = t_begin, lc = 0;  // next (tile, chunk) to load
  auto load_next = [&]() {
    const int64_t d0 = int64_t(lc) * kBK;
#pragma unroll
    for (int j = 0; j < kZPerThread; ++j) {
      const int e = tid + j * kThreads;
      const int r = kDimContig ? e / kBK : e % kBM, dd = kDimContig ? e % kBK : e / kBM;
      const int64_t off = row_off[r], d = d0 + dd;
      zr[j] = (off >= 0 && d < p.dim) ? LZ::load(p.z, off + d * p.z_stride_dim) : 0.f;
    }
    cr = *reinterpret_cast<const float4*>(w.packed + (d0 + tid / (kBN / 4)) * w.Kpad +
                                          int64_t(lt) * kBN + (tid % (kBN / 4)) * 4);
    if (++lc == w.chunks) { lc = 0; ++lt; }
  };
  auto store_stage = [&](int buf) {
#pragma unroll
    for (int j = 0; j < kZPerThread; ++j) {
      const int e = tid + j * kThreads;
      const int r = kDimContig ? e / kBK : e % kBM, dd = kDimContig ? e % kBK : e / kBM;
      As[buf][dd][r] = zr[j];
    }
    *reinterpret_cast<float4*>(&Bs[buf][tid / (kBN / 4)][(tid % (kBN / 4)) * 4]) = cr;
  };

  const float inf = __int_as_float(0x7f800000);
  float acc[kTM][kTN], best[kTM], second[kTM];
  int bidx[kTM];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    best[i] = second[i] = inf;
    bidx[i] = INT_MAX;
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;
  }

  const int steps = (t_end - t_begin) * w.chunks;
  if (steps > 0) { load_next(); store_stage(0); }
  __syncthreads();
  int t = t_begin, c = 0;
  for (int s = 0; s < steps; ++s) {
    const int buf = s & 1;
    if (s + 1 < steps) load_next();  // global loads in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * kTM]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * kTM + 4]);
      const float4 b = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * kTN]);
      const float av[kTM] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[kTN] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    if (++c == w.chunks) {  // tile t complete: fold its scores into the running argmin
      const float4 nv4 = *reinterpret_cast<const float4*>(w.norm32 + int64_t(t) * kBN + tx * kTN);
      const float nv[kTN] = {nv4.x, nv4.y, nv4.z, nv4.w};
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) {
          const float sc = fmaf(acc[i][j], -2.f, nv[j]);
          second[i] = fminf(second[i], fmaxf(best[i], sc));
          if (sc < best[i]) {
            best[i] = sc;
            bidx[i] = t * kBN + tx * kTN + j;
          }
          acc[i][j] = 0.f;
        }
      c = 0;
      ++t;
    }
    if (s + 1 < steps) store_stage(buf ^ 1);  // the other buffer was released by the last sync
    __syncthreads();
  }

  // The 16 threads sharing a row are the 16 lanes of one half-warp: butterfly merge.
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int o = kBN / kTN / 2; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best[i], o);
      const float os = __shfl_xor_sync(0xffffffffu, second[i], o);
      const int oi = __shfl_xor_sync(0xffffffffu, bidx[i], o);
      merge_top2(best[i], second[i], bidx[i], ob, os, oi);
    }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t n = row0 + ty * kTM + i;
      if (n < w.N) {
        const int64_t o = int64_t(blockIdx.y) * w.N + n;
        w.pbest[o] = best[i];
        w.psecond[o] = second[i];
        w.pidx[o] = bidx[i];
      }
    }
  }
}

// ---- 2'. score on tensor cores -------------------------------------------------------------
// score(n,k) = fl(norm32[k] - 2 fl(big + small)), big = sum_d z_h c_h and small = sum_d z_h c_l'
// + z_l' c_h, each a chain of mma.sync m16n8k8 tf32 over the dims in increasing order (8 per
// step): the rounding model of certify.h's tf32x3_score_error_bound. Lane (g, tq) of warp
// (wm, wn) holds rows wm*32 + mi*16 + h*8 + g and codes wn*32 + ni*8 + 2tq + e of each tile; it
// folds them into its running argmin in increasing code order, so strict '<' keeps the lowest
// index on ties, and the merges below break ties by index.
template <class LZ, bool kDimContig>
__global__ __launch_bounds__(kThreads, 2) void score_tc_kernel(CodebookLookupParams p, Work w) {
  IMGTX_SHARED(float[2][kTcBK][kTcLDA], Zh);  // z chunk, [d][row]: tf32 high part
  IMGTX_SHARED(float[2][kTcBK][kTcLDA], Zl);  //   and tf32 low part
  IMGTX_SHARED(float[2][kTcBK][kTcLDB], Ch);  // code chunk, [d][code]: high part
  IMGTX_SHARED(float[2][kTcBK][kTcLDB], Cl);  //   and low part
  IMGTX_SHARED(int64_t[kBM], row_off);        // element offset of each row, -1 past N
  IMGTX_SHARED(float[kTcWarpsN][kBM], m_best);  // per code half of the tile: the row summaries
  IMGTX_SHARED(float[kTcWarpsN][kBM], m_second);
  IMGTX_SHARED(int[kTcWarpsN][kBM], m_idx);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % kTcWarpsM, wn = warp / kTcWarpsM, g = lane >> 2, tq = lane & 3;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int t_begin = blockIdx.y * w.tiles_per_split;
  const int t_end = min(t_begin + w.tiles_per_split, w.tiles);
  fill_row_offsets(p, w, row0, row_off);

  // Staging: z through registers (converted from its dtype, split when stored); the codes'
  // high plane (split when stored) by the first half of the block, the low plane by the second.
  float zr[kTcZPerThread];
  float4 cr;
  const int c_half = tid / (kThreads / 2), c_i = tid % (kThreads / 2);
  const int c_row = c_i / (kBN / 4), c_col = (c_i % (kBN / 4)) * 4;
  const float* c_src = c_half ? w.packed_lo : w.packed;
  int lt = t_begin, lc = 0;  // next (tile, chunk) to load
  auto load_next = [&]() {
    const int64_t d0 = int64_t(lc) * kTcBK;
#pragma unroll
    for (int j = 0; j < kTcZPerThread; ++j) {
      const int e = tid + j * kThreads;
      const int r = kDimContig ? e / kTcBK : e % kBM, dd = kDimContig ? e % kTcBK : e / kBM;
      const int64_t off = row_off[r], d = d0 + dd;
      zr[j] = (off >= 0 && d < p.dim) ? LZ::load(p.z, off + d * p.z_stride_dim) : 0.f;
    }
    cr = *reinterpret_cast<const float4*>(c_src + (d0 + c_row) * w.Kpad + int64_t(lt) * kBN +
                                          c_col);
    if (++lc == w.tc_chunks) { lc = 0; ++lt; }
  };
  auto store_stage = [&](int buf) {
#pragma unroll
    for (int j = 0; j < kTcZPerThread; ++j) {
      const int e = tid + j * kThreads;
      const int r = kDimContig ? e / kTcBK : e % kBM, dd = kDimContig ? e % kTcBK : e / kBM;
      const float hi = tf32_round(zr[j]);
      Zh[buf][dd][r] = hi;
      Zl[buf][dd][r] = tf32_round(__fsub_rn(zr[j], hi));  // the difference is exact
    }
    if (c_half == 0) {
      *reinterpret_cast<float4*>(&Ch[buf][c_row][c_col]) =
          make_float4(tf32_round(cr.x), tf32_round(cr.y), tf32_round(cr.z), tf32_round(cr.w));
    } else {
      *reinterpret_cast<float4*>(&Cl[buf][c_row][c_col]) = cr;  // packed already rounded
    }
  };

  const float inf = __int_as_float(0x7f800000);
  float big[kTcMTiles][kTcNTiles][4], small[kTcMTiles][kTcNTiles][4];
  float best[2 * kTcMTiles], second[2 * kTcMTiles];  // row slot mi * 2 + h
  int bidx[2 * kTcMTiles];
#pragma unroll
  for (int i = 0; i < 2 * kTcMTiles; ++i) {
    best[i] = second[i] = inf;
    bidx[i] = INT_MAX;
  }
#pragma unroll
  for (int mi = 0; mi < kTcMTiles; ++mi)
#pragma unroll
    for (int ni = 0; ni < kTcNTiles; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) big[mi][ni][i] = small[mi][ni][i] = 0.f;

  const int steps = (t_end - t_begin) * w.tc_chunks;
  if (steps > 0) { load_next(); store_stage(0); }
  __syncthreads();
  int t = t_begin, c = 0;
  for (int s = 0; s < steps; ++s) {
    const int buf = s & 1;
    if (s + 1 < steps) load_next();  // global loads in flight during the mma below
    uint32_t ah[kTcMTiles][4], al[kTcMTiles][4];
#pragma unroll
    for (int mi = 0; mi < kTcMTiles; ++mi)
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // A fragment: row g + 8 (i % 2), dim tq + 4 (i / 2)
        const int r = wm * kTcWarpRows + mi * 16 + g + 8 * (i % 2), k = tq + 4 * (i / 2);
        ah[mi][i] = __float_as_uint(Zh[buf][k][r]);
        al[mi][i] = __float_as_uint(Zl[buf][k][r]);
      }
#pragma unroll
    for (int ni = 0; ni < kTcNTiles; ++ni) {  // B fragment: dim tq + 4 i, code g
      const int n = wn * kTcWarpCodes + ni * 8 + g;
      const uint32_t bh0 = __float_as_uint(Ch[buf][tq][n]);
      const uint32_t bh1 = __float_as_uint(Ch[buf][tq + 4][n]);
      const uint32_t bl0 = __float_as_uint(Cl[buf][tq][n]);
      const uint32_t bl1 = __float_as_uint(Cl[buf][tq + 4][n]);
#pragma unroll
      for (int mi = 0; mi < kTcMTiles; ++mi) {
        ptx::mma_m16n8k8_tf32(small[mi][ni], al[mi], bh0, bh1);
        ptx::mma_m16n8k8_tf32(small[mi][ni], ah[mi], bl0, bl1);
        ptx::mma_m16n8k8_tf32(big[mi][ni], ah[mi], bh0, bh1);
      }
    }
    if (++c == w.tc_chunks) {  // tile t complete: fold its scores into the running argmin
#pragma unroll
      for (int mi = 0; mi < kTcMTiles; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int slot = mi * 2 + h;
#pragma unroll
          for (int ni = 0; ni < kTcNTiles; ++ni)
#pragma unroll
            for (int e = 0; e < 2; ++e) {  // accumulator i = 2 h + e: row g + 8 h, code 2 tq + e
              const int k = t * kBN + wn * kTcWarpCodes + ni * 8 + 2 * tq + e;
              const float dot = __fadd_rn(big[mi][ni][2 * h + e], small[mi][ni][2 * h + e]);
              const float sc = fmaf(dot, -2.f, w.norm32[k]);
              second[slot] = fminf(second[slot], fmaxf(best[slot], sc));
              if (sc < best[slot]) {
                best[slot] = sc;
                bidx[slot] = k;
              }
              big[mi][ni][2 * h + e] = small[mi][ni][2 * h + e] = 0.f;
            }
        }
      c = 0;
      ++t;
    }
    if (s + 1 < steps) store_stage(buf ^ 1);  // the other buffer was released by the last sync
    __syncthreads();
  }

  // The 4 lanes tq = 0..3 of a group share its rows: butterfly merge; then the two warps that
  // split the tile's codes merge through shared memory.
#pragma unroll
  for (int i = 0; i < 2 * kTcMTiles; ++i)
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best[i], o);
      const float os = __shfl_xor_sync(0xffffffffu, second[i], o);
      const int oi = __shfl_xor_sync(0xffffffffu, bidx[i], o);
      merge_top2(best[i], second[i], bidx[i], ob, os, oi);
    }
  if (tq == 0) {
#pragma unroll
    for (int mi = 0; mi < kTcMTiles; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm * kTcWarpRows + mi * 16 + h * 8 + g;
        m_best[wn][r] = best[mi * 2 + h];
        m_second[wn][r] = second[mi * 2 + h];
        m_idx[wn][r] = bidx[mi * 2 + h];
      }
  }
  __syncthreads();
  for (int r = tid; r < kBM; r += kThreads) {
    const int64_t n = row0 + r;
    if (n >= w.N) continue;
    float b = m_best[0][r], sec = m_second[0][r];
    int idx = m_idx[0][r];
#pragma unroll
    for (int h = 1; h < kTcWarpsN; ++h)
      merge_top2(b, sec, idx, m_best[h][r], m_second[h][r], m_idx[h][r]);
    const int64_t o = int64_t(blockIdx.y) * w.N + n;
    w.pbest[o] = b;
    w.psecond[o] = sec;
    w.pidx[o] = idx;
  }
}

// ---- 3. finalize -------------------------------------------------------------------------
template <class LZ, class LC>
__global__ __launch_bounds__(kFinThreads) void finalize_kernel(CodebookLookupParams p, Work w) {
  constexpr int kWarps = kFinThreads / 32;
  IMGTX_SHARED(float[kZCache], zs);  // the row of z as fp32 (when D <= kZCache)
  IMGTX_SHARED(double[kFinThreads], terms);
  IMGTX_SHARED(double[kWarps], red_d);
  IMGTX_SHARED(int[kWarps], red_i);
  IMGTX_SHARED(int, s_idx);
  IMGTX_SHARED(double, s_thr);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t D = p.dim;
  const bool cached = D <= kZCache;

  for (int64_t n = blockIdx.x; n < w.N; n += gridDim.x) {
    const int64_t zoff = z_offset(p, n);
    auto zat = [&](int64_t d) {
      return cached ? zs[d] : LZ::load(p.z, zoff + d * p.z_stride_dim);
    };

    // |z_n|^2 in the canonical order (common/fp64_sum.h), as the CPU's pack_z_rows: the same
    // bound then certifies the same rows on both backends. Non-finite iff the row has NaN/Inf.
    if (cached)
      for (int64_t d = tid; d < D; d += kFinThreads) zs[d] = LZ::load(p.z, zoff + d * p.z_stride_dim);
    __syncthreads();
    if (tid < kSumLanes) {
      double a = 0.0;
      for (int64_t d = tid; d < D; d += kSumLanes) {
        const double v = zat(d);
        a = __dadd_rn(a, __dmul_rn(v, v));  // exact square of a float, then one rounding
      }
      terms[tid] = a;
    }
    __syncthreads();
    const double z2 = tid == 0 ? combine_sum_lanes(terms) : 0.0;
    __syncthreads();  // terms is reused below
    if (tid == 0) {
      float best = __int_as_float(0x7f800000), second = best;
      int idx = INT_MAX;
      for (int s = 0; s < w.splits; ++s) {  // code ranges in increasing k order
        const int64_t o = int64_t(s) * w.N + n;
        merge_top2(best, second, idx, w.pbest[o], w.psecond[o], w.pidx[o]);
      }
      const double C = w.cosine ? 1.0 : __longlong_as_double((long long)*w.cmax);
      const double zn = sqrt(z2);
      // A NaN/Inf row has a non-finite norm: index 0, as the CPU (counted as a full search).
      // Else the fast argmin is certified with the bound of the pass that computed it, or the
      // row is re-checked over its candidates (-1: threshold in s_thr), or, where fast scores
      // may have overflowed or are not finite, re-searched over all codes (-3).
      int mode;
      if (!isfinite(z2)) {
        mode = -2;
      } else if (w.tensor_cores ? codebook::tf32x3_argmin_is_certified(best, second, zn, C, D)
                                : codebook::argmin_is_certified(best, second, zn, C, D)) {
        mode = idx;
      } else if (fabs(double(best)) < 1e38 &&
                 (w.tensor_cores ? codebook::tf32x3_scores_are_finite_range(zn, C)
                                 : codebook::scores_are_finite_range(zn, C))) {
        mode = -1;
        s_thr = w.tensor_cores ? codebook::tf32x3_candidate_threshold(best, zn, C, D)
                               : codebook::candidate_threshold(best, zn, C, D);
      } else {
        mode = -3;
      }
      s_idx = mode;
      if (w.count_stats && mode < 0)
        atomicAdd(w.stats + (mode == -1 ? kStatRowsRechecked : kStatRowsFullSearch), 1ULL);
    }
    __syncthreads();
    int idx = s_idx;
    if (idx == -2) idx = 0;
    if (idx == -1 || idx == -3) {  // float64 search, as codebook_cpu.cpp's exact_search_row
      // The re-check (-1) takes only the candidates: codes whose fp32 re-score, one sequential
      // FMA chain over d like score_kernel's (certify.h's score_error_bound), is <= s_thr. As
      // the CPU's collect_candidates, but no list: each thread tests its codes and searches the
      // ones that pass, in increasing k, and the block reduction keeps the lowest index on ties.
      const bool recheck = idx == -1;
      const double thr = recheck ? s_thr : 0.0;
      double bd = __longlong_as_double(0x7ff0000000000000LL);
      int bk = INT_MAX;
      unsigned long long candidates = 0;
      for (int64_t k = tid; k < p.num_codes; k += kFinThreads) {  // increasing k per thread
        if (recheck) {
          float acc = 0.f;
          for (int64_t d = 0; d < D; ++d) acc = fmaf(zat(d), w.packed[d * w.Kpad + k], acc);
          const float sc = fmaf(acc, -2.f, w.norm32[k]);  // +inf for dead codes
          if (!(double(sc) <= thr)) continue;
          ++candidates;
        }
        const double n2 = w.norm2[k];
        if (!isfinite(n2)) continue;
        const int64_t base = k * p.cb_stride_code;
        double dist = 0.0;  // explicit _rn ops: no FMA contraction, like the CPU build
        for (int64_t d = 0; d < D; ++d) {
          const double zd = zat(d), cd = LC::load(p.codebook, base + d * p.cb_stride_dim);
          if (w.cosine) {
            dist = __dsub_rn(dist, __dmul_rn(zd, cd));  // product of two floats: exact
          } else {
            const double e = zd - cd;
            dist = __dadd_rn(dist, __dmul_rn(e, e));
          }
        }
        if (w.cosine) dist = __dmul_rn(dist, cosine_scale(n2));
        if (dist < bd) { bd = dist; bk = int(k); }
      }
      if (w.count_stats && candidates) atomicAdd(w.stats + kStatCodesRechecked, candidates);
      for (int o = 16; o > 0; o >>= 1) {
        const double od = __shfl_xor_sync(0xffffffffu, bd, o);
        const int ok = __shfl_xor_sync(0xffffffffu, bk, o);
        if (od < bd || (od == bd && ok < bk)) { bd = od; bk = ok; }
      }
      if (lane == 0) { red_d[warp] = bd; red_i[warp] = bk; }
      __syncthreads();
      bd = red_d[0];
      bk = red_i[0];
      for (int i = 1; i < kWarps; ++i)
        if (red_d[i] < bd || (red_d[i] == bd && red_i[i] < bk)) { bd = red_d[i]; bk = red_i[i]; }
      idx = bk == INT_MAX ? 0 : bk;  // no finite code: index 0
    }

    // Outputs, as codebook_cpu.cpp's finalize_row; sqdist in the canonical summation order.
    double sq = 0.0;
    if (p.quantized || p.sqdist) {
      const double scale = w.cosine ? cosine_scale(w.norm2[idx]) : 1.0;
      const int64_t base = int64_t(idx) * p.cb_stride_code;
      auto quantized_at = [&](int64_t d) {  // the code as written, rounded to z's dtype
        const float cf = LC::load(p.codebook, base + d * p.cb_stride_dim);
        // l2: the loaded float itself, as the CPU (a NaN code, picked as index 0 for a NaN
        // row, keeps its bits; the GPU's fp64 round trip would turn it into its canonical NaN).
        return w.cosine ? __double2float_rn(__dmul_rn(double(cf), scale)) : cf;
      };
      if (p.quantized && !w.cosine && std::is_same<LZ, LC>::value) {
        // An l2 code in z's dtype is written bit for bit, as the CPU does (NaN payloads kept;
        // a float round trip would quiet an fp16/bf16 NaN or drop its payload).
        typedef typename std::conditional<std::is_same<LZ, F32>::value, uint32_t, unsigned short>::type Bits;
        const Bits* src = static_cast<const Bits*>(p.codebook) + base;
        Bits* dst = static_cast<Bits*>(p.quantized) + n * D;
        for (int64_t d = tid; d < D; d += kFinThreads) dst[d] = __ldg(src + d * p.cb_stride_dim);
      } else if (p.quantized) {
        for (int64_t d = tid; d < D; d += kFinThreads) LZ::store(p.quantized, n * D + d, quantized_at(d));
      }
      if (p.sqdist) {
        if (tid < kSumLanes) {
          double a = 0.0;
          for (int64_t d = tid; d < D; d += kSumLanes) {
            const double e = double(zat(d)) - double(LZ::round(quantized_at(d)));
            a = __dadd_rn(a, __dmul_rn(e, e));
          }
          terms[tid] = a;
        }
        __syncthreads();
        if (tid == 0) sq = combine_sum_lanes(terms);
      }
    }
    if (tid == 0) {
      p.indices[n] = idx;
      if (p.sqdist) p.sqdist[n] = __double2float_rn(sq);
      if (p.counts) atomicAdd(reinterpret_cast<unsigned long long*>(p.counts) + idx, 1ULL);
    }
    __syncthreads();  // zs, red_*, s_idx are reused by the next row
  }
}

// ---- host side ---------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

struct Plan {
  int64_t N = 0, Kpad = 0, Dpad = 0, m_blocks = 0;
  int tiles = 0, tiles_per_split = 0, splits = 0;
  size_t off_packed = 0, off_packed_lo = 0, off_norm32 = 0, off_norm2 = 0, off_cmax = 0,
         off_pbest = 0, off_psecond = 0, off_pidx = 0, off_stats = 0, total = 0;
};

// Everything depends on p alone (never on the device or the environment), so the workspace
// size is reproducible: the tensor-core pass's low plane is reserved whichever pass runs.
Plan make_plan(const CodebookLookupParams& p) {
  Plan q;
  q.N = p.batch * p.rows;
  q.Kpad = ceil_div(p.num_codes, kBN) * kBN;
  q.Dpad = ceil_div(p.dim, kBK) * kBK;
  q.tiles = int(q.Kpad / kBN);
  q.m_blocks = ceil_div(q.N, kBM);
  // Few rows (small batches) would leave most SMs idle: split the code range across blocks.
  int64_t want = ceil_div(kTargetBlocks, std::max<int64_t>(q.m_blocks, 1));
  want = std::max<int64_t>(1, std::min<int64_t>(want, q.tiles / kMinTilesPerSplit));
  q.tiles_per_split = int(ceil_div(q.tiles, want));
  q.splits = int(ceil_div(q.tiles, q.tiles_per_split));
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t o = off;
    off += align256(bytes);
    return o;
  };
  q.off_packed = take(size_t(q.Dpad * q.Kpad) * sizeof(float));
  q.off_packed_lo = take(size_t(q.Dpad * q.Kpad) * sizeof(float));
  q.off_norm32 = take(size_t(q.Kpad) * sizeof(float));
  q.off_norm2 = take(size_t(q.Kpad) * sizeof(double));
  q.off_cmax = take(sizeof(unsigned long long));
  const size_t partial = size_t(q.splits) * size_t(q.N);
  q.off_pbest = take(partial * sizeof(float));
  q.off_psecond = take(partial * sizeof(float));
  q.off_pidx = take(partial * sizeof(int));
  q.off_stats = take(kNumStats * sizeof(unsigned long long));
  q.total = off;
  return q;
}

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// The score pass: tensor cores where the device has mma.sync tf32 (sm_80+), unless
// IMGTX_FAST_CODEBOOK_SIMT=1 asks for the fp32 SIMT kernel (tests run both under the emulator).
bool use_tensor_cores() {
  if (env_flag("IMGTX_FAST_CODEBOOK_SIMT")) return false;
  int device = 0, major = 0;
  IMGTX_CUDA_CHECK(cudaGetDevice(&device));
  IMGTX_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

}  // namespace

namespace {
// The plan's tile counts are int: refuse sizes that would overflow them.
void check_cuda_sizes(const CodebookLookupParams& p) {
  if (p.num_codes > INT_MAX - kBN || p.dim > INT_MAX - kBK)
    throw std::invalid_argument("codebook_lookup_cuda: num_codes or dim too large");
}
}  // namespace

size_t codebook_lookup_cuda_workspace_size(const CodebookLookupParams& p) {
  if (p.batch * p.rows <= 0 || p.num_codes < 1 || p.dim < 1) return 0;
  check_cuda_sizes(p);
  return make_plan(p).total;
}

void codebook_lookup_cuda(const CodebookLookupParams& p, void* workspace, void* stream) {
  validate(p);
  if (p.batch * p.rows == 0) return;
  check_cuda_sizes(p);
  if (!workspace) throw std::invalid_argument("codebook_lookup_cuda: null workspace");
  const Plan q = make_plan(p);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  char* ws = static_cast<char*>(workspace);
  Work w;
  w.packed = reinterpret_cast<float*>(ws + q.off_packed);
  w.packed_lo = reinterpret_cast<float*>(ws + q.off_packed_lo);
  w.norm32 = reinterpret_cast<float*>(ws + q.off_norm32);
  w.norm2 = reinterpret_cast<double*>(ws + q.off_norm2);
  w.cmax = reinterpret_cast<unsigned long long*>(ws + q.off_cmax);
  w.pbest = reinterpret_cast<float*>(ws + q.off_pbest);
  w.psecond = reinterpret_cast<float*>(ws + q.off_psecond);
  w.pidx = reinterpret_cast<int*>(ws + q.off_pidx);
  w.stats = reinterpret_cast<unsigned long long*>(ws + q.off_stats);
  w.N = q.N;
  w.Kpad = q.Kpad;
  w.Dpad = q.Dpad;
  w.chunks = int(q.Dpad / kBK);
  w.tiles = q.tiles;
  w.tiles_per_split = q.tiles_per_split;
  w.splits = q.splits;
  w.tc_chunks = int(ceil_div(p.dim, kTcBK));
  w.cosine = p.metric == CodebookMetric::kCosine;
  w.tensor_cores = use_tensor_cores();
  // Debug statistics (CodebookCounters): a synchronising read-back after the call.
  w.count_stats = env_flag("IMGTX_FAST_CODEBOOK_STATS");

  IMGTX_CUDA_CHECK(cudaMemsetAsync(w.cmax, 0, sizeof(*w.cmax), st));  // C = 0 if no finite code
  if (w.count_stats)
    IMGTX_CUDA_CHECK(cudaMemsetAsync(w.stats, 0, kNumStats * sizeof(unsigned long long), st));

  const unsigned pack_grid = unsigned(ceil_div(q.Kpad, kPackThreads));
  dispatch_dtype(p.codebook_dtype, [&](auto lc) {
    IMGTX_LAUNCH(pack_grid, kPackThreads, 0, st, pack_codebook_kernel<decltype(lc)>)(p, w);
  });
  check_last_launch("codebook pack_codebook_kernel");

  const dim3 score_grid(unsigned(q.m_blocks), unsigned(q.splits));
  dispatch_dtype(p.z_dtype, [&](auto lz) {
    typedef decltype(lz) LZ;
    if (w.tensor_cores) {
      if (p.z_stride_dim == 1)
        IMGTX_LAUNCH(score_grid, kThreads, 0, st, score_tc_kernel<LZ, true>)(p, w);
      else
        IMGTX_LAUNCH(score_grid, kThreads, 0, st, score_tc_kernel<LZ, false>)(p, w);
    } else {
      if (p.z_stride_dim == 1)
        IMGTX_LAUNCH(score_grid, kThreads, 0, st, score_kernel<LZ, true>)(p, w);
      else
        IMGTX_LAUNCH(score_grid, kThreads, 0, st, score_kernel<LZ, false>)(p, w);
    }
  });
  check_last_launch(w.tensor_cores ? "codebook score_tc_kernel" : "codebook score_kernel");

  const unsigned fin_grid = unsigned(std::min<int64_t>(q.N, int64_t(1) << 20));  // grid-stride
  dispatch_dtype(p.z_dtype, [&](auto lz) {
    dispatch_dtype(p.codebook_dtype, [&](auto lc) {
      IMGTX_LAUNCH(fin_grid, kFinThreads, 0, st, finalize_kernel<decltype(lz), decltype(lc)>)(p, w);
    });
  });
  check_last_launch("codebook finalize_kernel");

  if (w.count_stats) {
    unsigned long long h[kNumStats];
    IMGTX_CUDA_CHECK(copy_to_host_sync(h, w.stats, sizeof(h), st));
    CodebookCounters c;
    c.rows_rechecked = int64_t(h[kStatRowsRechecked]);
    c.rows_full_search = int64_t(h[kStatRowsFullSearch]);
    c.codes_rechecked = int64_t(h[kStatCodesRechecked]);
    add_codebook_counters(c);
  }
}

}  // namespace imgtx
