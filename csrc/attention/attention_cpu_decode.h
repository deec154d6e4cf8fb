// The CPU attention forward for a few queries per head (KV-cache decoding): memory-bound.
//
// With one query per head the 32-lane tiles of the main kernel would be 97% padding, and the
// work is reading K and V once: 4 * D flops per 8 * D bytes. This path streams each key and
// value row once per kv head and serves every query row that shares it (the group's heads x
// the new tokens, GQA/MQA included): scores are dot products reduced in registers, values
// are accumulated row-wise. Long caches are split across threads ("flash decoding") and the
// partial (max, sum, output) of the splits merged by their log-sum-exp.
#pragma once

#include "attention/attention_cpu_tile.h"
#include "common/thread_pool.h"

namespace imgtx {
namespace IMGTX_CPU_NS {
namespace attn_cpu {

// Queries per head up to which the decode path is used.
constexpr int64_t kDecodeMaxQueries = 4;

// Rows fetched ahead in the decode loops. Decoding streams K and V from DRAM once; the
// hardware prefetcher alone kept one core near 13 GB/s (K and V blocks alternate, and every
// block restarts both streams), software prefetch of both rows 16 keys ahead keeps the loads
// in flight.
constexpr int64_t kPrefetchRows = 16;

inline void prefetch_row(const AttnTensor& t, int64_t b, int64_t h, int64_t row, int64_t dim) {
  const char* ptr = row_ptr(t, b, h, row);
  const int64_t bytes = dim * dtype_size(t.dtype);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(ptr + o);
}

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

// o[0, NV * W) += sum_t p[t] * v[t][d0, d0 + NV * W).
template <int W, int NV>
inline void accumulate_rows(const float* p, const float* const* v, int64_t count, float* o,
                            int64_t d0) {
  typedef typename simd::Vec<W>::F F;
  F acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = simd::load<W>(o + i * W);
  for (int64_t t = 0; t < count; ++t) {
    const F pw = simd::broadcast<W>(p[t]);
    const float* row = v[t] + d0;
    for (int i = 0; i < NV; ++i) acc[i] += pw * simd::load<W>(row + i * W);
  }
  for (int i = 0; i < NV; ++i) simd::store<W>(o + i * W, acc[i]);
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

// out[t] = q . k[t] for t < count (-inf where kpos[t] > qpos: causal keys the query cannot see).
template <int W>
void dot_rows(const float* q, const float* const* k, int64_t count, int64_t dp,
              const int32_t* kpos, int32_t qpos, float* out) {
  typedef typename simd::Vec<W>::F F;
  const float ninf = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
  if constexpr (W == 16) {
    typedef simd::Vec<16>::I I;
    for (; t + 16 <= count; t += 16) {
      F acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = simd::load<16>(q) * simd::load<16>(k[t + i]);
      for (int64_t d = 16; d < dp; d += 16) {
        const F qd = simd::load<16>(q + d);
        for (int i = 0; i < 16; ++i) acc[i] += qd * simd::load<16>(k[t + i] + d);
      }
      I kp;
      std::memcpy(&kp, kpos + t, sizeof(kp));
      simd::store<16>(out + t, kp > qpos ? simd::splat<16>(ninf) : reduce16(acc));
    }
  }
  for (; t < count; ++t) {
    F acc = simd::load<W>(q) * simd::load<W>(k[t]);
    for (int64_t d = W; d < dp; d += W) acc += simd::load<W>(q + d) * simd::load<W>(k[t] + d);
    out[t] = kpos[t] > qpos ? ninf : hsum_lanes<W>(acc);
  }
}

template <int W>
void attention_decode_driver(const AttnForwardParams& p, int num_threads) {
  typedef typename simd::Vec<W>::F F;
  const int64_t D = p.head_dim, Dv = p.v_dim;
  const int64_t dp = round_up(D, W), dvp = round_up(Dv, W);
  const int64_t group = p.heads / p.kv_heads;
  const attn::AttnPlan plan(p, kDecodeMaxQueries);
  const int64_t tiles = plan.num_tiles();
  const int64_t R = group * plan.max_rows();  // query rows sharing one kv head's keys
  const int64_t bk = 256;
  const int64_t units = p.batch * p.kv_heads * tiles;
  const int64_t blocks_max = (p.k_len + bk - 1) / bk;
  int64_t splits = 1;
  if (units < 4 * int64_t(num_threads))
    splits = std::max<int64_t>(1, std::min(blocks_max, (4 * int64_t(num_threads) + units - 1) / units));
  const int64_t tasks = units * splits;
  const int workers = parallel_workers(tasks, num_threads);
  const bool has_mask = p.mask.kind != AttnMaskKind::kNone;
  const float ninf = -std::numeric_limits<float>::infinity();

  // Partial results per task: R rows of (m, l, o[dvp]).
  const int64_t part_ld = dvp + 2;
  std::vector<float> partial(size_t(tasks * R * part_ld));

  struct Scratch {
    attn::QueryTile tile;
    KeyBlock blk;
    std::vector<float> q, s, vrow, kbuf, vbuf;
    std::vector<const float*> kptr, vptr;
    std::vector<int64_t> head, row;
    std::vector<int32_t> qpos;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(workers));
  for (auto& s : scratch) {
    s.q.resize(size_t(R * dp));
    s.s.resize(size_t(R * bk));
    s.kbuf.resize(size_t(bk * dp));
    s.kptr.resize(size_t(bk));
    s.vrow.resize(size_t(dvp));
    s.vbuf.resize(size_t(bk * dvp));
    s.vptr.resize(size_t(bk));
    s.head.resize(size_t(R));
    s.row.resize(size_t(R));
    s.qpos.resize(size_t(R));
  }

  parallel_for(tasks, num_threads, [&](int64_t task, int worker) {
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

    KeyBlocks blocks(s.tile, bk);
    for (int64_t n = 0; blocks.next(s.blk); ++n) {
      if (n % splits != split) continue;
      const KeyBlock& blk = s.blk;
      const int64_t cnt = blk.count;
      // Scores S[r][t]: K rows (fp32 in place, or converted into s.kbuf) in groups of
      // kGroup keys; each row's dot products reduced across lanes together.
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t j = blk.row[size_t(t)];
        if (t + kPrefetchRows < cnt) {  // the K row and the V row this block will want later
          prefetch_row(p.k, b, g, blk.row[size_t(t + kPrefetchRows)], D);
          prefetch_row(p.v, b, g, blk.row[size_t(t + kPrefetchRows)], Dv);
        }
        if (p.k.dtype == DType::kFloat32 && D == dp) {
          s.kptr[size_t(t)] = reinterpret_cast<const float*>(row_ptr(p.k, b, g, j));
        } else {
          load_row(p.k, b, g, j, D, dp, s.kbuf.data() + t * dp);
          s.kptr[size_t(t)] = s.kbuf.data() + t * dp;
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        dot_rows<W>(s.q.data() + r * dp, s.kptr.data(), cnt, dp, blk.kpos.data(),
                    s.qpos[size_t(r)], s.s.data() + r * bk);
      if (has_mask)
        for (int64_t r = 0; r < rows; ++r)
          apply_mask_row(p.mask, b, s.head[size_t(r)], s.row[size_t(r)], blk, cnt,
                         s.s.data() + r * bk, 1);
      // Online softmax per row; P overwrites S.
      for (int64_t r = 0; r < rows; ++r) {
        float* sr = s.s.data() + r * bk;
        float* pr = part + r * part_ld;
        float mx = pr[0];
        for (int64_t t = 0; t < cnt; ++t) mx = sr[t] > mx ? sr[t] : mx;
        const float use = mx == ninf ? 0.0f : mx;
        const float alpha = std::exp(pr[0] - use);
        int64_t t = 0;
        F sum{};
        for (; t + W <= cnt; t += W) {
          const F e = simd::exp<W>(simd::load<W>(sr + t) - use);
          simd::store<W>(sr + t, e);
          sum += e;
        }
        float tail = 0.0f;
        for (; t < cnt; ++t) {
          sr[t] = sr[t] == ninf ? 0.0f : std::exp(sr[t] - use);
          tail += sr[t];
        }
        pr[0] = mx;
        pr[1] = pr[1] * alpha + hsum_lanes<W>(sum) + tail;
        if (alpha != 1.0f)
          for (int64_t d = 0; d < dvp; ++d) pr[2 + d] *= alpha;
      }
      // O[r] += sum_t P[r][t] V[t]: per row, up to 4 vectors of O stay in registers while
      // the block's V rows (L1/L2-resident after the first row) stream past.
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t j = blk.row[size_t(t)];
        if (p.v.dtype == DType::kFloat32 && Dv == dvp) {
          s.vptr[size_t(t)] = reinterpret_cast<const float*>(row_ptr(p.v, b, g, j));
        } else {
          load_row(p.v, b, g, j, Dv, dvp, s.vbuf.data() + t * dvp);
          s.vptr[size_t(t)] = s.vbuf.data() + t * dvp;
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* pr = s.s.data() + r * bk;
        float* o = part + r * part_ld + 2;
        int64_t d0 = 0;
        for (; d0 + 4 * W <= dvp; d0 += 4 * W) accumulate_rows<W, 4>(pr, s.vptr.data(), cnt, o + d0, d0);
        for (; d0 < dvp; d0 += W) accumulate_rows<W, 1>(pr, s.vptr.data(), cnt, o + d0, d0);
      }
    }
  });

  // Merge the splits of every (batch, kv head, tile) and write out and lse.
  parallel_for(units, num_threads, [&](int64_t unit, int worker) {
    Scratch& s = scratch[size_t(worker)];
    const int64_t t = unit % tiles, bg = unit / tiles;
    const int64_t b = bg / p.kv_heads, g = bg % p.kv_heads;
    plan.tile(t, b, s.tile);
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
  });
}

}  // namespace attn_cpu
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
