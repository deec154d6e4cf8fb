// The CPU attention backward: recompute P tile by tile from the saved log-sum-exp.
//
// Task = a share ("chunk") of the query tiles of one (batch, kv head) and all its query heads,
// so dK and dV of the kv head accumulate in the task's own fp32 buffer without atomics; when
// there are fewer (batch, kv head) pairs than threads, the tiles are split into chunks whose
// buffers are summed at the end. Per (subtile, key block), all in the transposed layout:
//   S^T = K (scale Q)^T, P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - Delta),
//   dV += P dO, dK += dS^T (scale Q), dQ += dS K      (Delta = rowsum(dO * O))
// Five products per visible block against the forward's two.
#pragma once

#include "attention/attention_cpu_forward.h"
#include "common/fp64_sum.h"

namespace imgtx {
namespace IMGTX_CPU_NS {
namespace attn_cpu {

// Below this many (batch, kv head) pairs the query tiles are split into chunks (parallelism).
constexpr int64_t kMinBackwardTasks = 16;
constexpr int64_t kMaxChunkBytes = int64_t(256) << 20;

// Query rows per tile: 512 for dense attention over 512 or more queries when the (batch, kv
// head) pairs alone give enough tasks, else 128. A tile reads each key block once for all its
// subtiles and adds the block's dK, dV into the task's accumulator once: (4, 8, 1024, 64) at 2
// threads took 5% less time at 512 rows from a fused projection's view and 2% less from
// contiguous inputs; at 256 queries the taller tile was 3% slower. Fewer, taller tiles would
// leave fewer chunks when pairs are few. The height depends on the problem only, never on the
// thread count, so gradients stay bitwise identical for any number of threads.
inline int64_t backward_tile_rows(const AttnParams& p) {
  const bool tall = p.pattern.kind == AttnPatternKind::kDense && p.q_len >= 512 &&
                    p.batch * p.kv_heads >= kMinBackwardTasks;
  return tall ? 512 : 128;
}

template <int W>
void attention_backward_driver(const AttnBackwardParams& p, int num_threads) {
  typedef typename simd::Vec<W>::F F;
  constexpr int P = Shape<W>::kPanel;
  constexpr int V = kLanes / W;
  const int64_t D = p.head_dim, Dv = p.v_dim, Nk = p.k_len;
  const int64_t dp = round_up(D, W), dvp = round_up(Dv, W);
  const int64_t bk = key_block<W>(dp, dvp);
  const int64_t bk_pad = round_up(bk, Shape<W>::kRowAlign);
  const attn::AttnPlan plan(p, backward_tile_rows(p));
  const int64_t tiles = plan.num_tiles();
  const int64_t max_sub = (plan.max_rows() + kLanes - 1) / kLanes;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t pairs = p.batch * p.kv_heads;
  const int64_t units = group * tiles;  // (query head, tile) pairs per kv head
  // Chunks depend on the problem only, never on the thread count, so that gradients are
  // bitwise identical for any number of threads (chunk buffers are summed in a fixed order).
  // Each chunk holds an fp32 (Nk, D + Dv) accumulator; their total stays under
  // kMaxChunkBytes (one chunk always exists: the per-worker buffer of the unsplit case).
  int64_t chunks = 1;
  if (pairs < kMinBackwardTasks) {
    const int64_t per_chunk = pairs * Nk * (dp + dvp) * int64_t(sizeof(float));
    chunks = std::min({units, (kMinBackwardTasks + pairs - 1) / pairs,
                       std::max<int64_t>(1, kMaxChunkBytes / std::max<int64_t>(per_chunk, 1))});
  }
  const int64_t tasks = pairs * chunks;
  const int workers = parallel_workers(tasks, num_threads);
  const bool has_mask = p.mask.kind != AttnMaskKind::kNone;
  const int64_t acc_ld = dp + dvp;  // acc rows: [dK (dp) | dV (dvp)]

  struct alignas(kCacheLine) Scratch {  // (cache_line.h: no line shared between workers)
    attn::QueryTile tile;
    KeyBlock blk;
    LineVector<Subtile> sub;
    LineVector<float> qrows, qt, qs, dot, dor, dq, lse, delta, kp, kr, vp, st, dpt, dkb, dvb, tmp,
        row;
  };
  // The calling thread keeps its workers' scratch from call to call, as the forward does:
  // allocating and zeroing ~250 KB a worker took ~10% of a short call's time. Every buffer is
  // written before it is read within a task (tests/test_attention.py poisons it with NaN). Its
  // size depends on the tile and block sizes only; the dK/dV accumulators, which grow with the
  // key count, are made per call (below).
  static thread_local LineVector<Scratch> kept;
  LineVector<Scratch>& scratch = kept;  // the caller's: the workers must not name `kept`
  if (scratch.size() < size_t(workers)) scratch.resize(size_t(workers));
  for (auto& s : scratch) {
    grow_to(s.sub, size_t(max_sub));
    grow_to(s.qt, size_t(max_sub * dp * kLanes));
    grow_to(s.qs, size_t(max_sub * kLanes * dp));
    grow_to(s.dot, size_t(max_sub * dvp * kLanes));
    grow_to(s.dor, size_t(max_sub * kLanes * dvp));
    grow_to(s.dq, size_t(max_sub * kLanes * dp));
    grow_to(s.lse, size_t(max_sub * kLanes));
    grow_to(s.delta, size_t(max_sub * kLanes));
    grow_to(s.kp, size_t(bk_pad * dp));
    grow_to(s.kr, size_t(bk * dp));
    grow_to(s.vp, size_t(bk_pad * dvp));
    grow_to(s.st, size_t(bk_pad * kLanes));
    grow_to(s.dpt, size_t(bk_pad * kLanes));
    grow_to(s.dkb, size_t(bk_pad * dp));
    grow_to(s.dvb, size_t(bk_pad * dvp));
    grow_to(s.tmp, size_t(std::max(dp, dvp)));
    grow_to(s.qrows, size_t(kLanes * std::max(dp, dvp)));
    grow_to(s.row, size_t(std::max(dp, dvp)));
  }
  // fp32 [dK | dV] accumulators: one per worker (chunks == 1), else one per chunk.
  const int64_t acc_stride = line_padded<float>(Nk * acc_ld);
  LineVector<float> accs(size_t((chunks == 1 ? workers : tasks) * acc_stride));

  const auto write_rows = [&](const AttnOutput& o, int64_t b, int64_t h, int64_t row,
                              const float* src, int64_t dim, float* tmp) {
    std::copy(src, src + dim, tmp);
    store_rounded_as_dtype(o.data, b * o.stride_batch + h * o.stride_head + row * o.stride_row,
                           tmp, dim, o.dtype);
  };

  parallel_for(tasks, num_threads, [&](int64_t task, int worker) {
    Scratch& s = scratch[size_t(worker)];
    const int64_t pair = task / chunks, chunk = task % chunks;
    const int64_t b = pair / p.kv_heads, g = pair % p.kv_heads;
    float* acc = accs.data() + (chunks == 1 ? worker : task) * acc_stride;
    if (chunks == 1) std::fill(acc, acc + Nk * acc_ld, 0.0f);
    const int64_t u0 = units * chunk / chunks, u1 = units * (chunk + 1) / chunks;

    for (int64_t u = u0; u < u1; ++u) {
      const int64_t h = g * group + u / tiles, t = u % tiles;
      plan.tile(t, b, s.tile);
      const int64_t nsub = (int64_t(s.tile.rows.size()) + kLanes - 1) / kLanes;
      for (int64_t i = 0; i < nsub; ++i) {
        Subtile& sub = s.sub[size_t(i)];
        make_subtile(s.tile, i * kLanes, sub);
        pack_transposed<W>(p.q, b, h, sub, D, dp, p.scale, s.qt.data() + i * dp * kLanes,
                           s.qrows.data());
        pack_transposed<W>(p.grad_out, b, h, sub, Dv, dvp, 1.0f, s.dot.data() + i * dvp * kLanes,
                           s.qrows.data());
        // Lanes past live_lanes hold no query: the products, dS and the sums over lanes skip
        // them (a subtile of 16 or fewer queries is otherwise half padding).
        for (int lane = 0; lane < live_lanes<W>(sub); ++lane) {
          float* qs = s.qs.data() + (i * kLanes + lane) * dp;
          float* dor = s.dor.data() + (i * kLanes + lane) * dvp;
          float& lse = s.lse[size_t(i * kLanes + lane)];
          float& delta = s.delta[size_t(i * kLanes + lane)];
          if (lane >= sub.count) {
            std::fill(qs, qs + dp, 0.0f);
            std::fill(dor, dor + dvp, 0.0f);
            lse = std::numeric_limits<float>::infinity();  // P = 0 on padding lanes
            delta = 0.0f;
            continue;
          }
          const int64_t row = sub.row[lane];
          load_row(p.q, b, h, row, D, dp, qs);
          for (int64_t d = 0; d < dp; ++d) qs[d] *= p.scale;
          load_row(p.grad_out, b, h, row, Dv, dvp, dor);
          load_row(p.out, b, h, row, Dv, dvp, s.tmp.data());
          // Delta = dO . O in float64, in fp64_sum.h's 8 chains (one chain of dependent FMAs
          // was a fifth of a short backward's time).
          const float* o = s.tmp.data();
          const double dsum =
              sum_in_lanes(Dv, [&](int64_t d) { return double(dor[d]) * double(o[d]); });
          // d lse / d s = P: an incoming lse gradient shifts Delta (dS = P (dP - Delta + g)).
          delta = float(dsum) - (p.grad_lse ? p.grad_lse[(b * p.heads + h) * p.q_len + row] : 0.0f);
          lse = p.lse[(b * p.heads + h) * p.q_len + row];
        }
      }
      std::fill(s.dq.begin(), s.dq.begin() + nsub * kLanes * dp, 0.0f);

      KeyBlocks blocks(s.tile, bk);
      while (blocks.next(s.blk)) {
        const KeyBlock& blk = s.blk;
        const int64_t padded = round_up(blk.count, Shape<W>::kRowAlign);
        bool packed = false;
        const float *krows = nullptr, *k_in = nullptr, *v_in = nullptr;  // *_in: read in place
        int64_t ldk = 0, ldv = 0;
        for (int64_t i = 0; i < nsub; ++i) {
          const Subtile& sub = s.sub[size_t(i)];
          const int lanes = live_lanes<W>(sub);
          const Visibility vis = classify(blk, sub, has_mask);
          if (vis == Visibility::kNone) continue;
          if (!packed) {
            k_in = rows_in_place(p.k, b, g, blk, D, dp, ldk);
            v_in = rows_in_place(p.v, b, g, blk, Dv, dvp, ldv);
            if (!k_in) pack_panels<P>(p.k, b, g, blk, D, dp, padded, s.kp.data(), s.tmp.data());
            if (!v_in) pack_panels<P>(p.v, b, g, blk, Dv, dvp, padded, s.vp.data(), s.tmp.data());
            krows = rows_fp32(p.k, b, g, blk, D, dp, s.kr.data(), ldk);
            std::fill(s.dkb.begin(), s.dkb.begin() + padded * dp, 0.0f);
            std::fill(s.dvb.begin(), s.dvb.begin() + padded * dvp, 0.0f);
            packed = true;
          }
          const int64_t count = visible_prefix(blk, sub);
          const int64_t cpad = round_up(count, Shape<W>::kRowAlign);
          float* st = s.st.data();
          float* dpt = s.dpt.data();
          if (k_in)
            rows_times_lanes<W>(k_in, ldk, dp, count, s.qt.data() + i * dp * kLanes, st, lanes);
          else
            panels_times_lanes<W>(s.kp.data(), dp, count, s.qt.data() + i * dp * kLanes, st,
                                  lanes);
          if (vis == Visibility::kPartial) apply_masks<W>(p, b, h, blk, count, sub, st);
          if (v_in)
            rows_times_lanes<W>(v_in, ldv, dvp, count, s.dot.data() + i * dvp * kLanes, dpt,
                                lanes);
          else
            panels_times_lanes<W>(s.vp.data(), dvp, count, s.dot.data() + i * dvp * kLanes, dpt,
                                  lanes);
          const int nv = lanes / W;
          F lse[V], delta[V];
          for (int v = 0; v < nv; ++v) {
            lse[v] = simd::load<W>(s.lse.data() + i * kLanes + v * W);
            delta[v] = simd::load<W>(s.delta.data() + i * kLanes + v * W);
          }
          for (int64_t j = 0; j < count; ++j)
            for (int v = 0; v < nv; ++v) {
              float* sp = st + j * kLanes + v * W;
              float* dq = dpt + j * kLanes + v * W;
              const F pr = simd::exp<W>(simd::load<W>(sp) - lse[v]);
              simd::store<W>(sp, pr);
              simd::store<W>(dq, pr * (simd::load<W>(dq) - delta[v]));  // dS^T
            }
          for (int64_t j = count; j < cpad; ++j)  // padding keys contribute nothing
            for (int l = 0; l < lanes; ++l) st[j * kLanes + l] = dpt[j * kLanes + l] = 0.0f;
          rows_times_matrix<W, 1, kLanes, true>(lanes, st, s.dor.data() + i * kLanes * dvp,
                                                dvp, s.dvb.data(), dvp, dvp, int(cpad));
          rows_times_matrix<W, 1, kLanes, true>(lanes, dpt, s.qs.data() + i * kLanes * dp, dp,
                                                s.dkb.data(), dp, dp, int(cpad));
          rows_times_matrix<W, kLanes, 1, true>(count, dpt, krows, ldk,
                                                s.dq.data() + i * kLanes * dp, dp, dp, lanes);
        }
        if (!packed) continue;
        for (int64_t j = 0; j < blk.count; ++j) {
          float* a = acc + blk.row[size_t(j)] * acc_ld;
          const float* dk = s.dkb.data() + j * dp;
          const float* dv = s.dvb.data() + j * dvp;
          for (int64_t d = 0; d < dp; ++d) a[d] += dk[d];
          for (int64_t d = 0; d < dvp; ++d) a[dp + d] += dv[d];
        }
      }
      for (int64_t i = 0; i < nsub; ++i) {
        const Subtile& sub = s.sub[size_t(i)];
        for (int lane = 0; lane < sub.count; ++lane) {
          float* dq = s.dq.data() + (i * kLanes + lane) * dp;
          for (int64_t d = 0; d < D; ++d) dq[d] *= p.scale;  // dQ = scale * dS K
          write_rows(p.grad_q, b, h, sub.row[lane], dq, D, s.row.data());
        }
      }
    }
    if (chunks == 1) {
      for (int64_t j = 0; j < Nk; ++j) {
        write_rows(p.grad_k, b, g, j, acc + j * acc_ld, D, s.row.data());
        write_rows(p.grad_v, b, g, j, acc + j * acc_ld + dp, Dv, s.row.data());
      }
    }
  });

  if (chunks == 1) return;
  // Sum the chunks' buffers per (batch, kv head, block of key rows).
  const int64_t rows_per = 64, row_blocks = (Nk + rows_per - 1) / rows_per;
  parallel_for(pairs * row_blocks, num_threads, [&](int64_t task, int worker) {
    Scratch& s = scratch[size_t(worker)];
    const int64_t pair = task / row_blocks, j0 = (task % row_blocks) * rows_per;
    const int64_t b = pair / p.kv_heads, g = pair % p.kv_heads;
    const float* base = accs.data() + pair * chunks * acc_stride;
    LineVector<float>& sum = s.tmp;
    sum.resize(size_t(acc_ld));
    for (int64_t j = j0; j < std::min(Nk, j0 + rows_per); ++j) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* a = base + c * acc_stride + j * acc_ld;
        for (int64_t d = 0; d < acc_ld; ++d) sum[size_t(d)] += a[d];
      }
      write_rows(p.grad_k, b, g, j, sum.data(), D, s.row.data());
      write_rows(p.grad_v, b, g, j, sum.data() + dp, Dv, s.row.data());
    }
  });
}

}  // namespace attn_cpu
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
