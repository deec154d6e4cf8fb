// The CPU attention forward (flash-style online softmax), templated on the vector width.
//
// Task = one query tile of one (batch, head). For each key block the tile's plan allows, the
// block's K is read in place (fp32 rows at the padded width, consecutive) or else packed once
// into panels, and its V rows read (or converted when not fp32), then
// every 32-query subtile runs: S^T = K (scale Q)^T, masks on partial blocks only, the online
// softmax down the key axis (lane-wise), O^T = alpha O^T + V^T P^T (O kept transposed, turned
// into rows once at the end of the task). Extra memory is per worker:
// the tile's packed queries and fp32 accumulators plus one key block.
#pragma once

#include "attention/attention_cpu_decode.h"
#include "attention/attention_cpu_tile.h"
#include "common/thread_pool.h"

namespace imgtx {
namespace IMGTX_CPU_NS {
namespace attn_cpu {

// Key block size: K and V blocks of about 64 KB together (L2-resident while the subtiles
// stream past them), a multiple of the micro-kernels' row blocking.
template <int W>
int64_t key_block(int64_t dp, int64_t dvp) {
  const int64_t align = Shape<W>::kRowAlign;
  return std::max<int64_t>(align, std::min<int64_t>(256, round_up(16384 / (dp + dvp), align)));
}

// Query rows per task: the tallest of 1024, 512 and 256 that still gives every thread several
// tasks, else 128. A task reads each key block once for all its subtiles, so taller tiles read
// K and V fewer times. Packing costs per key dp scalar copies against 2 * dp * rows / W FMAs of
// products on it (at 128 rows ~10% of a 2-FMA-port core's time, at 256 half that). And a fused
// qkv projection's view puts each head's rows 3 * width floats apart, where the hardware
// prefetcher does not follow them and every row falls into the same few cache sets: there a
// (4, 8, 1024, 64) call took 5-7% longer at 256 rows than at 1024, which matched contiguous
// inputs (C++ harness, 2 threads, interleaved). Fewer, taller tasks would leave threads idle on
// short inputs; local patterns keep 128 (a taller tile's key segments cover more keys its rows
// cannot see).
inline int64_t forward_tile_rows(const AttnForwardParams& p, int num_threads) {
  if (p.pattern.kind != AttnPatternKind::kDense) return 128;
  for (int64_t rows = 1024; rows >= 256; rows /= 2)
    if (p.batch * p.heads * ((p.q_len + rows - 1) / rows) >= 4 * int64_t(num_threads)) return rows;
  return 128;
}

// Online softmax over one block for one subtile: st holds the block's scores [count][32] and
// becomes P; m, l are the running max and sum per lane; alpha receives exp(m_old - m_new).
// Returns whether any alpha differs from 1 (the accumulator then needs rescaling). Only the
// first V vectors of lanes are computed (live_lanes: the others hold no query).
template <int W, int V>
bool softmax_block(float* st, int64_t count, float* m, float* l, float* alpha) {
  typedef typename simd::Vec<W>::F F;
  const float ninf = -std::numeric_limits<float>::infinity();
  F mx[V], sum[V], use[V];
  for (int v = 0; v < V; ++v) mx[v] = simd::load<W>(m + v * W);
  for (int64_t t = 0; t < count; ++t)
    for (int v = 0; v < V; ++v) {
      const F x = simd::load<W>(st + t * kLanes + v * W);
      mx[v] = x > mx[v] ? x : mx[v];
    }
  bool rescale = false;
  for (int v = 0; v < V; ++v) {
    const F old = simd::load<W>(m + v * W);
    use[v] = mx[v] == ninf ? F{} : mx[v];  // no visible key yet: exp(-inf - 0) = 0
    const F a = simd::exp<W>(old - use[v]);
    simd::store<W>(alpha + v * W, a);
    simd::store<W>(m + v * W, mx[v]);
    for (int i = 0; i < W; ++i) rescale |= a[i] != 1.0f;
    sum[v] = F{};
  }
  for (int64_t t = 0; t < count; ++t)
    for (int v = 0; v < V; ++v) {
      float* ptr = st + t * kLanes + v * W;
      const F e = simd::exp<W>(simd::load<W>(ptr) - use[v]);
      simd::store<W>(ptr, e);
      sum[v] += e;
    }
  for (int v = 0; v < V; ++v)
    simd::store<W>(l + v * W, simd::load<W>(l + v * W) * simd::load<W>(alpha + v * W) + sum[v]);
  return rescale;
}

// softmax_block over the first `lanes` lanes (a multiple of W), the vector count fixed when
// compiled so that its loops unroll.
template <int W, int V = kLanes / W>
bool softmax_lanes(int lanes, float* st, int64_t count, float* m, float* l, float* alpha) {
  if constexpr (V > 1)
    if (lanes <= (V - 1) * W) return softmax_lanes<W, V - 1>(lanes, st, count, m, l, alpha);
  return softmax_block<W, V>(st, count, m, l, alpha);
}

template <int W>
void attention_forward_driver(const AttnForwardParams& p, int num_threads) {
  if (p.q_len <= kDecodeMaxQueries) return attention_decode_driver<W>(p, num_threads);
  constexpr int P = Shape<W>::kPanel;
  const int64_t D = p.head_dim, Dv = p.v_dim;
  const int64_t dp = round_up(D, W), dvp = round_up(Dv, W);
  const int64_t bk = key_block<W>(dp, dvp);
  const attn::AttnPlan plan(p, forward_tile_rows(p, num_threads));
  const int64_t tiles = plan.num_tiles();
  const int64_t max_sub = (plan.max_rows() + kLanes - 1) / kLanes;
  const int64_t tasks = p.batch * p.heads * tiles;
  const int workers = parallel_workers(tasks, num_threads);
  const int64_t group = p.heads / p.kv_heads;
  const bool has_mask = p.mask.kind != AttnMaskKind::kNone;

  struct alignas(kCacheLine) Scratch {  // (cache_line.h: no line shared between workers)
    attn::QueryTile tile;
    KeyBlock blk;
    LineVector<Subtile> sub;
    LineVector<bool> visited;  // per subtile: has O been written by a block yet
    LineVector<float> qrows, qt, ot, o, m, l, alpha, kp, vbuf, st, tmp, row;
  };
  // The calling thread keeps its workers' scratch from call to call: allocating and zeroing
  // ~200 KB a worker each call cost ~5% of a (8, 8, 64, 64) call inside a model block. Every
  // buffer is written before it is read within a task, so what a previous call left is never
  // seen (tests/test_attention.py poisons it with NaN to check).
  static thread_local LineVector<Scratch> kept;
  LineVector<Scratch>& scratch = kept;  // the caller's: the workers must not name `kept`
  if (scratch.size() < size_t(workers)) scratch.resize(size_t(workers));
  for (auto& s : scratch) {
    grow_to(s.sub, size_t(max_sub));
    grow_to(s.visited, size_t(max_sub));
    grow_to(s.qt, size_t(max_sub * dp * kLanes));
    grow_to(s.ot, size_t(max_sub * kLanes * dvp));
    grow_to(s.o, size_t(max_sub * kLanes * dvp));
    grow_to(s.m, size_t(max_sub * kLanes));
    grow_to(s.l, size_t(max_sub * kLanes));
    grow_to(s.alpha, size_t(kLanes));
    grow_to(s.kp, size_t(round_up(bk, P) * dp));
    grow_to(s.vbuf, size_t(bk * dvp));
    grow_to(s.st, size_t(round_up(bk, P) * kLanes));
    grow_to(s.tmp, size_t(std::max(dp, dvp)));
    grow_to(s.qrows, size_t(kLanes * std::max(dp, dvp)));
    grow_to(s.row, size_t(dvp));
  }

  parallel_for(tasks, num_threads, [&](int64_t task, int worker) {
    Scratch& s = scratch[size_t(worker)];
    const int64_t t = task % tiles, bh = task / tiles;
    const int64_t b = bh / p.heads, h = bh % p.heads, g = h / group;
    plan.tile(t, b, s.tile);
    const int64_t rows = int64_t(s.tile.rows.size());
    const int64_t nsub = (rows + kLanes - 1) / kLanes;
    for (int64_t i = 0; i < nsub; ++i) {
      make_subtile(s.tile, i * kLanes, s.sub[size_t(i)]);
      pack_transposed<W>(p.q, b, h, s.sub[size_t(i)], D, dp, p.scale,
                      s.qt.data() + i * dp * kLanes, s.qrows.data());
    }
    std::fill(s.visited.begin(), s.visited.end(), false);
    std::fill(s.m.begin(), s.m.begin() + nsub * kLanes, -std::numeric_limits<float>::infinity());
    std::fill(s.l.begin(), s.l.begin() + nsub * kLanes, 0.0f);

    KeyBlocks blocks(s.tile, bk);
    while (blocks.next(s.blk)) {
      const KeyBlock& blk = s.blk;
      const int64_t padded = round_up(blk.count, P);
      bool packed = false;
      const float *vrows = nullptr, *krows = nullptr;  // krows: K read in place, not packed
      int64_t ldv = 0, ldk = 0;
      for (int64_t i = 0; i < nsub; ++i) {
        const Subtile& sub = s.sub[size_t(i)];
        const int lanes = live_lanes<W>(sub);
        const Visibility vis = classify(blk, sub, has_mask);
        if (vis == Visibility::kNone) continue;
        if (!packed) {
          krows = rows_in_place(p.k, b, g, blk, D, dp, ldk);
          if (!krows) pack_panels<P>(p.k, b, g, blk, D, dp, padded, s.kp.data(), s.tmp.data());
          // V rows far apart are copied when enough subtiles will walk them (see rows_near).
          vrows = rows_fp32(p.v, b, g, blk, Dv, dvp, s.vbuf.data(), ldv, nsub >= 4);
          packed = true;
        }
        const int64_t count = visible_prefix(blk, sub);
        float* st = s.st.data();
        if (krows)
          rows_times_lanes<W>(krows, ldk, dp, count, s.qt.data() + i * dp * kLanes, st, lanes);
        else
          panels_times_lanes<W>(s.kp.data(), dp, count, s.qt.data() + i * dp * kLanes, st, lanes);
        if (vis == Visibility::kPartial) apply_masks<W>(p, b, h, blk, count, sub, st);
        float* ot = s.ot.data() + i * kLanes * dvp;  // O^T [dvp][32 lanes]
        const bool rescale = softmax_lanes<W>(lanes, st, count, s.m.data() + i * kLanes,
                                              s.l.data() + i * kLanes, s.alpha.data());
        if (!s.visited[size_t(i)]) {  // first block: O = P V, nothing to rescale or zero
          s.visited[size_t(i)] = true;
          matrix_t_times_lanes<W, false>(count, vrows, ldv, dvp, st, ot, lanes);
          continue;
        }
        if (rescale) {
          typedef typename simd::Vec<W>::F F;
          for (int v = 0; v < lanes / W; ++v) {
            const F a = simd::load<W>(s.alpha.data() + v * W);
            for (int64_t d = 0; d < dvp; ++d)
              simd::store<W>(ot + d * kLanes + v * W, simd::load<W>(ot + d * kLanes + v * W) * a);
          }
        }
        matrix_t_times_lanes<W, true>(count, vrows, ldv, dvp, st, ot, lanes);
      }
    }
    for (int64_t i = 0; i < nsub; ++i)
      if (s.visited[size_t(i)])
        lanes_to_rows<W>(s.ot.data() + i * kLanes * dvp, dvp, s.o.data() + i * kLanes * dvp,
                         live_lanes<W>(s.sub[size_t(i)]));

    for (int64_t i = 0; i < nsub; ++i) {
      const Subtile& sub = s.sub[size_t(i)];
      const float* o = s.o.data() + i * kLanes * dvp;
      const bool visited = s.visited[size_t(i)];
      for (int lane = 0; lane < sub.count; ++lane) {
        const int64_t row = sub.row[lane];
        const float l = s.l[size_t(i * kLanes + lane)];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no visible key: zeros
        const int64_t offset = b * p.out.stride_batch + h * p.out.stride_head + row * p.out.stride_row;
        float* dst = p.out.dtype == DType::kFloat32 ? static_cast<float*>(p.out.data) + offset
                                                    : s.row.data();
        const float* src = o + lane * dvp;
        if (visited) {
          for (int64_t d = 0; d < Dv; ++d) dst[d] = src[d] * inv;
        } else {
          std::fill(dst, dst + Dv, 0.0f);
        }
        if (p.out.dtype != DType::kFloat32)
          store_rounded_as_dtype(p.out.data, offset, s.row.data(), Dv, p.out.dtype);
        if (p.lse) {
          const float m = s.m[size_t(i * kLanes + lane)];
          p.lse[(b * p.heads + h) * p.q_len + row] =
              l > 0.0f ? m + std::log(l) : (std::isnan(l) ? l : kLseEmpty);
        }
      }
    }
  });
}

}  // namespace attn_cpu
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
