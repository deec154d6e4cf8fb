// Token-parallel CPU kernels for logits whose token stride is 1 (diffusers' contiguous
// (B, K, N) model output): one SIMD vector holds W consecutive tokens at one class, so every
// load is a contiguous run and no transposition is needed. Included by diffusion_cpu_driver.h
// inside the ISA namespace; the per-token float64 math is the same mr_token_math.h as the row
// kernels, so both paths draw the same distribution (the row path serves other layouts and
// the last N mod W tokens).
//
// A group's working set is its K x W block of p (256 KB at K = 4096, W = 16: L2-resident),
// plus per-lane chunk sums for the inverse-CDF search.
#pragma once

namespace imgtx {
namespace IMGTX_CPU_NS {
namespace {

template <int W>
struct LaneKernels {
  typedef typename simd::Vec<W>::F F;
  typedef typename simd::Vec<W>::I I;
  static constexpr float kInf = std::numeric_limits<float>::infinity();
  static constexpr int64_t kChunk = 64;  // classes per chunk sum
  static constexpr int64_t kTileGroups = 8;  // groups per tile_max call: 512 B runs per row
  static constexpr int kTop = 4;  // largest values per lane tracked before truncation bisects
  static int64_t num_chunks(int64_t K) { return (K + kChunk - 1) / kChunk; }

  // Per-lane sums of value(q) over each chunk of kChunk classes into sums[c * W + lane], and
  // their totals into P. value(q) computes (and may store) class q's vector; 4 classes are
  // summed in float as a tree, then added in float64.
  template <class Value>
  static void sum_chunks(int64_t K, double* sums, double* P, Value value) {
    for (int i = 0; i < W; ++i) P[i] = 0.0;
    for (int64_t j0 = 0, c = 0; j0 < K; j0 += kChunk, ++c) {
      const int64_t j1 = j0 + kChunk < K ? j0 + kChunk : K;
      simd::DoubleAcc<W> acc;
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4) acc.add((value(j) + value(j + 1)) + (value(j + 2) + value(j + 3)));
      for (; j < j1; ++j) acc.add(value(j));
      acc.lanes(sums + c * W);
      for (int i = 0; i < W; ++i) P[i] += sums[c * W + i];
    }
  }

  // W tokens of class j: base + j * stride_class, as float.
  static F load_lanes(const MrLogits& L, int64_t base, int64_t j) {
    const int64_t at = base + j * L.stride_class;
    if (L.dtype == DType::kFloat32) return simd::load<W>(static_cast<const float*>(L.data) + at);
    if (L.dtype == DType::kBFloat16)
      return simd::load_bf16<W>(static_cast<const uint16_t*>(L.data) + at);
    return simd::load_f16<W>(static_cast<const uint16_t*>(L.data) + at);
  }

  // The logits (guided when an unconditional input is given) of class j for the group.
  static F guided(const MrPosteriorParams& p, int64_t base_c, int64_t base_u, int64_t j) {
    const F lc = load_lanes(p.logp, base_c, j);
    if (!p.logp_uncond.data) return lc;
    const F lu = load_lanes(p.logp_uncond, base_u, j);
    return lu + p.guidance_scale * (lc - lu);
  }

  // E = exp(l - M) with l re-read from the logits (an L2/L3 hit after the tile's max pass);
  // per-lane chunk sums into sums[c * W + lane]; per-lane totals into P.
  static void exp_block(const MrPosteriorParams& p, int64_t base_c, int64_t base_u, float* E,
                        int64_t K, F M, double* sums, double* P) {
    sum_chunks(K, sums, P, [&](int64_t q) {
      const F v = simd::exp<W>(guided(p, base_c, base_u, q) - M);
      simd::store<W>(E + q * W, v);
      return v;
    });
  }


  // Per-lane top-r truncation: the row kernel's search (same bound, same decision rule, see
  // Kernels::truncate), run for the W tokens at once with per-lane bounds. A pass streams the
  // K x W block from L2, so its bandwidth, not the compares, sets the cost of a pass.
  static void truncate(float* E, int64_t K, double r, double* sums, double* P) {
    int32_t lo[W], hi[W];
    double thr[W];
    for (int i = 0; i < W; ++i) {
      lo[i] = int32_t(Kernels<W>::lower_bits((1.0 - r) * P[i] / double(K)));
      hi[i] = 0x3f800000;
      thr[i] = r * P[i];
    }
    top_classes(E, K, thr, lo, hi);
    for (;;) {
      bool open = false;
      I mid;
      for (int i = 0; i < W; ++i) {
        mid[i] = lo[i] + (hi[i] - lo[i]) / 2;
        open |= hi[i] - lo[i] > 1;
      }
      if (!open) break;
      // 8 classes per step summed as a tree (no add chain), then one float64 add; plus the
      // nearest class values on both sides of mid, to snap the bounds onto classes.
      simd::DoubleAcc<W> acc;
      typename Kernels<W>::Snap sn;
      auto sel = [&](int64_t q) { return sn.take(simd::load<W>(E + q * W), mid); };
      int64_t j = 0;
      for (; j + 8 <= K; j += 8) {
        const F s01 = sel(j) + sel(j + 1), s23 = sel(j + 2) + sel(j + 3);
        const F s45 = sel(j + 4) + sel(j + 5), s67 = sel(j + 6) + sel(j + 7);
        acc.add((s01 + s23) + (s45 + s67));
      }
      for (; j < K; ++j) acc.add(sel(j));
      double mass[W];
      acc.lanes(mass);
      for (int i = 0; i < W; ++i) {
        if (hi[i] - lo[i] <= 1) continue;
        if (mass[i] < thr[i]) {
          hi[i] = sn.below[i] > lo[i] ? sn.below[i] : lo[i] + 1;  // h constant on [below, mid]
        } else {
          lo[i] = sn.above[i] - 1;  // h is constant on [mid, above)
        }
      }
    }
    I u0;
    for (int i = 0; i < W; ++i) u0[i] = hi[i];
    // Zero the dropped classes and refresh the chunk sums in the same pass, counting the
    // classes equal to each lane's boundary value (order-free, so sum_chunks may add in any).
    I count = I{};
    sum_chunks(K, sums, P, [&](int64_t q) {
      F v = simd::load<W>(E + q * W);
      I bits;
      std::memcpy(&bits, &v, sizeof(bits));
      count -= bits == u0;  // a true lane is -1
      v = bits >= u0 ? v : F{};
      simd::store<W>(E + q * W, v);
      return v;
    });
    // Of those equal classes only the first mr::tie_keep stay, in index order (diffusers' sort;
    // Kernels::tie_cut). The mass above the boundary is P less the tie's; a second pass runs
    // only when some lane drops part of its tie.
    I keep;
    bool partial = false;
    for (int i = 0; i < W; ++i) {
      float v0;
      const int32_t b = u0[i];
      std::memcpy(&v0, &b, sizeof(v0));
      const double above = P[i] - double(count[i]) * double(v0);
      keep[i] = count[i] > 1 ? int32_t(mr::tie_keep(thr[i], above, double(v0), count[i])) : count[i];
      partial |= keep[i] < count[i];
    }
    if (!partial) return;
    for (int64_t q = 0; q < K; ++q) {
      const F v = simd::load<W>(E + q * W);
      I bits;
      std::memcpy(&bits, &v, sizeof(bits));
      const I tie = bits == u0;
      simd::store<W>(E + q * W, tie & (keep <= 0) ? F{} : v);
      keep += tie;
    }
    sum_chunks(K, sums, P, [&](int64_t q) { return simd::load<W>(E + q * W); });
  }

  // Per-lane top-r at r = 0 (the row kernel's keep_first_max): only the first class with the
  // lane's largest p stays; refreshes the chunk sums and P.
  static void keep_first_max(float* E, int64_t K, double* sums, double* P) {
    F best = simd::splat<W>(-1.f);
    I arg = I{};
    for (int64_t q = 0; q < K; ++q) {
      const F v = simd::load<W>(E + q * W);
      const I gt = v > best;  // strictly: a later equal p does not replace the first
      best = gt ? v : best;
      arg = gt ? I{} + int32_t(q) : arg;
    }
    sum_chunks(K, sums, P, [&](int64_t q) {
      F v = simd::load<W>(E + q * W);
      v = arg == I{} + int32_t(q) ? v : F{};
      simd::store<W>(E + q * W, v);
      return v;
    });
  }

  // Peaked distributions (guidance, a confident model) keep only a handful of classes, so one
  // pass first finds each lane's kTop largest values (duplicates included): the mass above
  // each of them is then known exactly, and where the threshold falls among them the lane is
  // done (lo = u0 - 1, hi = u0) without any bisection probe; otherwise hi starts at the last
  // of them. A group bisects if any of its 16 lanes is unresolved: with guidance 5 at r = 0.86,
  // 1.5% of tokens keep more than 3 classes (22% of groups), 0.3% more than 4, none more than 5
  // (kTop = 6 measured no better on this machine: the wider network costs every vector).
  static void top_classes(const float* E, int64_t K, const double* thr, int32_t* lo,
                          int32_t* hi) {
    F t[kTop];
    for (auto& x : t) x = F{};  // values are >= 0: 0 is a neutral start
    for (int64_t j = 0; j < K; ++j) {
      F x = simd::load<W>(E + j * W);
#pragma GCC unroll 8
      for (int k = 0; k < kTop; ++k) {  // insertion network: t[0] >= t[1] >= ... >= t[kTop-1]
        const F big = x > t[k] ? x : t[k];
        x = x > t[k] ? t[k] : x;
        t[k] = big;
      }
    }
    for (int i = 0; i < W; ++i) {
      for (int k = 0; k < kTop && int64_t(k) < K; ++k) {
        const float v = t[k][i];
        double above = 0.0;  // mass strictly above v: all of it lies among t[0..k-1]
        for (int m = 0; m < k; ++m) above += t[m][i] > v ? double(t[m][i]) : 0.0;
        if (k > 0 && above >= thr[i]) {
          // v is dropped; t[k-1] > v (a tie would have been dropped one step earlier) and is
          // the smallest kept value: u0 is its pattern.
          std::memcpy(&hi[i], &t[k - 1][i], sizeof(int32_t));
          lo[i] = hi[i] - 1;
          break;
        }
        int32_t bits;
        std::memcpy(&bits, &v, sizeof(bits));
        if (k == kTop - 1 && bits > lo[i]) hi[i] = bits;  // the last is kept: u0 <= its pattern
      }
    }
  }

  // Inverse-CDF search of lane i: first class whose cumulative weight exceeds target.
  static int64_t scan(const float* E, int64_t K, const double* sums, int i, double target) {
    const int64_t chunks = num_chunks(K);
    double cum = 0.0;
    int64_t c = 0;
    for (; c + 1 < chunks && cum + sums[c * W + i] <= target; ++c) cum += sums[c * W + i];
    for (int64_t j = c * kChunk; j < K; ++j) {
      const float e = E[j * W + i];
      cum += double(e);
      if (e > 0.f && cum > target) return j;
    }
    int64_t j = K - 1;
    while (j > 0 && !(E[j * W + i] > 0.f)) --j;
    return j;
  }

  static bool fp32(const MrPosteriorParams& p) {
    return p.logp.dtype == DType::kFloat32 &&
           (!p.logp_uncond.data || p.logp_uncond.dtype == DType::kFloat32);
  }

  // tile_max for a full tile of fp32 logits: the kTileGroups maxima stay in registers and the
  // guidance branch is decided at compile time (the generic loop kept them in memory and
  // re-tested dtype and guidance per vector: ~12 instructions per vector instead of ~4).
  // Non-finite values are caught by summing v - v (NaN for NaN and +-inf: 2 instructions
  // instead of 4); -inf is legal, so a flagged tile returns false and the caller redoes it
  // with the exact per-value test.
  template <bool kGuided>
  static bool tile_max_f32(const MrPosteriorParams& p, const float* pc, const float* pu, F* M) {
    const int64_t K = p.num_classes, sc = p.logp.stride_class;
    const int64_t su = kGuided ? p.logp_uncond.stride_class : 0;
    const int64_t tc = p.logp.stride_token * W, tu = kGuided ? p.logp_uncond.stride_token * W : 0;
    const float s = p.guidance_scale;
    F m[kTileGroups], chk[kTileGroups];
    for (int g = 0; g < kTileGroups; ++g) {
      m[g] = simd::splat<W>(-kInf);
      chk[g] = F{};
    }
    for (int64_t j = 0; j < K; ++j) {
      const float* rc = pc + j * sc;
      const float* ru = kGuided ? pu + j * su : nullptr;
#pragma GCC unroll 8
      for (int g = 0; g < kTileGroups; ++g) {
        F v = simd::load<W>(rc + g * tc);
        if (kGuided) {
          const F u = simd::load<W>(ru + g * tu);
          v = u + s * (v - u);
        }
        m[g] = v > m[g] ? v : m[g];
        chk[g] += v - v;
      }
    }
    bool clean = true;
    for (int g = 0; g < kTileGroups; ++g) {
      M[g] = m[g];
      for (int i = 0; i < W; ++i) clean &= chk[g][i] == 0.f;
    }
    return clean;
  }

  // exp_block for fp32 logits, guidance decided at compile time.
  template <bool kGuided>
  static void exp_block_f32(const MrPosteriorParams& p, int64_t base_c, int64_t base_u, float* E,
                            int64_t K, F M, double* sums, double* P) {
    const float* pc = static_cast<const float*>(p.logp.data) + base_c;
    const float* pu = kGuided ? static_cast<const float*>(p.logp_uncond.data) + base_u : nullptr;
    const int64_t sc = p.logp.stride_class, su = kGuided ? p.logp_uncond.stride_class : 0;
    const float s = p.guidance_scale;
    auto value = [&](int64_t q) {
      F v = simd::load<W>(pc + q * sc);
      if (kGuided) {
        const F u = simd::load<W>(pu + q * su);
        v = u + s * (v - u);
      }
      const F e = simd::exp<W>(v - M);
      simd::store<W>(E + q * W, e);
      return e;
    };
    sum_chunks(K, sums, P, value);
  }

  // Per-group max and non-finite flags for `groups` consecutive groups of W tokens from
  // token n0, reading the logits row by row (groups * W tokens of each class are contiguous:
  // long DRAM runs instead of one cache line per row).
  static void tile_max(const MrPosteriorParams& p, int64_t b, int64_t n0, int64_t groups, F* M,
                       I* bad) {
    const int64_t K = p.num_classes;
    const int64_t base_c = b * p.logp.stride_batch + n0 * p.logp.stride_token;
    const int64_t base_u = p.logp_uncond.data
                               ? b * p.logp_uncond.stride_batch + n0 * p.logp_uncond.stride_token
                               : 0;
    if (fp32(p) && groups == kTileGroups) {
      const float* pc = static_cast<const float*>(p.logp.data) + base_c;
      const bool clean =
          p.logp_uncond.data
              ? tile_max_f32<true>(p, pc, static_cast<const float*>(p.logp_uncond.data) + base_u, M)
              : tile_max_f32<false>(p, pc, nullptr, M);
      if (clean) {
        for (int64_t g = 0; g < groups; ++g) bad[g] = I{};
        return;
      }
    }
    for (int64_t g = 0; g < groups; ++g) {
      M[g] = simd::splat<W>(-kInf);
      bad[g] = I{};
    }
    for (int64_t j = 0; j < K; ++j) {
      for (int64_t g = 0; g < groups; ++g) {
        const F v = guided(p, base_c + g * W * p.logp.stride_token,
                           base_u + g * W * p.logp_uncond.stride_token, j);
        M[g] = v > M[g] ? v : M[g];
        bad[g] |= (v != v) | (v == kInf);
      }
    }
  }

  // Tokens n0 .. n0 + W - 1 of sample b, given their max M and flags from tile_max.
  // E: K * W floats; sums: num_chunks(K) * W doubles.
  static int posterior_group(const MrPosteriorParams& p, int64_t b, int64_t n0, uint64_t seed,
                             F M, I bad, float* E, double* sums) {
    const int64_t K = p.num_classes, N = p.tokens;
    const int64_t base_c = b * p.logp.stride_batch + n0 * p.logp.stride_token;
    const int64_t base_u = p.logp_uncond.data
                               ? b * p.logp_uncond.stride_batch + n0 * p.logp_uncond.stride_token
                               : 0;
    bad |= M == -kInf;
    int64_t xt[W];
    int status = 0;
    bool any_bad = false;
    for (int i = 0; i < W; ++i) {
      xt[i] = p.x_t.data[b * p.x_t.stride_batch + (n0 + i) * p.x_t.stride_token];
      const bool bad_index = xt[i] < 0 || xt[i] > K;
      status |= (bad[i] ? kMrBadLogits : 0) | (bad_index ? kMrBadIndex : 0);
      if (bad[i] || bad_index) {
        bad[i] = -1;
        M[i] = 0.f;  // keeps the lane's arithmetic finite; its outputs are overwritten
        any_bad = true;
      }
    }
    double P[W];
    if (fp32(p) && p.logp_uncond.data)
      exp_block_f32<true>(p, base_c, base_u, E, K, M, sums, P);
    else if (fp32(p))
      exp_block_f32<false>(p, base_c, base_u, E, K, M, sums, P);
    else
      exp_block(p, base_c, base_u, E, K, M, sums, P);
    const bool truncating = p.truncation_rate < 1.f;
    if (p.truncation_rate == 0.f)
      keep_first_max(E, K, sums, P);
    else if (truncating)
      truncate(E, K, double(p.truncation_rate), sums, P);
    TokenCoefs k[W];
    double p_s[W];
    for (int i = 0; i < W; ++i) {
      k[i] = mr::token_coefs(p.coefs + b * kMrCoefs, bad[i] ? K : xt[i], K);
      p_s[i] = k[i].s >= 0 ? double(E[k[i].s * W + i]) : 0.0;
    }
    if (p.x_prev) {
      for (int i = 0; i < W; ++i) {
        int64_t idx = -1;
        if (!bad[i]) {
          double u0, u1;
          philox_uniform2(seed, uint64_t(b * N + n0 + i), kMrStreamPosterior, &u0, &u1);
          const mr::SampleChoice c = mr::choose(k[i], K, P[i], p_s[i], u0, u1);
          idx = c.index;
          if (idx < 0) {
            const int64_t s = k[i].s;
            if (s >= 0) {  // x_t's own class carries u_s, not u_g
              float& e = E[s * W + i];
              const float old = e;
              e = float(double(old) * c.scan_special_factor);
              sums[(s / kChunk) * W + i] += double(e) - double(old);
            }
            idx = scan(E, K, sums, i, c.scan_target);
          }
        }
        p.x_prev[b * N + n0 + i] = idx;
      }
      return status;
    }
    write_log_probs(p, b, n0, base_c, base_u, E, M, P, p_s, k, truncating);
    if (any_bad) {
      for (int i = 0; i < W; ++i) {
        if (!bad[i]) continue;
        float* out = p.log_probs + b * p.out_stride_batch + (n0 + i) * p.out_stride_token;
        for (int64_t j = 0; j <= K; ++j)
          out[j * p.out_stride_class] = std::numeric_limits<float>::quiet_NaN();
      }
    }
    return status;
  }

  // Normalised log pi for the group; per lane exactly the row kernel's formulas.
  static void write_log_probs(const MrPosteriorParams& p, int64_t b, int64_t n0, int64_t base_c,
                              int64_t base_u, const float* E, F M, const double* P,
                              const double* p_s, TokenCoefs* k, bool truncating) {
    const int64_t K = p.num_classes;
    F ug, vy, lp, log_u;
    I log_space;  // lanes at t = 0 (v_g = 0): log(u p) = (l - M) + log u, recomputed from l
    double Y[W], log_pi[W];
    for (int i = 0; i < W; ++i) {
      Y[i] = mr::token_y(k[i], P[i], p_s[i]);
      mr::normalise(&k[i], Y[i]);
      log_pi[i] = std::log(mr::pi_total(k[i], K, P[i], p_s[i], Y[i]));
      ug[i] = float(k[i].u_g);
      vy[i] = float(k[i].v_g * Y[i]);
      lp[i] = float(log_pi[i]);
      log_space[i] = k[i].v_g == 0.0 ? -1 : 0;
      log_u[i] = k[i].v_g == 0.0 ? float(std::log(k[i].u_g) - log_pi[i]) : 0.f;
    }
    bool any_log_space = false;
    for (int i = 0; i < W; ++i) any_log_space |= log_space[i] != 0;
    float* out = p.log_probs + b * p.out_stride_batch + n0 * p.out_stride_token;
    const bool vector_store = p.out_stride_token == 1;
    for (int64_t j = 0; j < K; ++j) {
      const F e = simd::load<W>(E + j * W);
      F pi = ug * e + vy;
      pi = pi > mr::kPiFloor ? pi : simd::splat<W>(mr::kPiFloor);
      F v = simd::log<W>(pi) - lp;
      if (any_log_space) {
        F l = (guided(p, base_c, base_u, j) - M) + log_u;  // (x - m) first, as the row kernel
        if (truncating) l = e > 0.f ? l : simd::splat<W>(-kInf);
        v = log_space ? l : v;
      }
      if (vector_store) {
        simd::store<W>(out + j * p.out_stride_class, v);
      } else {
        for (int i = 0; i < W; ++i) out[j * p.out_stride_class + i * p.out_stride_token] = v[i];
      }
    }
    for (int i = 0; i < W; ++i) {
      float* o = out + i * p.out_stride_token;
      if (k[i].s >= 0 && k[i].v_g != 0.0) {
        const double pis = k[i].u_s * p_s[i] + k[i].v_s * Y[i];
        o[k[i].s * p.out_stride_class] = pis > 0.0 ? float(std::log(pis) - log_pi[i]) : -kInf;
      }
      o[K * p.out_stride_class] =
          k[i].w > 0.0 ? float(std::log(k[i].w * Y[i]) - log_pi[i]) : -kInf;
    }
  }
};

}  // namespace
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
