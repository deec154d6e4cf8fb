// The CPU attention forward for a few queries per head (KV-cache decoding): memory-bound.
//
// With one query per head the 32-lane tiles of the main kernel would be 97% padding, and the
// work is reading K and V once: 4 * D flops per 8 * D bytes. This path streams each key and
// value row once per kv head and serves every query row that shares it (the group's heads x
// the new tokens, GQA/MQA included). It walks the keys in chunks (16, or a vector's width of
// keys in the fused loops): the chunk's K rows give the scores (dot products reduced in
// registers), an online-softmax step rescales the running output, and the same chunk's V rows
// are accumulated, so K and V are read as two streams side by side and the hardware
// prefetcher keeps both running. (Scoring a whole block of keys before reading its values
// alternates the streams instead: each restart leaves the core waiting on memory, 70-75% of
// the plain read rate measured on one core.) Long caches are split across threads ("flash
// decoding") and the partial (max, sum, output) of the splits merged by their log-sum-exp.
#pragma once

#include "attention/attention_cpu_tile.h"
#include "common/thread_pool.h"

namespace imgtx {
namespace IMGTX_CPU_NS {
namespace attn_cpu {

// Queries per head up to which the decode path is used.
constexpr int64_t kDecodeMaxQueries = 4;

// Keys per step of the decode loop (one 16-lane score vector).
constexpr int64_t kDecodeChunk = 16;

// A call with less work than this (cached K and V elements read, times the query rows that
// share them) runs on the calling thread alone. Handing tasks to a second thread costs ~3 us
// (its wake-up and the join), about what one core takes to read 768 KB of fp32 keys and values
// from its cache with the one-loop kernel (decode_row_fused). Measured through
// imgtx_fast.attention on torch's team, (1, 8, 1, 64) queries, 1 thread against 2: 96 cached
// keys 8.7 against 10.3 us, 128 keys 9.5 against 10.5, 192 keys 11.8 against 11.9, 256 keys
// 14.1 against 13.0, 384 keys 21.7 against 15.0.
constexpr int64_t kDecodeSerialWork = 192 * 1024;

template <int W>
inline float hsum_lanes(typename simd::Vec<W>::F v) {
  if constexpr (W == 16) {
    return hsum_lanes<8>(simd::Halves<16>::lo(v) + simd::Halves<16>::hi(v));
  } else if constexpr (W == 8) {
    const typename simd::Vec<4>::F h = simd::Halves<8>::lo(v) + simd::Halves<8>::hi(v);
    return (h[0] + h[2]) + (h[1] + h[3]);
  } else {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
}

// The rows of a block read in place: row t at base + t * ld. (The other row source is an
// array of row pointers; both index as rows[t].)
struct StridedRows {
  const float* base;
  int64_t ld;
  const float* operator[](int64_t t) const { return base + t * ld; }
};

// Rows in place at a stride known when compiled (K and V stored [..., keys, dim], dim padded
// already): the 16 rows of a chunk are addressed by constant offsets, not 16 registers.
template <int64_t LD>
struct FixedStrideRows {
  const float* base;
  const float* operator[](int64_t t) const { return base + t * LD; }
};

// o[0, NV * W) = alpha * o + sum_t p[t] * v[t][d0, d0 + NV * W): the running output rescaled
// in registers (not in a pass over o of its own) and the chunk's rows added. Even and odd keys
// go to separate accumulators, 8 dependent FMAs per vector a chunk instead of 16. From the L2
// (1 thread, 2 MiB of K and V) the two together read 0-7% faster. 64-key chunks with 8
// accumulators gained up to 10% more there but lost 13% reading from memory (the K and V
// streams then alternate, see above); 4 accumulators on 16 keys gained nothing.
template <int W, int NV, class Rows>
inline void accumulate_rows(const float* p, Rows v, int64_t count, float* o, int64_t d0,
                            float alpha) {
  typedef typename simd::Vec<W>::F F;
  const F a = simd::broadcast<W>(alpha);
  F acc[NV], odd[NV];
  for (int i = 0; i < NV; ++i) acc[i] = simd::load<W>(o + i * W) * a, odd[i] = F{};
  int64_t t = 0;
  for (; t + 2 <= count; t += 2) {
    const F p0 = simd::broadcast<W>(p[t]), p1 = simd::broadcast<W>(p[t + 1]);
    const float* r0 = v[t] + d0;
    const float* r1 = v[t + 1] + d0;
    for (int i = 0; i < NV; ++i) {
      acc[i] += p0 * simd::load<W>(r0 + i * W);
      odd[i] += p1 * simd::load<W>(r1 + i * W);
    }
  }
  if (t < count) {
    const F p0 = simd::broadcast<W>(p[t]);
    const float* r0 = v[t] + d0;
    for (int i = 0; i < NV; ++i) acc[i] += p0 * simd::load<W>(r0 + i * W);
  }
  for (int i = 0; i < NV; ++i) simd::store<W>(o + i * W, acc[i] + odd[i]);
}

// 16 lane-sums at once: acc[i] holds key i's partial dot products; returns the vector of
// the 16 totals, lane i = key i. Four rounds of "shuffle the two halves apart and add" (each
// halves the vector count and the partials per key), 45 instructions against 16 separate
// horizontal sums of ~6 each.
inline simd::Vec<16>::F reduce16(const simd::Vec<16>::F* acc) {
  typedef simd::Vec<16>::F F;
  F u[8], v[4], w[2];
  for (int i = 0; i < 8; ++i)  // halves: [key i | key i + 8]
    u[i] = __builtin_shufflevector(acc[i], acc[i + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(acc[i], acc[i + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // quarters: [i, i + 4, i + 8, i + 12]
    v[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // pairs in quarter Q: [v_i[Q], v_{i+2}[Q]]
    w[i] = __builtin_shufflevector(v[i], v[i + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(v[i], v[i + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(w[0], w[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(w[0], w[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// reduce16 for 8-lane vectors (AVX2): acc[i] holds key i's partial dot products; returns the
// vector of the 8 totals, lane i = key i. Three rounds of "shuffle the two halves apart and add".
inline simd::Vec<8>::F reduce8(const simd::Vec<8>::F* acc) {
  typedef simd::Vec<8>::F F;
  F u[4], v[2];
  for (int i = 0; i < 4; ++i)  // halves: [key i | key i + 4]
    u[i] = __builtin_shufflevector(acc[i], acc[i + 4], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(acc[i], acc[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)  // pairs: [i, i + 2, i + 4, i + 6]
    v[i] = __builtin_shufflevector(u[i], u[i + 2], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(u[i], u[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(v[0], v[1], 0, 8, 2, 10, 4, 12, 6, 14) +
         __builtin_shufflevector(v[0], v[1], 1, 9, 3, 11, 5, 13, 7, 15);
}

// W lane-sums at once (W = 8 or 16): lane i of the result = the sum of acc[i]'s lanes.
template <int W>
inline typename simd::Vec<W>::F reduce_lanes(const typename simd::Vec<W>::F* acc) {
  static_assert(W == 8 || W == 16, "reduce_lanes: 8 or 16 lanes");
  if constexpr (W == 16)
    return reduce16(acc);
  else
    return reduce8(acc);
}

// out[t] = q . k[t] for t < count (-inf where kpos[t] > qpos: causal keys the query cannot see).
// NQ > 0: the padded width is NQ vectors, known when compiled (the loops unroll); 0: dp_rt.
template <int W, int NQ, class Rows>
inline void dot_rows(const float* q, Rows k, int64_t count, int64_t dp_rt, const int32_t* kpos,
                     int32_t qpos, float* out) {
  typedef typename simd::Vec<W>::F F;
  const int64_t dp = NQ > 0 ? int64_t(NQ) * W : dp_rt;
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
  if constexpr (W >= 8) {
    typedef typename simd::Vec<W>::I I;
    for (; t + W <= count; t += W) {
      F acc[W];
      for (int i = 0; i < W; ++i) acc[i] = simd::load<W>(q) * simd::load<W>(k[t + i]);
      for (int64_t d = W; d < dp; d += W) {
        const F qd = simd::load<W>(q + d);
        for (int i = 0; i < W; ++i) acc[i] += qd * simd::load<W>(k[t + i] + d);
      }
      I kp;
      std::memcpy(&kp, kpos + t, sizeof(kp));
      simd::store<W>(out + t, kp > qpos ? simd::splat<W>(ninf) : reduce_lanes<W>(acc));
    }
  }
  for (; t < count; ++t) {
    F acc = simd::load<W>(q) * simd::load<W>(k[t]);
    for (int64_t d = W; d < dp; d += W) acc += simd::load<W>(q + d) * simd::load<W>(k[t] + d);
    out[t] = kpos[t] > qpos ? ninf : hsum_lanes<W>(acc);
  }
}

// The largest lane of v, whose lanes are never NaN.
template <int W>
inline float hmax_lanes(typename simd::Vec<W>::F v) {
  if constexpr (W == 16) {
    const typename simd::Vec<8>::F lo = simd::Halves<16>::lo(v), hi = simd::Halves<16>::hi(v);
    return hmax_lanes<8>(hi > lo ? hi : lo);
  } else if constexpr (W == 8) {
    const typename simd::Vec<4>::F lo = simd::Halves<8>::lo(v), hi = simd::Halves<8>::hi(v);
    const typename simd::Vec<4>::F m = hi > lo ? hi : lo;
    const float a = m[0] > m[2] ? m[0] : m[2], b = m[1] > m[3] ? m[1] : m[3];
    return a > b ? a : b;
  } else {
    return simd::hmax(v, W);
  }
}

// Whether a lane of v (never NaN) is above limit: one compare into a mask register on AVX-512.
template <int W>
inline bool any_above(typename simd::Vec<W>::F v, float limit) {
#if defined(__AVX512F__)
  if constexpr (W == 16)
    return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), _mm512_set1_ps(limit), _CMP_GT_OQ) != 0;
#endif
  return hmax_lanes<W>(v) > limit;
}

// How far (natural log) a score may rise above a row's reference max before the running sum
// and output are rescaled to a new one: below it, exp(s - m) <= e^8 ~ 2981, far from overflow.
constexpr float kRescaleMargin = 8.0f;

// One online-softmax step of a query row over `count` new scores s (overwritten by their
// exponentials P). pr = (m, ...): m is the row's reference max; `lanes` (W floats) holds the
// sum of the P in lane-wise parts (the tail keys' in lane 0), folded into l at the end
// (fold_lane_sums). Returns the factor the running output must be scaled by (accumulate_rows
// applies it in registers).
//
// Lazy rescaling: m moves only when a score exceeds it by kRescaleMargin, so a chunk usually
// takes one compare, the exponentials and a lane-wise add. The exact max of every chunk (a
// horizontal max, then a horizontal sum for l) was a chain of dependent shuffles per 16 keys
// that the next chunk's loads waited behind: a fifth of the decode loop from the L2. Any m
// gives the same softmax (P and l scale together); the merge and lse use the m kept here.
template <int W>
inline float softmax_step(float* s, int64_t count, float* pr, float* lanes) {
  typedef typename simd::Vec<W>::F F;
  const float ninf = -std::numeric_limits<float>::infinity();
  const float m = pr[0];
  int64_t t = 0;
  F mv = simd::splat<W>(ninf);  // never NaN: NaN scores never become the max (they still
  for (; t + W <= count; t += W) {  // reach l and O)
    const F x = simd::load<W>(s + t);
    mv = x > mv ? x : mv;
  }
  float tail_max = ninf;
  for (; t < count; ++t) tail_max = s[t] > tail_max ? s[t] : tail_max;
  const float limit = m + kRescaleMargin;  // -inf while the row has seen no key
  float alpha = 1.0f, ref = m;
  if (tail_max > limit || any_above<W>(mv, limit)) {  // (mv stays -inf under W scores)
    const float cmax = hmax_lanes<W>(mv);
    ref = cmax > tail_max ? cmax : tail_max;  // > m: the new reference
    alpha = std::exp(m - ref);                // 0 when m = -inf (l and O are 0 then)
    pr[0] = ref;
    simd::store<W>(lanes, simd::load<W>(lanes) * simd::broadcast<W>(alpha));
  }
  const float use = ref == ninf ? 0.0f : ref;  // every score -inf so far: P = 0
  t = 0;
  F sum = simd::load<W>(lanes);
  for (; t + W <= count; t += W) {
    const F e = simd::exp<W>(simd::load<W>(s + t) - use);
    simd::store<W>(s + t, e);
    sum += e;
  }
  simd::store<W>(lanes, sum);
  float tail = 0.0f;
  for (; t < count; ++t) {
    s[t] = s[t] == ninf ? 0.0f : std::exp(s[t] - use);
    tail += s[t];
  }
  lanes[0] += tail;
  return alpha;
}

// Where a partial row (m, l, o[dvp], ...) keeps the lane-wise parts of l.
inline float* lane_sums(float* pr, int64_t dvp) { return pr + 2 + dvp; }

// l = the sum of the lane-wise parts softmax_step kept: once per row and task.
template <int W>
inline void fold_lane_sums(float* pr, int64_t dvp) {
  pr[1] = hsum_lanes<W>(simd::load<W>(lane_sums(pr, dvp)));
}

// The query rows one task serves (one kv head's group x the tile's new tokens) and their
// running (m, l, o[dvp], the lane-wise sums of l[W]), part_ld floats a row.
struct DecodeRows {
  int64_t b = 0, count = 0, dp = 0, dvp = 0, part_ld = 0;
  const float* q = nullptr;  // count x dp, scaled
  const int64_t* head = nullptr;
  const int64_t* row = nullptr;
  const int32_t* qpos = nullptr;
  float* part = nullptr;
};

// Keys [c0, c0 + count) of the block, rows k[0, count) and v[0, count), for every query row:
// scores, mask, online-softmax step, O += P V. sc holds kDecodeChunk floats.
template <int W, int NQ, class Rows>
void decode_chunk(const AttnMask& mask, const DecodeRows& r, const KeyBlock& blk, int64_t c0,
                  int64_t count, Rows k, Rows v, float* sc) {
  for (int64_t i = 0; i < r.count; ++i) {
    dot_rows<W, NQ>(r.q + i * r.dp, k, count, r.dp, blk.kpos.data() + c0, r.qpos[i], sc);
    if (mask.kind != AttnMaskKind::kNone)
      apply_mask_row(mask, r.b, r.head[i], r.row[i], blk, c0, count, sc, 1);
    float* pr = r.part + i * r.part_ld;
    const float alpha = softmax_step<W>(sc, count, pr, lane_sums(pr, r.dvp));
    // O = alpha O + P V, up to 4 vectors of O in registers at a time.
    float* o = pr + 2;
    int64_t d0 = 0;
    for (; d0 + 4 * W <= r.dvp; d0 += 4 * W)
      accumulate_rows<W, 4>(sc, v, count, o + d0, d0, alpha);
    for (; d0 < r.dvp; d0 += W) accumulate_rows<W, 1>(sc, v, count, o + d0, d0, alpha);
  }
}

// The scores of keys [t, t + W) for the query row qv (NQ vectors): each dot product a tree of
// two FMA pairs (not one chain of NQ), reduced across lanes by reduce_lanes; lane i = key t + i.
template <int W, int NQ>
inline typename simd::Vec<W>::F chunk_scores(const typename simd::Vec<W>::F* qv,
                                             FixedStrideRows<NQ * W> k, int64_t t) {
  typedef typename simd::Vec<W>::F F;
  F acc[W];
  for (int i = 0; i < W; ++i) {
    const float* row = k[t + i];
    F a = qv[0] * simd::load<W>(row), b = F{};
    if constexpr (NQ > 1) a += qv[1] * simd::load<W>(row + W);
    for (int d = 2; d < NQ; d += 2) {
      F c = qv[d] * simd::load<W>(row + d * W);
      if (d + 1 < NQ) c += qv[d + 1] * simd::load<W>(row + (d + 1) * W);
      b += c;
    }
    acc[i] = a + b;
  }
  return reduce_lanes<W>(acc);
}

// decode_chunk's work for the most common call, over a block's full chunks in one loop: one
// query row per task (one new token, no query group), no mask, every key of the block visible
// (the plan trims a single row's keys to those it sees), fp32 K and V rows in place at a
// stride known when compiled, and Dv = D. The running output, its lane sums and the max stay
// in registers for the whole block, the dot products are trees (chunk_scores), and the
// softmax rescales lazily as softmax_step does. Separate functions per chunk kept the output
// in memory and the steps apart: the loop read its cache at 67-74% of a plain sum's rate from
// the L2 on one core; a single loop like this one reads at the sum's rate. A chunk is W keys.
// With fewer than 8 output vectors, even and odd keys go to separate accumulators (8 chains
// keep the two FMA ports busy); with 8 or more, one set (two would not fit in the registers).
// Returns the keys done (a multiple of W); the caller takes the rest chunk by chunk.
template <int W, int NQ>
int64_t decode_row_fused(const float* q, FixedStrideRows<NQ * W> k, FixedStrideRows<NQ * W> v,
                         int64_t count, float* pr, float* lanes) {
  typedef typename simd::Vec<W>::F F;
  constexpr bool kTwoSets = NQ < 8;
  const float ninf = -std::numeric_limits<float>::infinity();
  F qv[NQ], o[NQ], odd[kTwoSets ? NQ : 1];
  for (int d = 0; d < NQ; ++d) {
    qv[d] = simd::load<W>(q + d * W);
    o[d] = simd::load<W>(pr + 2 + d * W);
    if constexpr (kTwoSets) odd[d] = F{};
  }
  F l = simd::load<W>(lanes);
  float m = pr[0];
  alignas(64) float sc[W];
  int64_t t = 0;
  for (; t + W <= count; t += W) {
    const F s = chunk_scores<W, NQ>(qv, k, t);
    if (any_above<W>(s, m + kRescaleMargin)) {
      const F finite = s > simd::splat<W>(ninf) ? s : simd::splat<W>(ninf);  // NaN lanes out
      const float mx = hmax_lanes<W>(finite);
      const float alpha = std::exp(m - mx);
      const F a = simd::broadcast<W>(alpha);
      for (int d = 0; d < NQ; ++d) {
        o[d] *= a;
        if constexpr (kTwoSets) odd[d] *= a;
      }
      l *= a;
      m = mx;
    }
    const F p = simd::exp<W>(s - (m == ninf ? 0.0f : m));
    l += p;
    simd::store<W>(sc, p);
    for (int i = 0; i < W; i += 2) {
      const F p0 = simd::broadcast<W>(sc[i]), p1 = simd::broadcast<W>(sc[i + 1]);
      const float* r0 = v[t + i];
      const float* r1 = v[t + i + 1];
      for (int d = 0; d < NQ; ++d) {
        o[d] += p0 * simd::load<W>(r0 + d * W);
        if constexpr (kTwoSets)
          odd[d] += p1 * simd::load<W>(r1 + d * W);
        else
          o[d] += p1 * simd::load<W>(r1 + d * W);
      }
    }
  }
  for (int d = 0; d < NQ; ++d) {
    if constexpr (kTwoSets) o[d] += odd[d];
    simd::store<W>(pr + 2 + d * W, o[d]);
  }
  simd::store<W>(lanes, l);
  pr[0] = m;
  return t;
}

// decode_row_fused's loop for R query rows that share a kv head's keys (the heads of a GQA/MQA
// group, or a few new tokens that all see the block), under the same conditions. Per chunk:
// every row's scores (chunk_scores, over K rows the first row brought to the L1), then their
// lazy softmax steps side by side, then the chunk's V rows read once for all R rows. The
// running outputs stay in the partial rows (L1), loaded and stored once a chunk: R * NQ
// vectors do not fit in the registers beside the W dot-product accumulators.
// Measured from the L2 on one core, (1, 8, 1, 64) over 1 MiB of K and V, against chunk by
// chunk (decode_chunk: V read once per row, o loaded and stored per row, a call per step):
// 2 heads a kv head 22.3 -> 20.6 us, 4 heads 40 -> 29 us, 8 heads 76 -> 56 us (a plain sum:
// 11.5 us). Beyond one row the loop is compute-bound: at D = 64 a row and key take 8 FMAs and
// ~5 more vector instructions (the lane reduction, the exponential), while the key's 512 bytes
// are shared by the group. (Software prefetch of the next chunks, tried: no gain.)
// rows: q at q + r * q_ld (scaled), partial rows at part + r * part_ld. Returns the keys done.
template <int W, int NQ, int R>
int64_t decode_rows_fused(const float* q, int64_t q_ld, FixedStrideRows<NQ * W> k,
                          FixedStrideRows<NQ * W> v, int64_t count, float* part,
                          int64_t part_ld, int64_t dvp) {
  typedef typename simd::Vec<W>::F F;
  constexpr int kRegs = W == 16 ? 16 : 8;  // output vectors in registers (of 32, 16)
  constexpr int G = NQ < kRegs / R ? NQ : kRegs / R;  // a row's, R * G <= kRegs
  const float ninf = -std::numeric_limits<float>::infinity();
  alignas(64) float sc[R][W];
  int64_t t = 0;
  for (; t + W <= count; t += W) {
    F s[R];  // every row's scores first: the exponentials' chains then run side by side
    for (int r = 0; r < R; ++r) {
      const float* qr = q + r * q_ld;
      F qv[NQ];
      for (int d = 0; d < NQ; ++d) qv[d] = simd::load<W>(qr + d * W);
      s[r] = chunk_scores<W, NQ>(qv, k, t);
    }
    for (int r = 0; r < R; ++r) {
      float* pr = part + r * part_ld;
      if (!any_above<W>(s[r], pr[0] + kRescaleMargin)) continue;
      const F finite = s[r] > simd::splat<W>(ninf) ? s[r] : simd::splat<W>(ninf);  // NaN out
      const float mx = hmax_lanes<W>(finite);
      const F a = simd::broadcast<W>(std::exp(pr[0] - mx));
      for (int d = 0; d < NQ; ++d)
        simd::store<W>(pr + 2 + d * W, simd::load<W>(pr + 2 + d * W) * a);
      float* lanes = lane_sums(pr, dvp);
      simd::store<W>(lanes, simd::load<W>(lanes) * a);
      pr[0] = mx;
    }
    for (int r = 0; r < R; ++r) {
      float* pr = part + r * part_ld;
      float* lanes = lane_sums(pr, dvp);
      const F p = simd::exp<W>(s[r] - (pr[0] == ninf ? 0.0f : pr[0]));
      simd::store<W>(lanes, simd::load<W>(lanes) + p);
      simd::store<W>(sc[r], p);
    }
    for (int d0 = 0; d0 < NQ; d0 += G) {
      F o[R][G];
      for (int r = 0; r < R; ++r)
        for (int d = 0; d < G; ++d)
          if (d0 + d < NQ) o[r][d] = simd::load<W>(part + r * part_ld + 2 + (d0 + d) * W);
      for (int i = 0; i < W; ++i) {
        const float* row = v[t + i] + d0 * W;
        F pb[R];
        for (int r = 0; r < R; ++r) pb[r] = simd::broadcast<W>(sc[r][i]);
        for (int d = 0; d < G; ++d) {
          if (d0 + d >= NQ) break;
          const F x = simd::load<W>(row + d * W);
          for (int r = 0; r < R; ++r) o[r][d] += pb[r] * x;
        }
      }
      for (int r = 0; r < R; ++r)
        for (int d = 0; d < G; ++d)
          if (d0 + d < NQ) simd::store<W>(part + r * part_ld + 2 + (d0 + d) * W, o[r][d]);
    }
  }
  return t;
}

// The block's full chunks for every row of r by the fused loops: decode_rows_fused for groups
// of up to 4 rows, decode_row_fused for a row on its own. Returns the keys done (the same for
// every row).
template <int W, int NQ>
int64_t decode_fused(const DecodeRows& r, FixedStrideRows<NQ * W> k,
                     FixedStrideRows<NQ * W> v, int64_t count) {
  int64_t done = 0;
  for (int64_t i = 0; i < r.count;) {
    const int64_t n = std::min<int64_t>(4, r.count - i);
    const float* q = r.q + i * r.dp;
    float* part = r.part + i * r.part_ld;
    if (n == 4)
      done = decode_rows_fused<W, NQ, 4>(q, r.dp, k, v, count, part, r.part_ld, r.dvp);
    else if (n == 3)
      done = decode_rows_fused<W, NQ, 3>(q, r.dp, k, v, count, part, r.part_ld, r.dvp);
    else if (n == 2)
      done = decode_rows_fused<W, NQ, 2>(q, r.dp, k, v, count, part, r.part_ld, r.dvp);
    else
      done = decode_row_fused<W, NQ>(q, k, v, count, part, lane_sums(part, r.dvp));
    i += n;
  }
  return done;
}

// One task's blocks [first, last) of the tile's keys, a chunk at a time. Rows in place are
// addressed by stride: few instructions between one chunk's loads and the next's keep both
// in the core's out-of-order window (a pointer table per chunk cost 15-20% of the read rate).
template <int W, int NQ>
void decode_blocks(const AttnForwardParams& p, const DecodeRows& r, int64_t g,
                   KeyBlocks& blocks, KeyBlock& blk, int64_t first, int64_t last,
                   LineVector<float>& kbuf, LineVector<float>& vbuf) {
  constexpr int64_t C = kDecodeChunk;
  const int64_t D = p.head_dim, Dv = p.v_dim;
  const float* kptr[C];
  const float* vptr[C];
  alignas(64) float sc[C];
  // The keys of a block every row sees go through the fused loops (no mask, Dv = D, fp32 rows
  // in place): the whole block, or with causality and several new tokens, the block's keys up
  // to the earliest token's position (the last block's other keys then go chunk by chunk).
  const bool fusable = p.mask.kind == AttnMaskKind::kNone && r.dvp == r.dp;
  const int32_t qpos_min = *std::min_element(r.qpos, r.qpos + r.count);
  for (int64_t n = 0; n < last && blocks.next(blk); ++n) {
    if (n < first) continue;
    int64_t ldk = 0, ldv = 0;
    const float* kin = rows_in_place(p.k, r.b, g, blk, D, r.dp, ldk);
    const float* vin = rows_in_place(p.v, r.b, g, blk, Dv, r.dvp, ldv);
    int64_t c0 = 0;
    if constexpr (W >= 8 && NQ > 0) {  // (the portable build's 4 lanes: chunk by chunk)
      if (fusable && kin && vin && ldk == NQ * W && ldv == NQ * W) {
        int64_t seen = blk.count;  // the prefix of the block every row sees
        if (blk.kpos_max > qpos_min)
          for (seen = 0; seen < blk.count && blk.kpos[size_t(seen)] <= qpos_min;) ++seen;
        c0 = decode_fused<W, NQ>(r, FixedStrideRows<NQ * W>{kin},
                                 FixedStrideRows<NQ * W>{vin}, seen);
      }
    }
    for (; c0 < blk.count; c0 += C) {
      const int64_t cnt = std::min(C, blk.count - c0);
      if constexpr (NQ > 0) {
        if (kin && vin && ldk == NQ * W && ldv == NQ * W) {
          decode_chunk<W, NQ>(p.mask, r, blk, c0, cnt, FixedStrideRows<NQ * W>{kin + c0 * ldk},
                              FixedStrideRows<NQ * W>{vin + c0 * ldv}, sc);
          continue;
        }
      }
      if (kin && vin) {
        decode_chunk<W, NQ>(p.mask, r, blk, c0, cnt, StridedRows{kin + c0 * ldk, ldk},
                            StridedRows{vin + c0 * ldv, ldv}, sc);
        continue;
      }
      // Rows converted to fp32 (or gathered) into the scratch, chunk by chunk. The buffers are
      // made on first use: fp32 caches read in place never touch them (zeroing them on every
      // call took a fifth of a 64-key call).
      if (kbuf.empty()) kbuf.resize(size_t(C * r.dp)), vbuf.resize(size_t(C * r.dvp));
      for (int64_t i = 0; i < cnt; ++i) {
        const int64_t j = blk.row[size_t(c0 + i)];
        kptr[i] = row_fp32(p.k, r.b, g, j, D, r.dp, kbuf.data() + i * r.dp);
        vptr[i] = row_fp32(p.v, r.b, g, j, Dv, r.dvp, vbuf.data() + i * r.dvp);
      }
      decode_chunk<W, NQ>(p.mask, r, blk, c0, cnt, static_cast<const float* const*>(kptr),
                          static_cast<const float* const*>(vptr), sc);
    }
  }
}

template <int W>
void attention_decode_driver(const AttnForwardParams& p, int num_threads) {
  const int64_t D = p.head_dim, Dv = p.v_dim;
  const int64_t dp = round_up(D, W), dvp = round_up(Dv, W);
  const int64_t group = p.heads / p.kv_heads;
  const attn::AttnPlan plan(p, kDecodeMaxQueries);
  const int64_t tiles = plan.num_tiles();
  const int64_t R = group * plan.max_rows();  // query rows sharing one kv head's keys
  const int64_t bk = 256;
  const int64_t units = p.batch * p.kv_heads * tiles;
  const int64_t blocks_max = (p.k_len + bk - 1) / bk;
  const int64_t work = p.batch * p.kv_heads * p.k_len * (D + Dv) * R;
  const int threads = work < kDecodeSerialWork ? 1 : num_threads;
  int64_t splits = 1;
  if (threads > 1 && units < 4 * int64_t(threads))  // too few units to share out
    splits = std::max<int64_t>(1, std::min(blocks_max, (4 * int64_t(threads) + units - 1) / units));
  const int64_t tasks = units * splits;
  const int workers = parallel_workers(tasks, threads);
  const float ninf = -std::numeric_limits<float>::infinity();

  // Partial results per task: R rows of (m, l, o[dvp], l's lane sums[W]).
  // rows padded to whole cache lines: tasks on different workers write neighbouring rows
  const int64_t part_ld = line_padded<float>(dvp + 2 + W);
  LineVector<float> partial(size_t(tasks * R * part_ld));

  struct alignas(kCacheLine) Scratch {  // (cache_line.h: no line shared between workers)
    attn::QueryTile tile;
    KeyBlock blk;
    LineVector<float> q, vrow, kbuf, vbuf;
    LineVector<int64_t> head, row;
    LineVector<int32_t> qpos;
  };
  LineVector<Scratch> scratch(static_cast<size_t>(workers));
  for (auto& s : scratch) {
    s.q.resize(size_t(R * dp));
    s.vrow.resize(size_t(dvp));
    s.head.resize(size_t(R));
    s.row.resize(size_t(R));
    s.qpos.resize(size_t(R));
  }

  // Merges the splits of one (batch, kv head, tile) and writes its rows of out and lse; s.tile
  // must hold the unit's tile.
  auto merge = [&](int64_t unit, Scratch& s) {
    const int64_t bg = unit / tiles;
    const int64_t b = bg / p.kv_heads, g = bg % p.kv_heads;
    const int64_t nrows = int64_t(s.tile.rows.size());
    for (int64_t r = 0; r < group * nrows; ++r) {
      const int64_t h = g * group + r / nrows, row = s.tile.rows[size_t(r % nrows)];
      float M = ninf;
      for (int64_t c = 0; c < splits; ++c)
        M = std::max(M, partial[size_t(((unit * splits + c) * R + r) * part_ld)]);
      const float use = M == ninf ? 0.0f : M;
      float L = 0.0f;
      std::fill(s.vrow.begin(), s.vrow.end(), 0.0f);
      for (int64_t c = 0; c < splits; ++c) {
        const float* pr = partial.data() + ((unit * splits + c) * R + r) * part_ld;
        if (pr[1] == 0.0f) continue;
        const float w = std::exp(pr[0] - use);
        L += pr[1] * w;
        for (int64_t d = 0; d < Dv; ++d) s.vrow[size_t(d)] += pr[2 + d] * w;
      }
      const float inv = L > 0.0f ? 1.0f / L : 0.0f;
      for (int64_t d = 0; d < Dv; ++d) s.vrow[size_t(d)] *= inv;
      store_rounded_as_dtype(p.out.data,
                             b * p.out.stride_batch + h * p.out.stride_head + row * p.out.stride_row,
                             s.vrow.data(), Dv, p.out.dtype);
      if (p.lse)
        p.lse[(b * p.heads + h) * p.q_len + row] =
            L > 0.0f ? use + std::log(L) : (std::isnan(L) ? L : kLseEmpty);
    }
  };

  parallel_for(tasks, threads, [&](int64_t task, int worker) {
    Scratch& s = scratch[size_t(worker)];
    const int64_t split = task % splits, unit = task / splits;
    const int64_t t = unit % tiles, bg = unit / tiles;
    const int64_t b = bg / p.kv_heads, g = bg % p.kv_heads;
    plan.tile(t, b, s.tile);
    const int64_t nrows = int64_t(s.tile.rows.size());
    const int64_t rows = group * nrows;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = g * group + r / nrows, i = r % nrows;
      s.head[size_t(r)] = h;
      s.row[size_t(r)] = s.tile.rows[size_t(i)];
      s.qpos[size_t(r)] = s.tile.qpos[size_t(i)];
      float* q = s.q.data() + r * dp;
      load_row(p.q, b, h, s.row[size_t(r)], D, dp, q);
      for (int64_t d = 0; d < dp; ++d) q[d] *= p.scale;
    }
    float* part = partial.data() + task * R * part_ld;
    for (int64_t r = 0; r < rows; ++r) {
      part[r * part_ld] = ninf;       // m
      part[r * part_ld + 1] = 0.0f;   // l
      std::fill(part + r * part_ld + 2, part + (r + 1) * part_ld, 0.0f);
    }

    // This split's share of the tile's blocks: a contiguous range, so each thread streams
    // its part of K and V front to back.
    int64_t keys = 0;
    for (const attn::KeySegment& seg : s.tile.segments) keys += seg.len;
    const int64_t nblocks = (keys + bk - 1) / bk;
    const int64_t first = split * nblocks / splits, last = (split + 1) * nblocks / splits;
    DecodeRows r;
    r.b = b;
    r.count = rows;
    r.dp = dp;
    r.dvp = dvp;
    r.part_ld = part_ld;
    r.q = s.q.data();
    r.head = s.head.data();
    r.row = s.row.data();
    r.qpos = s.qpos.data();
    r.part = part;
    KeyBlocks blocks(s.tile, bk);
    LineVector<float>& kb = s.kbuf;  // (made by decode_blocks when rows need converting)
    LineVector<float>& vb = s.vbuf;
    if (dp == 4 * W)  // the common head widths get unrolled dot products
      decode_blocks<W, 4>(p, r, g, blocks, s.blk, first, last, kb, vb);
    else if (dp == 8 * W)
      decode_blocks<W, 8>(p, r, g, blocks, s.blk, first, last, kb, vb);
    else if (dp == 2 * W)
      decode_blocks<W, 2>(p, r, g, blocks, s.blk, first, last, kb, vb);
    else
      decode_blocks<W, 0>(p, r, g, blocks, s.blk, first, last, kb, vb);
    for (int64_t i = 0; i < rows; ++i) fold_lane_sums<W>(part + i * part_ld, dvp);
    if (splits == 1) merge(unit, s);
  });

  // With one split a task merges its own unit (one fork/join less: a few microseconds of a
  // short decode call); otherwise every unit's splits are merged once all tasks are done.
  if (splits > 1)
    parallel_for(units, threads, [&](int64_t unit, int worker) {
      Scratch& s = scratch[size_t(worker)];
      plan.tile(unit % tiles, unit / tiles / p.kv_heads, s.tile);
      merge(unit, s);
    });
}

}  // namespace attn_cpu
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
