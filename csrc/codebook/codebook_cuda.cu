// CUDA codebook lookup (semantics: imgtx/codebook.h). Three stream-ordered kernels:
//   1. pack:     codebook -> fp32 [Dpad][Kpad] (coalesced tiles), norm32, |c|^2 in fp64, and C.
//   2. score:    fp32 SIMT GEMM z . c with an argmin epilogue; each block owns 128 rows and one
//                contiguous range of code tiles, and writes a per-row (best, second, index).
//   3. finalize: one block per row: merges the code ranges, certifies the fp32 argmin
//                (certify.h) or re-searches the row in float64, then writes every output.
// The fp64 parts mirror codebook_cpu.cpp operation by operation (the summation order of
// common/fp64_sum.h, no FMA contraction) so both backends give bit-identical outputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "codebook/certify.h"
#include "common/cuda_check.h"
#include "common/cuda_dtype.cuh"
#include "common/cuda_kernel.cuh"
#include "common/fp64_sum.h"
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

// ---- workspace views and plan numbers, shared by the kernels ------------------------------
struct Work {
  float* packed;             // [Dpad][Kpad] fp32 codes (unit codes for cosine), 0 for dead ones
  float* norm32;             // [Kpad] |c|^2 as fp32 (0 for cosine); +inf for dead/padding codes
  double* norm2;             // [Kpad] |c|^2 in fp64, canonical order (non-finite: dead code)
  unsigned long long* cmax;  // C = max |c| over finite codes, as the bits of a double
  float* pbest;              // [splits][N] per code range: best score,
  float* psecond;            //   second-best score,
  int* pidx;                 //   and index of the best
  int64_t N, Kpad, Dpad;
  int chunks, tiles, tiles_per_split, splits;  // Dpad / kBK, Kpad / kBN, code split
  bool cosine;
};

__device__ __forceinline__ int64_t z_offset(const CodebookLookupParams& p, int64_t n) {
  return (n / p.rows) * p.z_stride_batch + (n % p.rows) * p.z_stride_row;
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
      col[d * w.Kpad] = __double2float_rn(__dmul_rn(v, scale));
    }
    w.norm32[k] = w.cosine ? 0.f : __double2float_rn(n2);
    // Exactly the CPU's norm_max, so both backends certify the same rows; doubles >= +0
    // order like their bits.
    if (!w.cosine) atomicMax(w.cmax, (unsigned long long)__double_as_longlong(sqrt(n2)));
  } else {
    for (int64_t d = 0; d < D; ++d) col[d * w.Kpad] = 0.f;
    w.norm32[k] = __int_as_float(0x7f800000);  // +inf: never picked, never a second best
  }
  for (int64_t d = D; d < w.Dpad; ++d) col[d * w.Kpad] = 0.f;  // zero dims add exact zeros
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
  for (int i = tid; i < kBM; i += kThreads) {
    const int64_t n = row0 + i;
    row_off[i] = n < w.N ? z_offset(p, n) : -1;
  }
  __syncthreads();

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

// ---- 3. finalize -------------------------------------------------------------------------
template <class LZ, class LC>
__global__ __launch_bounds__(kFinThreads) void finalize_kernel(CodebookLookupParams p, Work w) {
  constexpr int kWarps = kFinThreads / 32;
  IMGTX_SHARED(float[kZCache], zs);  // the row of z as fp32 (when D <= kZCache)
  IMGTX_SHARED(double[kFinThreads], terms);
  IMGTX_SHARED(double[kWarps], red_d);
  IMGTX_SHARED(int[kWarps], red_i);
  IMGTX_SHARED(int, s_idx);
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
      // A NaN/Inf row has a non-finite norm, which certify rejects (-> index 0 below).
      const bool ok = isfinite(z2) &&
                      codebook::argmin_is_certified(best, second, sqrt(z2), C, D);
      s_idx = ok ? idx : (isfinite(z2) ? -1 : -2);
    }
    __syncthreads();
    int idx = s_idx;
    if (idx == -2) idx = 0;
    if (idx == -1) {  // float64 re-search, as codebook_cpu.cpp's exact_search_row
      double bd = __longlong_as_double(0x7ff0000000000000LL);
      int bk = INT_MAX;
      for (int64_t k = tid; k < p.num_codes; k += kFinThreads) {  // increasing k per thread
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
  size_t off_packed = 0, off_norm32 = 0, off_norm2 = 0, off_cmax = 0, off_pbest = 0,
         off_psecond = 0, off_pidx = 0, total = 0;
};

// Everything depends on p alone (never on the device), so the workspace size is reproducible.
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
  q.off_norm32 = take(size_t(q.Kpad) * sizeof(float));
  q.off_norm2 = take(size_t(q.Kpad) * sizeof(double));
  q.off_cmax = take(sizeof(unsigned long long));
  const size_t partial = size_t(q.splits) * size_t(q.N);
  q.off_pbest = take(partial * sizeof(float));
  q.off_psecond = take(partial * sizeof(float));
  q.off_pidx = take(partial * sizeof(int));
  q.total = off;
  return q;
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
  w.norm32 = reinterpret_cast<float*>(ws + q.off_norm32);
  w.norm2 = reinterpret_cast<double*>(ws + q.off_norm2);
  w.cmax = reinterpret_cast<unsigned long long*>(ws + q.off_cmax);
  w.pbest = reinterpret_cast<float*>(ws + q.off_pbest);
  w.psecond = reinterpret_cast<float*>(ws + q.off_psecond);
  w.pidx = reinterpret_cast<int*>(ws + q.off_pidx);
  w.N = q.N;
  w.Kpad = q.Kpad;
  w.Dpad = q.Dpad;
  w.chunks = int(q.Dpad / kBK);
  w.tiles = q.tiles;
  w.tiles_per_split = q.tiles_per_split;
  w.splits = q.splits;
  w.cosine = p.metric == CodebookMetric::kCosine;

  IMGTX_CUDA_CHECK(cudaMemsetAsync(w.cmax, 0, sizeof(*w.cmax), st));  // C = 0 if no finite code

  const unsigned pack_grid = unsigned(ceil_div(q.Kpad, kPackThreads));
  dispatch_dtype(p.codebook_dtype, [&](auto lc) {
    IMGTX_LAUNCH(pack_grid, kPackThreads, 0, st, pack_codebook_kernel<decltype(lc)>)(p, w);
  });
  check_last_launch("codebook pack_codebook_kernel");

  const dim3 score_grid(unsigned(q.m_blocks), unsigned(q.splits));
  dispatch_dtype(p.z_dtype, [&](auto lz) {
    if (p.z_stride_dim == 1)
      IMGTX_LAUNCH(score_grid, kThreads, 0, st, score_kernel<decltype(lz), true>)(p, w);
    else
      IMGTX_LAUNCH(score_grid, kThreads, 0, st, score_kernel<decltype(lz), false>)(p, w);
  });
  check_last_launch("codebook score_kernel");

  const unsigned fin_grid = unsigned(std::min<int64_t>(q.N, int64_t(1) << 20));  // grid-stride
  dispatch_dtype(p.z_dtype, [&](auto lz) {
    dispatch_dtype(p.codebook_dtype, [&](auto lc) {
      IMGTX_LAUNCH(fin_grid, kFinThreads, 0, st, finalize_kernel<decltype(lz), decltype(lc)>)(p, w);
    });
  });
  check_last_launch("codebook finalize_kernel");
}

}  // namespace imgtx
