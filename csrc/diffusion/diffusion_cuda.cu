// CUDA mask-and-replace diffusion (semantics: imgtx/diffusion.h; math: mr_token_math.h and
// docs/specs/mask_and_replace.md). The CPU twin is diffusion_cpu_driver.h: every branch
// and float/double choice below mirrors it, so both backends give the same values up to the
// summation order of the float64 reductions.
//
// ---- kernel shape (posterior, vb forward, vb backward) --------------------------------------
// A block of 256 threads owns a tile of G consecutive tokens (flattened b * tokens + n; G in
// {1, 2, 4, 8}), and walks tiles grid-stride, so any batch * tokens works with a capped grid.
// Every thread belongs to one token of the tile, "slot" t, and visits classes j = r, r + TPT,
// ... (r = its rank inside the token, TPT = 256 / G threads per token). Two thread maps:
//   class-fast (stride_class == 1, e.g. a permuted (B, N, K) buffer, or any other stride):
//     slot t = tid / TPT: whole warps per token, lanes read consecutive classes (coalesced).
//   token-fast (stride_token == 1, diffusers' contiguous (B, K, N)):
//     slot t = tid % G: a warp reads G consecutive tokens for each of 32 / G classes, i.e.
//     G * elem_size contiguous bytes per class row (8 tokens: a full 32-byte sector in fp32).
// Because a thread's slot never changes, per-token reductions are warp shuffles over the
// lanes of that slot plus one combine through shared memory (GroupReducer), one barrier each.
//
// The posterior and the loss forward make several passes per token (max; exp + sum; 30
// bisection passes for top-r truncation; the final scan, write or log-sum pass), so a tile's
// rows are read from global memory once and cached in shared memory as float (the logits,
// then p = expf(l - M) in place; full-precision expf, like the CPU's exp to a few ulp). G is
// the largest that keeps the cache within ~72 KB (2-3 resident blocks per SM on A100/H100):
// K = 4096 gives G = 4 token-fast (16-byte runs per class row; the neighbouring tile, resident
// at the same time, reads the other half of each sector from L2) and G = 1 class-fast (16 KB
// per block). Rows too long for shared memory even at G = 1 (K over ~40K-56K classes) are
// re-read from global memory (L2) in every pass instead. The cached rows of different slots
// are padded so that the token-fast map is bank-conflict-free.
//   posterior:   max -> exp/sum -> [truncation] -> per-token float64 math (rank-0 thread) ->
//                sampling: mr::choose, then (only where the p part was drawn) a segmented
//                inverse-CDF scan; log-probs: one write pass over the K + 1 classes, with the
//                thread map of the output's layout (the cache serves either map).
//   vb forward:  max -> exp/sum -> float64 math -> [t > 0] sums of log pi and 1 / pi.
//   vb backward: elementwise from the saved scalars (no cache; G = 8 so that the per-token
//                prologue runs on 8 lanes at once); gradients are staged through shared
//                memory only when the logits and gradient layouts disagree.
// q_sample is one thread per token.
//
// No scratch memory: everything per token lives in registers and shared memory, so the
// launches need no workspace, no host syncs, and are graph-capturable (the Philox seed is read
// on the device).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/cuda_dtype.cuh"
#include "common/cuda_kernel.cuh"
#include "common/philox.h"
#include "diffusion/mr_token_math.h"
#include "imgtx/diffusion.h"

namespace imgtx {
namespace {

// ---- launch shape ---------------------------------------------------------------------------
constexpr int kThreads = 256;  // per block; the thread maps below assume a power of two
constexpr int kLog2Threads = 8;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxG = 8;  // tokens per tile
constexpr int kMinBlocks = 4;  // resident blocks per SM the register budget must allow (<= 64)
constexpr int kUnroll = 8;  // global loads in flight per thread in the first pass
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kMaxGrid = int64_t(1) << 20;  // blocks; tiles beyond are walked grid-stride
constexpr size_t kSmemBudget = 72 * 1024;  // soft cap on a tile's cached rows (see top)
constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without an opt-in
constexpr int kStaticSmemReserve = 4096;  // >= each kernel's static __shared__ (asserted)
constexpr int kBitsOfOne = 0x3f800000;  // bit pattern of 1.0f, the largest p
constexpr int kTruncIters = 30;  // bisection steps over [-1, kBitsOfOne]: 2^30 > 0x3f800001
static_assert(kThreads == 1 << kLog2Threads, "kThreads must match kLog2Threads");
static_assert(kThreads / kMaxG >= 32, "every token needs at least one full warp of threads");
static_assert((int64_t(1) << kTruncIters) >= int64_t(kBitsOfOne) + 1,
              "the bisection must close its interval in kTruncIters steps");

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// float -> double for the float64 sums, exact for normal floats, with integer operations:
// F2F.F64.F32 issues at 16/clk/SM on sm_80/sm_90 (1/4 to 1/8 of a DADD), which would make
// the 30 bisection passes conversion-bound. Zero and subnormals give +-0: the summed values
// are p in [0, 1] with max p = 1, log(pi) and 1/pi with pi >= FLT_MIN, so a dropped
// subnormal changes a sum by < K * 1.2e-38, far below its float64 rounding. Not for inf/NaN.
__device__ __forceinline__ double widen(float v) {
  const uint32_t x = __float_as_uint(v), ax = x & 0x7fffffffu;
  const bool normal = ax >= 0x00800000u;
  const uint32_t hi = normal ? ((ax >> 3) + 0x38000000u) | (x & 0x80000000u) : 0u;  // +896 exp
  const uint32_t lo = normal ? ax << 29 : 0u;
  return __hiloint2double(int(hi), int(lo));
}

// ---- tile geometry --------------------------------------------------------------------------
struct Geo {
  int G = 1, log2G = 0;  // tokens per tile
  int S = 0;             // floats between the cached rows of two slots; 0: not cached
  int64_t total = 0;     // batch * tokens
  int64_t tiles = 0;     // ceil(total / G)
};

struct Lane {
  int t;  // token slot in the tile
  int r;  // rank among the TPT threads of that token: visits classes r, r + TPT, ...
};

__device__ __forceinline__ Lane map_thread(bool token_fast, const Geo& g) {
  const int tid = int(threadIdx.x);
  if (token_fast) return Lane{tid & (g.G - 1), tid >> g.log2G};
  const int log2_tpt = kLog2Threads - g.log2G;
  return Lane{tid >> log2_tpt, tid & ((1 << log2_tpt) - 1)};
}

// ---- per-token reductions -------------------------------------------------------------------
template <class T>
__device__ __forceinline__ T shfl_xor(T v, int o) {
  return __shfl_xor_sync(kFull, v, o);
}
template <>
__device__ __forceinline__ int2 shfl_xor(int2 v, int o) {
  return make_int2(__shfl_xor_sync(kFull, v.x, o), __shfl_xor_sync(kFull, v.y, o));
}
template <>
__device__ __forceinline__ double2 shfl_xor(double2 v, int o) {
  return make_double2(__shfl_xor_sync(kFull, v.x, o), __shfl_xor_sync(kFull, v.y, o));
}

struct MaxF {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumD {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct SumD2 {
  __device__ double2 operator()(double2 a, double2 b) const {
    return make_double2(a.x + b.x, a.y + b.y);
  }
};
struct MinMaxI2 {  // x: min, y: max
  __device__ int2 operator()(int2 a, int2 b) const {
    return make_int2(min(a.x, b.x), max(a.y, b.y));
  }
};

struct RedScratch {
  double2 slot[2][kWarps * kMaxG];  // [buffer][warp * kMaxG + token slot]
};

// All-reduce over the threads of each token (every thread gets its own token's result), in
// one barrier: warp shuffles combine the lanes of a slot, then each thread folds the per-warp
// partials of its slot in a fixed order (deterministic, identical in every thread). Two
// alternating buffers: a buffer is rewritten two reductions later, after a barrier that every
// thread reaches only once it has read the buffer. Must be called by all threads of the block.
template <bool kTokenFast>
class GroupReducer {
 public:
  __device__ GroupReducer(RedScratch* s, const Geo& g, int t) : s_(s), g_(g), t_(t) {}

  template <class T, class Op>
  __device__ T all(T v, Op op) {
    T* slots = warp_stage(v, op);
    if (kTokenFast) {  // token t's partial of warp w is slot [w][t]
      T r = slots[t_];
      for (int w = 1; w < kWarps; ++w) r = op(r, slots[w * kMaxG + t_]);
      return r;
    }
    const int wpt = kWarps >> g_.log2G, w0 = t_ * wpt;  // the token's own warps
    T r = slots[w0 * kMaxG];
    for (int w = 1; w < wpt; ++w) r = op(r, slots[(w0 + w) * kMaxG]);
    return r;
  }

  // Sum of v over the token's warps before this thread's warp (its "segment", see Segment).
  __device__ double exclusive_by_warp(double v) {
    const double* slots = warp_stage(v, SumD());
    const int warp = int(threadIdx.x) >> 5;
    double r = 0.0;
    if (kTokenFast) {
      for (int w = 0; w < warp; ++w) r += slots[w * kMaxG + t_];
    } else {
      for (int w = t_ * (kWarps >> g_.log2G); w < warp; ++w) r += slots[w * kMaxG];
    }
    return r;
  }

 private:
  template <class T, class Op>
  __device__ T* warp_stage(T v, Op op) {
    static_assert(sizeof(T) <= sizeof(double2), "reduction type too large for the scratch");
    T* slots = reinterpret_cast<T*>(s_->slot[parity_]);
    parity_ ^= 1;
    const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
    const int width = kTokenFast ? g_.G : 1;  // lanes [0, width) end with the warp's partials
    for (int o = 16; o >= width; o >>= 1) v = op(v, shfl_xor(v, o));
    if (lane < width) slots[warp * kMaxG + lane] = v;
    __syncthreads();
    return slots;
  }

  RedScratch* s_;
  Geo g_;
  int t_;
  int parity_ = 0;
};

// ---- inverse-CDF scan -----------------------------------------------------------------------
// For the scan a token's classes are split into contiguous segments, one per warp that holds
// lanes of the token (class-fast: the token's warps; token-fast: all 8 warps, 32 / G lanes
// each); inside a segment the lanes walk rounds of consecutive classes, so reads stay
// coalesced and bank-conflict-free and a round's cumulative sum is a warp-level scan.
struct Segment {
  int lo, hi;     // classes [lo, hi) of this warp's segment
  int L;          // lanes of the token in the warp
  int lr;         // this lane's rank among them
  int ls;         // lane distance between consecutive ranks (token-fast: G)
  int last;       // lane holding the highest rank
  int shift;      // log2(ls)
  unsigned mask;  // the token's lanes
};

__device__ __forceinline__ Segment make_segment(bool token_fast, const Geo& g, int K, int t) {
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  Segment s;
  int nseg, seg;
  if (token_fast) {
    nseg = kWarps;
    seg = warp;
    s.L = 32 >> g.log2G;
    s.lr = lane >> g.log2G;
    s.ls = g.G;
    s.shift = g.log2G;
    s.last = 32 - g.G + t;
    s.mask = (kFull / ((1u << g.G) - 1u)) << t;  // every G-th lane from t: 0x01010101 << t
  } else {
    nseg = kWarps >> g.log2G;
    seg = warp & (nseg - 1);
    s.L = 32;
    s.lr = lane;
    s.ls = 1;
    s.shift = 0;
    s.last = 31;
    s.mask = kFull;
  }
  const int per = (K + nseg - 1) / nseg;
  const int C = (per + s.L - 1) / s.L * s.L;
  s.lo = min(seg * C, K);  // seg * C < K + nseg * 32: no overflow for K <= 2^30
  s.hi = min(s.lo + C, K);
  return s;
}

// First class j (index order) with weight(j) > 0 whose float64 cumulative weight exceeds
// target; the last class with weight > 0 if rounding runs past the end (0 if none), exactly as
// the CPU's scan. `active` is false for tokens that need no scan (their threads still take
// part in the barriers). Must be called by all threads of the block.
template <bool kTokenFast, class Weight>
__device__ int first_above(bool active, double target, int K, const Geo& g, int t,
                           GroupReducer<kTokenFast>& red, Weight weight) {
  const Segment s = make_segment(kTokenFast, g, K, t);
  // 1. this thread's share of its segment, then the mass of the segments before it.
  double part = 0.0;
  int last_nz = -1;
  if (active) {
    for (int j = s.lo + s.lr; j < s.hi; j += s.L) {
      const float w = weight(j);
      if (w > 0.f) {
        part += widen(w);
        last_nz = j;
      }
    }
  }
  double cum = red.exclusive_by_warp(part);
  // 2. walk the segment in rounds of L classes: segmented warp scan, first lane past target.
  int found = INT_MAX;
  for (int base = s.lo; base < s.hi; base += s.L) {  // bounds are warp-uniform
    const int j = base + s.lr;
    const float w = (active && j < s.hi) ? weight(j) : 0.f;
    double incl = widen(w);
    for (int o = 1; o < s.L; o <<= 1) {
      const double y = __shfl_up_sync(kFull, incl, o * s.ls);
      if (s.lr >= o) incl += y;
    }
    const bool hit = found == INT_MAX && w > 0.f && cum + incl > target;
    const unsigned hits = __ballot_sync(kFull, hit) & s.mask;
    if (hits != 0u && found == INT_MAX) found = base + ((__ffs(int(hits)) - 1) >> s.shift);
    cum += __shfl_sync(kFull, incl, s.last);
    if (__all_sync(kFull, found != INT_MAX || !active)) break;
  }
  // 3. earliest hit over the token's segments, else the last class with weight > 0.
  const int2 r = red.all(make_int2(found, last_nz), MinMaxI2());
  return r.x != INT_MAX ? r.x : (r.y >= 0 ? r.y : 0);
}

// ---- per-token passes -----------------------------------------------------------------------
// Where a token's K logits live, and logit j as float: l_c, or l_u + s (l_c - l_u) rounded op
// by op (no FMA contraction) as the spec writes it.
template <class LT>
struct TokenLogits {
  const void* cond;
  const void* unc;  // nullptr: no guidance
  int64_t cond_off, unc_off, cond_sc, unc_sc;
  DType unc_dtype;
  float scale;

  __device__ __forceinline__ float logit(int j) const {
    const float lc = LT::load(cond, cond_off + int64_t(j) * cond_sc);
    if (unc == nullptr) return lc;
    const float lu = load_any(unc_dtype, unc, unc_off + int64_t(j) * unc_sc);
    return __fadd_rn(lu, __fmul_rn(scale, __fsub_rn(lc, lu)));
  }
};

template <class LT>
__device__ __forceinline__ TokenLogits<LT> token_logits(const MrLogits& c, const MrLogits& u,
                                                        float scale, int64_t b, int64_t n) {
  TokenLogits<LT> s;
  s.cond = c.data;
  s.cond_off = b * c.stride_batch + n * c.stride_token;
  s.cond_sc = c.stride_class;
  s.unc = u.data;
  s.unc_off = u.data ? b * u.stride_batch + n * u.stride_token : 0;
  s.unc_sc = u.stride_class;
  s.unc_dtype = u.dtype;
  s.scale = scale;
  return s;
}

// Pass 1: logits -> the cached row (when cached); returns their max with NaN counted as +inf,
// so the token is bad exactly when the max is +-inf (NaN/+Inf present, or all -inf).
// kUnroll loads are issued before they are used, to keep enough bytes in flight.
template <class Src>
__device__ float load_pass(const Src& src, float* row, int r, int step, int K) {
  float mx = -kInf;
  for (int j0 = r; j0 < K; j0 += kUnroll * step) {
    float v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * step;
      v[u] = j < K ? src.logit(j) : -kInf;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * step;
      if (row != nullptr && j < K) row[j] = v[u];
      mx = fmaxf(mx, v[u] != v[u] ? kInf : v[u]);
    }
  }
  return mx;
}

// Pass 2: p_j = expf(l_j - M) (full-precision expf, as the CPU's exp to a few ulp), stored
// over the cached logits; returns this thread's float64 share of P.
template <class Src>
__device__ double exp_pass(const Src& src, float* row, float M, int r, int step, int K) {
  double acc = 0.0;
#pragma unroll 4
  for (int j = r; j < K; j += step) {
    const float e = expf((row != nullptr ? row[j] : src.logit(j)) - M);
    if (row != nullptr) row[j] = e;
    acc += widen(e);
  }
  return acc;
}

// p_j after pass 2: the cached value, or the same expression recomputed from global memory.
template <class Src>
__device__ __forceinline__ float prob_at(const Src& src, const float* row, float M, int j) {
  return row != nullptr ? row[j] : expf(src.logit(j) - M);
}

__device__ __forceinline__ int bad_bits(float M, bool bad_index) {
  return (fabsf(M) == kInf ? kMrBadLogits : 0) | (bad_index ? kMrBadIndex : 0);
}

// Top-r truncation (spec; as the CPU's truncate): u0 = the smallest u in [0, bits(1.0f)] with
// h(u) = sum of p_k over bits(p_k) > u below r * P, by bisection on the bit patterns (p >= 0,
// so integer order is value order); the kept set is { j : bits(p_j) >= u0 }. Every token of
// the block runs all kTruncIters steps (a step whose interval is closed changes nothing), so
// the reductions line up. The kept mass is h(u0 - 1), evaluated by the search itself (P when
// every class is kept).
struct Trunc {
  int u0;
  double kept;
};

template <bool kTokenFast, class Prob>
__device__ Trunc truncate_top_r(bool ok, double P, float rate, int K, Lane me, int step,
                                GroupReducer<kTokenFast>& red, Prob prob) {
  const double threshold = double(rate) * P;
  int lo = -1, hi = kBitsOfOne;  // h(-1) = P >= r P; h(bits(1.0f)) = 0
  double kept = P;
  for (int it = 0; it < kTruncIters; ++it) {
    const bool open = hi - lo > 1;
    const int mid = lo + ((hi - lo) >> 1);
    double h = 0.0;
    if (ok && open) {
#pragma unroll 4
      for (int j = me.r; j < K; j += step) {
        const float e = prob(j);
        if (__float_as_int(e) > mid) h += widen(e);
      }
    }
    h = red.all(h, SumD());
    if (open) {
      if (h < threshold) {
        hi = mid;
      } else {
        lo = mid;
        kept = h;
      }
    }
  }
  return Trunc{hi, kept};
}

// Of the classes equal to the boundary value u0 only the first mr::tie_keep stay, in index
// order, as diffusers' sort keeps them (the CPU's Kernels::tie_cut): returns the index from
// which the others are dropped (INT_MAX: none) and lowers *P, the kept mass, to match. `kept`
// is the mass of { j : bits(p_j) >= u0 }. A bisection on the index runs only when a token of
// the block drops part of its tie; all threads of the block call this (reductions).
template <bool kTokenFast, class Prob>
__device__ int tie_cut(bool ok, int u0, double threshold, double kept, int K, Lane me, int step,
                       GroupReducer<kTokenFast>& red, Prob prob, double* P) {
  auto ties_below = [&](int end) {  // this thread's classes j < end equal to u0
    double c = 0.0;
    for (int j = me.r; j < end; j += step) c += __float_as_int(prob(j)) == u0 ? 1.0 : 0.0;
    return c;
  };
  const int64_t count = int64_t(red.all(ok ? ties_below(K) : 0.0, SumD()));
  const double v0 = double(__int_as_float(u0));
  const int64_t keep = ok && count > 1 ? mr::tie_keep(threshold, kept - double(count) * v0, v0, count)
                                       : count;
  const bool partial = keep < count;
  if (!__syncthreads_or(partial)) return INT_MAX;
  int lo = 0, hi = K;  // ties_below: < keep at lo, >= keep at hi
  for (int span = 1; span <= K; span <<= 1) {  // ceil(log2(K)) steps close [0, K]
    const bool open = partial && hi - lo > 1;
    const int mid = lo + ((hi - lo) >> 1);
    const double c = red.all(open ? ties_below(mid) : 0.0, SumD());
    if (open) (int64_t(c) >= keep ? hi : lo) = mid;
  }
  if (!partial) return INT_MAX;
  *P = kept - double(count - keep) * v0;
  return hi;
}

// Top-r at r = 0 (the CPU's keep_first_max): the one class kept is the lowest index among
// those with the token's largest p. Two reductions: the largest p, then the first class
// holding it. Returns that class (0 for tokens that are not ok).
template <bool kTokenFast, class Prob>
__device__ int first_max_class(bool ok, int K, Lane me, int step, GroupReducer<kTokenFast>& red,
                               Prob prob) {
  float best = 0.f;
  if (ok)
    for (int j = me.r; j < K; j += step) best = fmaxf(best, prob(j));
  best = red.all(best, MaxF());
  int first = INT_MAX;
  if (ok)
    for (int j = me.r; j < K && first == INT_MAX; j += step)
      if (prob(j) == best) first = j;
  first = red.all(make_int2(first, 0), MinMaxI2()).x;
  return first == INT_MAX ? 0 : first;
}

// ---- reverse step: posterior log-probabilities or a sample of x_{t-1} -----------------------
// What the output pass needs to know about each token of the tile (written by the token's
// rank-0 thread, read by whichever threads the output layout assigns to the token).
struct PostTok {
  int64_t cond_off, unc_off, out_off;
  double target, factor;  // sampling: the p-part scan of mr::choose
  float M, ug, vy, lp, log_u, out_s, out_K;  // log_u: log(u) - log(pi total), t = 0
  int s, u0, cut;  // kept: bits(p_j) > u0, or == u0 with j < cut
  bool live, bad, logspace, scan;
};

struct PostShared {
  RedScratch red;
  PostTok tok[kMaxG];
};
static_assert(sizeof(PostShared) <= kStaticSmemReserve, "static shared memory over reserve");

template <class LT, bool kTokenFast>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    posterior_kernel(const MrPosteriorParams p, const Geo g, bool out_token_fast, int* status) {
  IMGTX_DYNAMIC_SHARED(float, cache);  // G rows of S floats when cached
  IMGTX_SHARED(PostShared, sh);
  const int K = int(p.num_classes);
  const int64_t N = p.tokens;
  const int step = kThreads >> g.log2G;
  const Lane me = map_thread(kTokenFast, g);
  GroupReducer<kTokenFast> red(&sh.red, g, me.t);
  const bool truncating = p.truncation_rate < 1.f, sampling = p.x_prev != nullptr;
  const uint64_t seed = sampling ? uint64_t(*p.seed) : 0;
  float* const row = g.S > 0 ? cache + me.t * g.S : nullptr;
  int status_bits = 0;

  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const int64_t tok = tile * g.G + me.t;
    const bool live = tok < g.total;
    const int64_t b = live ? tok / N : 0, n = live ? tok - b * N : 0;
    const TokenLogits<LT> src = token_logits<LT>(p.logp, p.logp_uncond, p.guidance_scale, b, n);
    const int64_t xt = live ? p.x_t.data[b * p.x_t.stride_batch + n * p.x_t.stride_token] : 0;

    const float M = red.all(live ? load_pass(src, row, me.r, step, K) : -kInf, MaxF());
    const int bad = live ? bad_bits(M, xt < 0 || xt > K) : 0;
    const bool ok = live && bad == 0;
    double P = red.all(ok ? exp_pass(src, row, M, me.r, step, K) : 0.0, SumD());
    auto prob = [&](int j) { return prob_at(src, row, M, j); };
    int u0 = 0, cut = INT_MAX;
    if (p.truncation_rate == 0.f) {
      const int only = first_max_class(ok, K, me, step, red, prob);
      u0 = __float_as_int(ok ? prob(only) : 1.f);
      cut = only + 1;
      P = ok ? double(prob(only)) : 0.0;
    } else if (truncating) {
      const double threshold = double(p.truncation_rate) * P;
      const Trunc tr = truncate_top_r(ok, P, p.truncation_rate, K, me, step, red, prob);
      u0 = tr.u0;
      P = tr.kept;
      cut = tie_cut(ok, u0, threshold, tr.kept, K, me, step, red, prob, &P);
    }
    // p_j as truncated: dropped classes become 0 (u0 >= 1, so this also zeroes p = 0), and of
    // the classes equal to u0 those from `cut` on. The output pass maps threads to tokens by
    // the output's layout, so it passes the bounds of the token it writes (PostTok::u0,
    // PostTok::cut), not this thread's.
    auto kept_by = [truncating](float e, int j, int threshold, int cut_at) {
      const int bits = __float_as_int(e);
      return truncating && (bits < threshold || (bits == threshold && j >= cut_at)) ? 0.f : e;
    };
    auto kept = [&](float e, int j) { return kept_by(e, j, u0, cut); };

    // The token's scalar math (float64, mr_token_math.h), once per token.
    if (me.r == 0) {
      PostTok& T = sh.tok[me.t];
      T.live = live;
      T.bad = bad != 0;
      T.scan = false;
      T.logspace = false;
      T.s = -1;
      T.cond_off = src.cond_off;
      T.unc_off = src.unc_off;
      T.out_off = b * p.out_stride_batch + n * p.out_stride_token;
      T.M = M;
      T.u0 = u0;
      T.cut = cut;
      if (bad) {
        status_bits |= bad;
        if (sampling) p.x_prev[tok] = -1;
      }
      if (ok) {
        mr::TokenCoefs k = mr::token_coefs(p.coefs + b * kMrCoefs, xt, K);
        const double p_s = k.s >= 0 ? double(kept(prob(int(k.s)), int(k.s))) : 0.0;
        T.s = int(k.s);
        if (sampling) {
          double r0, r1;
          philox_uniform2(seed, uint64_t(tok), kMrStreamPosterior, &r0, &r1);
          const mr::SampleChoice c = mr::choose(k, K, P, p_s, r0, r1);
          if (c.index >= 0) {
            p.x_prev[tok] = c.index;
          } else {
            T.scan = true;
            T.target = c.scan_target;
            T.factor = c.scan_special_factor;
          }
        } else {
          const double Y = mr::token_y(k, P, p_s);
          mr::normalise(&k, Y);
          const double lpt = log(mr::pi_total(k, K, P, p_s, Y));
          T.logspace = k.v_g == 0.0;  // t = 0: log(u p_j) in log space, nothing underflows
          T.log_u = float(log(k.u_g) - lpt);
          T.ug = float(k.u_g);
          T.vy = float(k.v_g * Y);
          T.lp = float(lpt);
          const double pis = k.u_s * p_s + k.v_s * Y;  // x_t's own class (not in log space)
          T.out_s = pis > 0.0 ? float(log(pis) - lpt) : -kInf;
          T.out_K = k.w > 0.0 ? float(log(k.w * Y) - lpt) : -kInf;
        }
      }
    }

    if (sampling) {
      // Tokens that drew the p part scan their p with p_s scaled (mr::choose); skipped when
      // no token of the tile needs it.
      if (__syncthreads_or(me.r == 0 && sh.tok[me.t].scan)) {
        const PostTok& T = sh.tok[me.t];
        const bool active = T.scan;
        const int s = T.s;
        const double factor = T.factor;
        auto weight = [&](int j) {
          float e = kept(prob(j), j);
          if (j == s) e = float(double(e) * factor);
          return e;
        };
        const int idx = first_above(active, T.target, K, g, me.t, red, weight);
        if (me.r == 0 && active) p.x_prev[tok] = idx;
      }
    } else {
      __syncthreads();  // sh.tok complete
      // Output pass over the K + 1 classes, thread map chosen by the output's layout.
      const Lane mo = map_thread(out_token_fast, g);
      const PostTok T = sh.tok[mo.t];  // a register copy: the stores below may alias shared
      if (T.live) {
        const float* orow = g.S > 0 ? cache + mo.t * g.S : nullptr;
        TokenLogits<LT> osrc = src;
        osrc.cond_off = T.cond_off;
        osrc.unc_off = T.unc_off;
        float* out = p.log_probs + T.out_off;
        for (int j = mo.r; j <= K; j += step) {
          float v;
          if (T.bad) {
            v = kNaN;
          } else if (j == K) {
            v = T.out_K;
          } else if (T.logspace) {  // the cache holds p: the logit comes from global memory
            const float l = osrc.logit(j);
            v = (l - T.M) + T.log_u;  // (x - m) first: exact for logits near m, any magnitude
            if (truncating) {
              const float e = orow != nullptr ? orow[j] : expf(l - T.M);
              if (!(kept_by(e, j, T.u0, T.cut) > 0.f)) v = -kInf;
            }
          } else if (j == T.s) {
            v = T.out_s;
          } else {
            const float e = kept_by(prob_at(osrc, orow, T.M, j), j, T.u0, T.cut);
            v = logf(fmaxf(fmaf(T.ug, e, T.vy), mr::kPiFloor)) - T.lp;
          }
          out[int64_t(j) * p.out_stride_class] = v;
        }
      }
    }
    __syncthreads();  // the next tile rewrites the cache and sh.tok
  }
  if (status_bits != 0 && status != nullptr) atomicOr(status, status_bits);
}

// ---- training loss: forward -----------------------------------------------------------------
struct VbTok {
  mr::TokenCoefs k;
  double Y, Pi, p_k, p_s;
  int64_t x0;
  float ug, vy;
  bool pass3;  // t > 0: needs the sums of log pi and 1 / pi
};

struct VbShared {
  RedScratch red;
  VbTok tok[kMaxG];
};
static_assert(sizeof(VbShared) <= kStaticSmemReserve, "static shared memory over reserve");

template <class LT, bool kTokenFast>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    vb_forward_kernel(const MrVbParams p, const Geo g, int* status) {
  IMGTX_DYNAMIC_SHARED(float, cache);
  IMGTX_SHARED(VbShared, sh);
  const int K = int(p.num_classes);
  const int64_t N = p.tokens;
  const int step = kThreads >> g.log2G;
  const Lane me = map_thread(kTokenFast, g);
  GroupReducer<kTokenFast> red(&sh.red, g, me.t);
  float* const row = g.S > 0 ? cache + me.t * g.S : nullptr;
  const MrLogits none;
  int status_bits = 0;

  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    const int64_t tok = tile * g.G + me.t;
    const bool live = tok < g.total;
    const int64_t b = live ? tok / N : 0, n = live ? tok - b * N : 0;
    const TokenLogits<LT> src = token_logits<LT>(p.logits, none, 1.f, b, n);
    const int64_t x0 = live ? p.x0.data[b * p.x0.stride_batch + n * p.x0.stride_token] : 0;
    const int64_t xt = live ? p.x_t.data[b * p.x_t.stride_batch + n * p.x_t.stride_token] : 0;

    const float M = red.all(live ? load_pass(src, row, me.r, step, K) : -kInf, MaxF());
    const int bad = live ? bad_bits(M, x0 < 0 || x0 >= K || xt < 0 || xt > K) : 0;
    const bool ok = live && bad == 0;
    const double P = red.all(ok ? exp_pass(src, row, M, me.r, step, K) : 0.0, SumD());
    auto prob = [&](int j) { return prob_at(src, row, M, j); };

    if (me.r == 0) {
      VbTok& T = sh.tok[me.t];
      T.pass3 = false;
      double* saved = p.saved + tok * kMrVbSaved;
      if (bad) {
        status_bits |= bad;
        p.loss_vb[tok] = p.loss_aux[tok] = kNaN;
        for (int i = 0; i < kMrVbSaved; ++i) saved[i] = double(kNaN);
      }
      if (ok) {
        const float z_x0 = LT::load(p.logits.data, src.cond_off + x0 * p.logits.stride_class);
        const double ce = log(P) - (double(z_x0) - double(M));
        p.loss_aux[tok] = float(ce);
        saved[0] = double(M);
        saved[1] = P;
        mr::TokenCoefs k = mr::token_coefs(p.coefs + b * kMrCoefs, xt, K);
        if (k.t0) {
          p.loss_vb[tok] = float(ce);
          saved[2] = saved[3] = saved[4] = saved[5] = 0.0;
        } else {
          const double p_s = k.s >= 0 ? double(prob(int(k.s))) : 0.0;
          const double Y = mr::token_y(k, P, p_s);
          mr::normalise(&k, Y);
          T.k = k;
          T.Y = Y;
          T.Pi = mr::pi_total(k, K, P, p_s, Y);
          T.p_k = double(prob(int(x0)));
          T.p_s = p_s;
          T.x0 = x0;
          T.ug = float(k.u_g);
          T.vy = float(k.v_g * Y);
          T.pass3 = true;
        }
      }
    }

    // Pass 3 (t > 0): sum_j log(pi_j) and sum_j 1 / pi_j with the generic formula, in float,
    // accumulated in float64; kl_finish corrects the special classes.
    if (__syncthreads_or(me.r == 0 && sh.tok[me.t].pass3)) {
      const VbTok& T = sh.tok[me.t];
      double2 acc = make_double2(0.0, 0.0);
      if (T.pass3) {
        const float ug = T.ug, vy = T.vy;
#pragma unroll 4
        for (int j = me.r; j < K; j += step) {
          const float pi = fmaxf(fmaf(ug, prob(j), vy), mr::kPiFloor);
          acc.x += widen(logf(pi));
          acc.y += widen(__frcp_rn(pi));  // == 1.0f / pi (IEEE, round to nearest)
        }
      }
      acc = red.all(acc, SumD2());
      if (me.r == 0 && T.pass3) {
        const mr::KlOut o = mr::kl_finish(T.k, K, T.x0, T.p_k, T.p_s, T.Y, T.Pi, acc.x, acc.y);
        double* saved = p.saved + tok * kMrVbSaved;
        p.loss_vb[tok] = float(o.kl);
        saved[2] = T.Y;
        saved[3] = T.Pi;
        saved[4] = o.T;
        saved[5] = 0.0;
      }
    }
    __syncthreads();  // the next tile rewrites the cache and sh.tok
  }
  if (status_bits != 0 && status != nullptr) atomicOr(status, status_bits);
}

// ---- training loss: backward ----------------------------------------------------------------
// Elementwise given the saved per-token scalars: no reductions, one read of the logits and one
// write of the gradient. When the two layouts disagree (one token-fast, one class-fast), the
// tile's gradients are staged in shared memory so both sides stay coalesced.
struct BwdTok {
  int64_t in_off, out_off;
  float M, ug, vy, c1, c2, g_x0, g_s;
  int x0, s;  // s: x_t when real and != x0, else -1
  bool live, nan;
};

template <class LT>
__device__ void backward_token(const MrVbParams& p, int64_t tok, BwdTok& T) {
  const int K = int(p.num_classes);
  const int64_t N = p.tokens, b = tok / N, n = tok - b * N;
  const int64_t x0 = p.x0.data[b * p.x0.stride_batch + n * p.x0.stride_token];
  const int64_t xt = p.x_t.data[b * p.x_t.stride_batch + n * p.x_t.stride_token];
  const double* saved = p.saved + tok * kMrVbSaved;
  T.in_off = b * p.logits.stride_batch + n * p.logits.stride_token;
  T.out_off = b * p.grad_stride_batch + n * p.grad_stride_token;
  T.s = -1;
  T.x0 = -1;
  // NaN saved M: the forward flagged the token. The index checks only keep a mismatched call
  // from reading out of bounds.
  T.nan = isnan(saved[0]) || x0 < 0 || x0 >= K || xt < 0 || xt > K;
  if (T.nan) return;
  const double g_vb = p.grad_vb ? double(p.grad_vb[tok]) : 0.0;
  const double g_aux = p.grad_aux ? double(p.grad_aux[tok]) : 0.0;
  const float M = float(saved[0]);
  const double P = saved[1], Y = saved[2], Pi = saved[3], Tv = saved[4];
  mr::TokenCoefs k = mr::token_coefs(p.coefs + b * kMrCoefs, xt, K);
  if (!k.t0) mr::normalise(&k, Y);  // the forward's Y: the same scale as the forward
  const mr::GradCoefs gc = mr::grad_coefs(k, K, x0, P, Y, Pi, Tv, g_vb, g_aux);
  T.M = M;
  T.c1 = float(gc.c1);
  T.c2 = float(gc.c2);
  T.ug = float(k.u_g);
  T.vy = float(k.v_g * Y);
  T.x0 = int(x0);
  auto p_at = [&](int64_t j) {  // the forward's p_j
    return double(expf(LT::load(p.logits.data, T.in_off + j * p.logits.stride_class) - M));
  };
  T.g_x0 = float(mr::special_grad(k, K, x0, x0, p_at(x0), P, Y, Pi, Tv, g_vb, g_aux));
  if (k.s >= 0 && k.s != x0) {
    const double p_s = p_at(k.s);
    T.g_s = float(mr::special_grad(k, K, x0, k.s, p_s, P, Y, Pi, Tv, g_vb, g_aux));
    T.s = int(k.s);
  }
}

template <class LT>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    vb_backward_kernel(const MrVbParams p, const Geo g, bool in_token_fast, bool out_token_fast) {
  IMGTX_DYNAMIC_SHARED(float, cache);  // staged gradients (G rows of S floats) when S > 0
  IMGTX_SHARED(BwdTok[kMaxG], tok_s);
  const int K = int(p.num_classes);
  const int step = kThreads >> g.log2G;
  const Lane mi = map_thread(in_token_fast, g), mo = map_thread(out_token_fast, g);
  const bool staged = g.S > 0;

  for (int64_t tile = blockIdx.x; tile < g.tiles; tile += gridDim.x) {
    if (int(threadIdx.x) < g.G) {
      BwdTok& T = tok_s[threadIdx.x];
      const int64_t tok = tile * g.G + threadIdx.x;
      T.live = tok < g.total;
      if (T.live) backward_token<LT>(p, tok, T);
    }
    __syncthreads();
    const BwdTok T = tok_s[mi.t];  // a register copy: the stores below may alias shared memory
    if (T.live) {
      float* srow = staged ? cache + mi.t * g.S : nullptr;
      const void* z = p.logits.data;
      const int64_t zsc = p.logits.stride_class;
#pragma unroll 4
      for (int j = mi.r; j < K; j += step) {
        float gr;
        if (T.nan) {
          gr = kNaN;
        } else if (j == T.x0) {
          gr = T.g_x0;
        } else if (j == T.s) {
          gr = T.g_s;
        } else {  // the forward's p_j (same expression), then p_j (c1 - c2 / pi_generic)
          const float e = expf(LT::load(z, T.in_off + int64_t(j) * zsc) - T.M);
          gr = T.c2 == 0.f ? e * T.c1
                           : e * (T.c1 - T.c2 / fmaxf(fmaf(T.ug, e, T.vy), mr::kPiFloor));
        }
        if (staged) {
          srow[j] = gr;
        } else {
          LT::store(p.grad_logits, T.out_off + int64_t(j) * p.grad_stride_class, gr);
        }
      }
    }
    if (staged) {
      __syncthreads();
      const int64_t out_off = tok_s[mo.t].out_off;
      if (tok_s[mo.t].live) {
        const float* srow = cache + mo.t * g.S;
        for (int j = mo.r; j < K; j += step)
          LT::store(p.grad_logits, out_off + int64_t(j) * p.grad_stride_class, srow[j]);
      }
    }
    __syncthreads();  // the next tile rewrites tok_s and the cache
  }
}

// ---- forward noising ------------------------------------------------------------------------
// One thread per token, as the CPU's mr_q_sample_cpu (same draws: counter = flat token index).
__global__ void __launch_bounds__(kThreads) q_sample_kernel(const MrQSampleParams p,
                                                             int64_t total, int* status) {
  const uint64_t seed = uint64_t(*p.seed);
  const int64_t K = p.num_classes, N = p.tokens;
  int status_bits = 0;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t b = i / N, n = i - b * N;
    const int64_t x0 = p.x0.data[b * p.x0.stride_batch + n * p.x0.stride_token];
    if (x0 < 0 || x0 >= K) {
      p.x_t[i] = -1;
      status_bits |= kMrBadIndex;
      continue;
    }
    const double* c = p.coefs + b * kMrCoefs;
    double u0, u1;
    philox_uniform2(seed, uint64_t(i), kMrStreamQSample, &u0, &u1);
    p.x_t[i] = mr::q_sample_token(c, x0, K, u0, u1);
  }
  if (status_bits != 0 && status != nullptr) atomicOr(status, status_bits);
}

// ---- host side ------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int log2_of(int G) { return G >= 8 ? 3 : G >= 4 ? 2 : G >= 2 ? 1 : 0; }

// A layout is token-fast when consecutive tokens are adjacent and classes are not.
bool token_fast_layout(int64_t stride_class, int64_t stride_token, int64_t tokens) {
  return tokens > 1 && stride_token == 1 && stride_class != 1;
}

// Tokens per tile for rows read class-fast: enough threads per token (>= 8 classes each).
int rows_per_tile(int64_t K) { return K <= 256 ? 8 : K <= 512 ? 4 : K <= 1024 ? 2 : 1; }

// Row stride of the cache: for G > 1 it is == 32 / G (mod 32), so the G x (32 / G) lanes of a
// token-fast warp hit 32 different banks; rows read class-fast never conflict.
int64_t row_stride(int64_t K, int G) { return G == 1 ? K : ceil_div(K, 32) * 32 + 32 / G; }
size_t tile_bytes(int64_t K, int G) { return size_t(G) * size_t(row_stride(K, G)) * sizeof(float); }

// Dynamic shared memory a block may use on the current device (its opt-in limit minus the
// kernels' static shared memory).
size_t max_dynamic_smem() {
  int dev = 0, optin = 0;
  IMGTX_CUDA_CHECK(cudaGetDevice(&dev));
  IMGTX_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return optin > kStaticSmemReserve ? size_t(optin - kStaticSmemReserve) : 0;
}

Geo make_geo(int G, int64_t S, int64_t total) {
  Geo g;
  g.G = G;
  g.log2G = log2_of(G);
  g.S = int(S);
  g.total = total;
  g.tiles = ceil_div(total, G);
  return g;
}

// Multi-pass kernels: the largest tile (up to the preferred G) whose rows fit the soft budget;
// a single row over it if the device allows; else no cache (every pass re-reads global memory).
Geo plan_cached(int64_t K, int64_t total, bool token_fast, size_t max_dyn) {
  int G = token_fast ? kMaxG : rows_per_tile(K);
  while (G > 1 && tile_bytes(K, G) > kSmemBudget) G >>= 1;
  if (tile_bytes(K, G) <= max_dyn) return make_geo(G, row_stride(K, G), total);
  return make_geo(token_fast ? kMaxG : 1, 0, total);
}

// Kernels launched with more than the default 48 KB of dynamic shared memory must opt in. The
// limit is always set to the device maximum (never to this call's size), so concurrent host
// threads cannot lower it under each other's launches.
template <class Kernel>
void allow_smem(Kernel* kernel, size_t bytes, size_t max_dyn) {
  if (bytes == 0) return;
  IMGTX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                        int(cudaSharedmemCarveoutMaxShared)));
  if (bytes > kDefaultSmem)
    IMGTX_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(max_dyn)));
}

unsigned grid_for(const Geo& g) { return unsigned(std::min(g.tiles, kMaxGrid)); }
size_t smem_for(const Geo& g) { return size_t(g.G) * size_t(g.S) * sizeof(float); }

}  // namespace

void mr_posterior_cuda(const MrPosteriorParams& p, int* status, void* stream) {
  validate(p);
  const int64_t total = p.batch * p.tokens;
  if (total == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t K = p.num_classes;
  const size_t max_dyn = max_dynamic_smem();
  const Geo g = plan_cached(K, total,
                            token_fast_layout(p.logp.stride_class, p.logp.stride_token, p.tokens),
                            max_dyn);
  const bool token_fast = g.G > 1 &&
                          token_fast_layout(p.logp.stride_class, p.logp.stride_token, p.tokens);
  const bool out_token_fast =
      g.G > 1 && p.log_probs != nullptr &&
      token_fast_layout(p.out_stride_class, p.out_stride_token, p.tokens);
  const size_t smem = smem_for(g);
  dispatch_dtype(p.logp.dtype, [&](auto lt) {
    using LT = decltype(lt);
    auto* kernel = token_fast ? posterior_kernel<LT, true> : posterior_kernel<LT, false>;
    allow_smem(kernel, smem, max_dyn);
    if (token_fast)
      IMGTX_LAUNCH(grid_for(g), kThreads, smem, st, posterior_kernel<LT, true>)(p, g, out_token_fast, status);
    else
      IMGTX_LAUNCH(grid_for(g), kThreads, smem, st, posterior_kernel<LT, false>)(p, g, out_token_fast, status);
  });
  check_last_launch("mr_posterior posterior_kernel");
}

void mr_q_sample_cuda(const MrQSampleParams& p, int* status, void* stream) {
  validate(p);
  const int64_t total = p.batch * p.tokens;
  if (total == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const unsigned grid = unsigned(std::min(ceil_div(total, kThreads), kMaxGrid));
  IMGTX_LAUNCH(grid, kThreads, 0, st, q_sample_kernel)(p, total, status);
  check_last_launch("mr_q_sample q_sample_kernel");
}

void mr_vb_forward_cuda(const MrVbParams& p, int* status, void* stream) {
  validate(p, false);
  const int64_t total = p.batch * p.tokens;
  if (total == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const size_t max_dyn = max_dynamic_smem();
  const bool layout_tf = token_fast_layout(p.logits.stride_class, p.logits.stride_token, p.tokens);
  const Geo g = plan_cached(p.num_classes, total, layout_tf, max_dyn);
  const bool token_fast = g.G > 1 && layout_tf;
  const size_t smem = smem_for(g);
  dispatch_dtype(p.logits.dtype, [&](auto lt) {
    using LT = decltype(lt);
    auto* kernel = token_fast ? vb_forward_kernel<LT, true> : vb_forward_kernel<LT, false>;
    allow_smem(kernel, smem, max_dyn);
    if (token_fast)
      IMGTX_LAUNCH(grid_for(g), kThreads, smem, st, vb_forward_kernel<LT, true>)(p, g, status);
    else
      IMGTX_LAUNCH(grid_for(g), kThreads, smem, st, vb_forward_kernel<LT, false>)(p, g, status);
  });
  check_last_launch("mr_vb_forward vb_forward_kernel");
}

void mr_vb_backward_cuda(const MrVbParams& p, void* stream) {
  validate(p, true);
  const int64_t total = p.batch * p.tokens;
  if (total == 0) return;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t K = p.num_classes;
  const bool in_tf = token_fast_layout(p.logits.stride_class, p.logits.stride_token, p.tokens);
  const bool out_tf = token_fast_layout(p.grad_stride_class, p.grad_stride_token, p.tokens);
  // kMaxG tokens per tile whatever K: the per-token prologue (float64 scalar math, a few
  // dependent loads) then runs on kMaxG lanes at once; class-fast, each token gets one warp.
  int G = kMaxG;
  int64_t S = 0;
  size_t max_dyn = 0;
  if (in_tf != out_tf) {  // stage through shared memory when a tile fits the budget
    int Gs = G;
    while (Gs > 1 && tile_bytes(K, Gs) > kSmemBudget) Gs >>= 1;
    if (Gs > 1) {
      max_dyn = max_dynamic_smem();
      if (tile_bytes(K, Gs) <= max_dyn) {
        G = Gs;
        S = row_stride(K, Gs);
      }
    }
  }
  const Geo g = make_geo(G, S, total);
  const size_t smem = smem_for(g);
  dispatch_dtype(p.logits.dtype, [&](auto lt) {
    using LT = decltype(lt);
    auto* kernel = vb_backward_kernel<LT>;
    allow_smem(kernel, smem, max_dyn);
    IMGTX_LAUNCH(grid_for(g), kThreads, smem, st, vb_backward_kernel<LT>)(p, g, in_tf && G > 1, out_tf && G > 1);
  });
  check_last_launch("mr_vb_backward vb_backward_kernel");
}

}  // namespace imgtx
