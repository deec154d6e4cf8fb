// The CPU mask-and-replace kernels, templated on the SIMD width W.
//
// Included by one .cpp per ISA, each inside its own namespace (IMGTX_CPU_NS), so the -mavx512f
// instantiation never merges with the portable one at link time.
//
// Work split: a task is a run of consecutive tokens of one sample; a worker copies a token's K
// logits into an L1/L2-resident scratch row (converting the dtype and gathering any stride),
// then makes its passes over that row: max, exp + sum, optional truncation, and the op's
// final pass (an inverse-CDF scan for sampling, log pi for log-probs, log/reciprocal sums for
// the loss). Extra memory: 2 rows of K floats per worker. The scalar math shared with CUDA is
// in mr_token_math.h.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cache_line.h"
#include "common/philox.h"
#include "common/simd.h"
#include "common/thread_pool.h"
#include "diffusion/diffusion_cpu_internal.h"
#include "diffusion/mr_token_math.h"

namespace imgtx {
namespace IMGTX_CPU_NS {
namespace {

using mr::TokenCoefs;

// A worker's scratch: two rows of padded(K) floats (logits, exp) and the chunk sums of e.
// pre[i]: this token's row of logits input i, already gathered by the driver (null when the
// layout lets the token load it directly).
struct Scratch {
  float* l;
  float* e;
  double* sums;
  const float* pre[2];
};

// Tokens gathered together when the class stride is not 1 (diffusers' contiguous (B, K, N)):
// reading one class for kGroup consecutive tokens touches one cache line instead of kGroup.
constexpr int64_t kGroup = 16;

template <int W>
struct Kernels {
  typedef typename simd::Vec<W>::F F;
  typedef typename simd::Vec<W>::I I;
  typedef typename simd::Vec<W>::D D;

  static constexpr float kInf = std::numeric_limits<float>::infinity();

  // A bit pattern u whose mass above is >= that of everything above bound: the float just below
  // `bound` (rounded down by 1e-6 relative to absorb rounding), or -1 for bound <= 0.
  static int64_t lower_bits(double bound) {
    const float f = float(bound * (1.0 - 1e-6));
    if (!(f > 0.f)) return -1;
    int32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    return int64_t(bits) - 1;
  }

  // Lane i of the result is true for lanes whose class index i0 + i is < K.
  static I live_lanes(int64_t i0, int64_t K) {
    I idx;
    for (int i = 0; i < W; ++i) idx[i] = i;
    return idx < int32_t(K - i0 < W ? K - i0 : W);
  }

  // max over the row and whether it holds NaN or +Inf; padding lanes hold -inf.
  static float row_max(const float* l, int64_t Kp, bool* bad) {
    F m = simd::splat<W>(-kInf);
    I b = I{};
    for (int64_t i = 0; i < Kp; i += W) {
      const F v = simd::load<W>(l + i);
      m = v > m ? v : m;
      b |= (v != v) | (v == kInf);
    }
    bool any = false;
    for (int i = 0; i < W; ++i) any |= b[i] != 0;
    *bad = any;
    return simd::hmax(m, W);
  }

  // Chunks of kChunk classes: the exp pass records each chunk's sum, so the sampler's
  // inverse-CDF search walks K / kChunk sums and then one chunk, not the whole row again.
  static constexpr int64_t kChunk = 4 * W;
  static int64_t num_chunks(int64_t Kp) { return (Kp + kChunk - 1) / kChunk; }

  // Sums of e over each chunk into sums[]; returns their total. Float64 accumulation.
  static double chunk_sums(const float* e, int64_t Kp, double* sums) {
    double total = 0.0;
    for (int64_t j = 0, c = 0; j < Kp; j += kChunk, ++c) {
      simd::DoubleAcc<W> acc;
      const int64_t end = j + kChunk < Kp ? j + kChunk : Kp;
      for (int64_t i = j; i < end; i += W) acc.add(simd::load<W>(e + i));
      sums[c] = acc.sum();
      total += sums[c];
    }
    return total;
  }

  // e = exp(l - M); fills the chunk sums and returns sum(e). Within a chunk each lane adds
  // 4 values in float (relative error <= 3 ulp), chunks are combined in float64.
  static double exp_row(const float* l, float M, int64_t Kp, float* e, double* sums) {
    double total = 0.0;
    for (int64_t j = 0, c = 0; j < Kp; j += kChunk, ++c) {
      F acc = F{};
      const int64_t end = j + kChunk < Kp ? j + kChunk : Kp;
      for (int64_t i = j; i < end; i += W) {
        const F v = simd::exp<W>(simd::load<W>(l + i) - M);
        simd::store<W>(e + i, v);
        acc += v;
      }
      sums[c] = simd::hsum(acc, W);
      total += sums[c];
    }
    return total;
  }

  // The per-vector step of a truncation probe at bit pattern(s) mid (e >= 0, so integer order
  // is value order): take() returns the values above mid (0 elsewhere) and folds the nearest
  // class patterns on both sides of mid into below / above (INT32_MIN / INT32_MAX if none),
  // which let the bisection snap its bounds onto class values.
  struct Snap {
    I below = I{} + std::numeric_limits<int32_t>::min();
    I above = I{} + std::numeric_limits<int32_t>::max();
    F take(F v, I mid) {
      I bits;
      std::memcpy(&bits, &v, sizeof(bits));
      const I gt = bits > mid;
      const I b_lo = gt ? I{} + std::numeric_limits<int32_t>::min() : bits;
      const I b_hi = gt ? bits : I{} + std::numeric_limits<int32_t>::max();
      below = b_lo > below ? b_lo : below;
      above = b_hi < above ? b_hi : above;
      return gt ? v : F{};
    }
  };

  // One bisection probe at bit pattern u over a row: the mass of the classes above u (float
  // partials of 4 vectors, combined in float64), the largest class pattern <= u and the
  // smallest > u.
  struct Probe {
    double mass;
    int32_t below, above;
  };
  static Probe probe(const float* e, int64_t Kp, int32_t u) {
    const I mid = I{} + u;
    simd::DoubleAcc<W> acc;
    Snap sn;
    auto sel = [&](int64_t at) { return sn.take(simd::load<W>(e + at), mid); };
    int64_t i = 0;
    for (; i + 4 * W <= Kp; i += 4 * W)
      acc.add((sel(i) + sel(i + W)) + (sel(i + 2 * W) + sel(i + 3 * W)));
    for (; i < Kp; i += W) acc.add(sel(i));
    Probe r{acc.sum(), sn.below[0], sn.above[0]};
    for (int l = 1; l < W; ++l) {
      r.below = sn.below[l] > r.below ? sn.below[l] : r.below;
      r.above = sn.above[l] < r.above ? sn.above[l] : r.above;
    }
    return r;
  }

  // Top-r truncation (spec): keeps { j : bits(e_j) > u0 } and the first mr::tie_keep classes
  // equal to u0 (tie_cut), with u0 the smallest u such that the mass strictly above u is
  // < r P; zeroes the rest, refreshes the chunk sums and returns the kept mass. Bisection over the bit patterns, from the bound below which every class
  // is dropped ((1 - r) P / K: at most K classes lie below it, holding < (1 - r) P), with the
  // bounds snapped onto class values after each probe (the mass above u only changes at class
  // values): ~10 probes instead of 27.
  static double truncate(float* e, int64_t Kp, double P, double r, int64_t K, double* sums) {
    const double threshold = r * P;
    int64_t lo = int64_t(lower_bits((1.0 - r) * P / double(K))), hi = 0x3f800000;
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      const Probe pr = probe(e, Kp, int32_t(mid));
      if (pr.mass < threshold)
        hi = pr.below > lo ? pr.below : lo + 1;  // the mass above is constant on [below, mid]
      else
        lo = int64_t(pr.above) - 1;  // ... and on [mid, above)
    }
    const int32_t u0 = int32_t(hi);
    I ties = I{};  // per lane: the classes equal to u0
    for (int64_t i = 0; i < Kp; i += W) {
      const F v = simd::load<W>(e + i);
      I bits;
      std::memcpy(&bits, &v, sizeof(bits));
      ties -= bits == u0;  // a true lane is -1
      simd::store<W>(e + i, bits >= u0 ? v : F{});
    }
    int64_t count = 0;
    for (int l = 0; l < W; ++l) count += ties[l];
    const double kept = chunk_sums(e, Kp, sums);
    const int64_t cut = tie_cut(e, Kp, u0, count, threshold, kept);
    if (cut == Kp) return kept;
    for (int64_t j = cut; j < Kp; ++j)  // the boundary value's classes after the first n
      if (bits_of(e[j]) == u0) e[j] = 0.f;
    return chunk_sums(e, Kp, sums);
  }

  static int32_t bits_of(float v) {
    int32_t b;
    std::memcpy(&b, &v, sizeof(b));
    return b;
  }

  // Of the classes equal to the boundary value u0 only the first mr::tie_keep stay, in index
  // order, as diffusers' sort keeps them: returns the index from which the others are dropped
  // (Kp: none). e holds the kept classes (mass `kept`), `count` of them equal to u0: the mass
  // above u0 is kept less the tie.
  static int64_t tie_cut(const float* e, int64_t Kp, int32_t u0, int64_t count, double threshold,
                         double kept) {
    if (count <= 1) return Kp;
    float v0;
    std::memcpy(&v0, &u0, sizeof(v0));
    const double above = kept - double(count) * double(v0);
    const int64_t keep = mr::tie_keep(threshold, above, double(v0), count);
    if (keep == count) return Kp;
    for (int64_t j = 0, seen = 0; j < Kp; ++j)
      if (bits_of(e[j]) == u0 && ++seen > keep) return j;
    return Kp;
  }

  // Top-r at r = 0 keeps one class, the most likely: the lowest index among equal p (as
  // diffusers' truncate, whose sort puts it first). Zeroes the rest of e (>= 0; the padding is
  // 0), refreshes the chunk sums and returns the kept mass.
  static double keep_first_max(float* e, int64_t Kp, double* sums) {
    int64_t best = 0;
    for (int64_t j = 1; j < Kp; ++j)
      if (e[j] > e[best]) best = j;
    const float v = e[best];
    std::memset(e, 0, size_t(Kp) * sizeof(float));
    e[best] = v;
    return chunk_sums(e, Kp, sums);
  }

  // First j with cumulative sum of e (float64, in index order) > target, found through the
  // chunk sums; the last class with e > 0 if rounding runs past the end.
  static int64_t scan(const float* e, int64_t K, const double* sums, double target) {
    const int64_t chunks = num_chunks(K);
    double cum = 0.0;
    int64_t c = 0;
    for (; c + 1 < chunks && cum + sums[c] <= target; ++c) cum += sums[c];
    for (int64_t j = c * kChunk; j < K; ++j) {
      cum += double(e[j]);
      if (e[j] > 0.f && cum > target) return j;
    }
    int64_t j = K - 1;
    while (j > 0 && !(e[j] > 0.f)) --j;
    return j;
  }

  // Copies token (b, n) of L into l[0, K) as float and pads l[K, Kp) with -inf.
  static void load_token(const MrLogits& L, int64_t b, int64_t n, int64_t K, int64_t Kp,
                         const float* pre, float* l) {
    if (pre) {
      std::memcpy(l, pre, size_t(Kp) * sizeof(float));
      return;
    }
    const int64_t offset = b * L.stride_batch + n * L.stride_token;
    if (L.stride_class == 1 && L.dtype == DType::kFloat32) {
      std::memcpy(l, static_cast<const float*>(L.data) + offset, size_t(K) * sizeof(float));
    } else if (L.stride_class == 1) {  // fp16/bf16 rows: vector widening, scalar tail
      const uint16_t* src = static_cast<const uint16_t*>(L.data) + offset;
      int64_t i = 0;
      for (; i + W <= K; i += W)
        simd::store<W>(l + i, L.dtype == DType::kBFloat16 ? simd::load_bf16<W>(src + i)
                                                          : simd::load_f16<W>(src + i));
      load_strided_as_float(L.data, offset + i, 1, K - i, L.dtype, l + i);
    } else {
      load_strided_as_float(L.data, offset, L.stride_class, K, L.dtype, l);
    }
    for (int64_t i = K; i < Kp; ++i) l[i] = -kInf;
  }

  // ---- reverse step -----------------------------------------------------------------------
  static int posterior_token(const MrPosteriorParams& p, int64_t b, int64_t n, uint64_t seed,
                             const Scratch& sc) {
    float *l = sc.l, *e = sc.e;
    const int64_t K = p.num_classes, N = p.tokens, Kp = padded(K, W);
    const int64_t xt = p.x_t.data[b * p.x_t.stride_batch + n * p.x_t.stride_token];
    load_token(p.logp, b, n, K, Kp, sc.pre[0], l);
    if (p.logp_uncond.data) {  // l = l_u + s (l_c - l_u), via e as the second row
      load_token(p.logp_uncond, b, n, K, Kp, sc.pre[1], e);
      const float s = p.guidance_scale;
      for (int64_t i = 0; i < Kp; i += W) {
        const F lu = simd::load<W>(e + i), lc = simd::load<W>(l + i);
        simd::store<W>(l + i, lu + s * (lc - lu));
      }
      for (int64_t i = K; i < Kp; ++i) l[i] = -kInf;  // inf - inf in the padding
    }
    bool bad_logits;
    const float M = row_max(l, Kp, &bad_logits);
    bad_logits |= M == -kInf;
    const bool bad_index = xt < 0 || xt > K;
    if (bad_logits || bad_index) {
      write_bad_posterior(p, b, n);
      return (bad_logits ? kMrBadLogits : 0) | (bad_index ? kMrBadIndex : 0);
    }
    double P = exp_row(l, M, Kp, e, sc.sums);
    const bool truncating = p.truncation_rate < 1.f;
    if (p.truncation_rate == 0.f)
      P = keep_first_max(e, Kp, sc.sums);
    else if (truncating)
      P = truncate(e, Kp, P, double(p.truncation_rate), K, sc.sums);
    TokenCoefs k = mr::token_coefs(p.coefs + b * kMrCoefs, xt, K);
    const double p_s = k.s >= 0 ? double(e[k.s]) : 0.0;
    if (p.x_prev) {
      double u0, u1;
      philox_uniform2(seed, uint64_t(b * N + n), kMrStreamPosterior, &u0, &u1);
      const mr::SampleChoice c = mr::choose(k, K, P, p_s, u0, u1);
      int64_t idx = c.index;
      if (idx < 0) {
        if (k.s >= 0) {  // x_t's own class carries u_s, not u_g
          const float old = e[k.s];
          e[k.s] = float(double(old) * c.scan_special_factor);
          sc.sums[k.s / kChunk] += double(e[k.s]) - double(old);
        }
        idx = scan(e, K, sc.sums, c.scan_target);
      }
      p.x_prev[b * N + n] = idx;
      return kMrOk;
    }
    // normalised log-probabilities
    const double Y = mr::token_y(k, P, p_s);
    mr::normalise(&k, Y);
    const double log_pi_total = std::log(mr::pi_total(k, K, P, p_s, Y));
    if (k.v_g == 0.0) {  // t = 0: log(u p_j) computed in log space, so nothing underflows
      // (l - M) + (log u - log pi): l - M first is exact for logits near M whatever their
      // magnitude, where l + (log u - log pi - M) rounds the large sum (~3e-5 TV at 1e4).
      const float log_u = float(std::log(k.u_g) - log_pi_total);
      for (int64_t i = 0; i < Kp; i += W) {
        const F v = (simd::load<W>(l + i) - M) + log_u;
        const I kept = simd::load<W>(e + i) > 0.f;
        simd::store<W>(l + i, truncating ? (kept ? v : simd::splat<W>(-kInf)) : v);
      }
    } else {
      const float ug = float(k.u_g), vy = float(k.v_g * Y), lp = float(log_pi_total);
      for (int64_t i = 0; i < Kp; i += W) {
        F pi = ug * simd::load<W>(e + i) + vy;
        pi = pi > mr::kPiFloor ? pi : simd::splat<W>(mr::kPiFloor);
        simd::store<W>(l + i, simd::log<W>(pi) - lp);
      }
    }
    if (k.s >= 0 && k.v_g != 0.0) {  // x_t's own class (the t = 0 branch needs no fix-up)
      const double pis = k.u_s * p_s + k.v_s * Y;
      l[k.s] = pis > 0.0 ? float(std::log(pis) - log_pi_total) : -kInf;
    }
    float* out = p.log_probs + b * p.out_stride_batch + n * p.out_stride_token;
    for (int64_t j = 0; j < K; ++j) out[j * p.out_stride_class] = l[j];
    out[K * p.out_stride_class] =
        k.w > 0.0 ? float(std::log(k.w * Y) - log_pi_total) : -kInf;
    return kMrOk;
  }

  static void write_bad_posterior(const MrPosteriorParams& p, int64_t b, int64_t n) {
    if (p.x_prev) {
      p.x_prev[b * p.tokens + n] = -1;
      return;
    }
    float* out = p.log_probs + b * p.out_stride_batch + n * p.out_stride_token;
    for (int64_t j = 0; j <= p.num_classes; ++j)
      out[j * p.out_stride_class] = std::numeric_limits<float>::quiet_NaN();
  }

  // ---- training loss: forward ---------------------------------------------------------------
  static int vb_forward_token(const MrVbParams& p, int64_t b, int64_t n, const Scratch& sc) {
    float *l = sc.l, *e = sc.e;
    const int64_t K = p.num_classes, N = p.tokens, Kp = padded(K, W), tok = b * N + n;
    const int64_t x0 = p.x0.data[b * p.x0.stride_batch + n * p.x0.stride_token];
    const int64_t xt = p.x_t.data[b * p.x_t.stride_batch + n * p.x_t.stride_token];
    double* saved = p.saved + tok * kMrVbSaved;
    load_token(p.logits, b, n, K, Kp, sc.pre[0], l);
    bool bad_logits;
    const float M = row_max(l, Kp, &bad_logits);
    bad_logits |= M == -kInf;
    const bool bad_index = x0 < 0 || x0 >= K || xt < 0 || xt > K;
    if (bad_logits || bad_index) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      p.loss_vb[tok] = p.loss_aux[tok] = nan;
      for (int i = 0; i < kMrVbSaved; ++i) saved[i] = double(nan);
      return (bad_logits ? kMrBadLogits : 0) | (bad_index ? kMrBadIndex : 0);
    }
    const double P = exp_row(l, M, Kp, e, sc.sums);
    const double ce = std::log(P) - (double(l[x0]) - double(M));
    p.loss_aux[tok] = float(ce);
    TokenCoefs k = mr::token_coefs(p.coefs + b * kMrCoefs, xt, K);
    saved[0] = double(M);
    saved[1] = P;
    if (k.t0) {
      p.loss_vb[tok] = float(ce);
      saved[2] = saved[3] = saved[4] = saved[5] = 0.0;
      return kMrOk;
    }
    const double p_s = k.s >= 0 ? double(e[k.s]) : 0.0;
    const double Y = mr::token_y(k, P, p_s);
    mr::normalise(&k, Y);
    const double Pi = mr::pi_total(k, K, P, p_s, Y);
    const float ug = float(k.u_g), vy = float(k.v_g * Y);
    simd::DoubleAcc<W> acc_log, acc_inv;
    for (int64_t i = 0; i < Kp; i += W) {
      F pi = ug * simd::load<W>(e + i) + vy;
      pi = pi > mr::kPiFloor ? pi : simd::splat<W>(mr::kPiFloor);
      F lg = simd::log<W>(pi), inv = 1.0f / pi;
      if (i + W > K) {  // padding lanes contribute nothing
        const I live = live_lanes(i, K);
        lg = live ? lg : F{};
        inv = live ? inv : F{};
      }
      acc_log.add(lg);
      acc_inv.add(inv);
    }
    const mr::KlOut o = mr::kl_finish(k, K, x0, double(e[x0]), p_s, Y, Pi,
                                      acc_log.sum(), acc_inv.sum());
    p.loss_vb[tok] = float(o.kl);
    saved[2] = Y;
    saved[3] = Pi;
    saved[4] = o.T;
    saved[5] = 0.0;
    return kMrOk;
  }

  // ---- training loss: backward ---------------------------------------------------------------
  static void vb_backward_token(const MrVbParams& p, int64_t b, int64_t n, const Scratch& sc) {
    float *l = sc.l, *e = sc.e;
    const int64_t K = p.num_classes, N = p.tokens, Kp = padded(K, W), tok = b * N + n;
    const int64_t x0 = p.x0.data[b * p.x0.stride_batch + n * p.x0.stride_token];
    const int64_t xt = p.x_t.data[b * p.x_t.stride_batch + n * p.x_t.stride_token];
    const double* saved = p.saved + tok * kMrVbSaved;
    const int64_t out0 = b * p.grad_stride_batch + n * p.grad_stride_token;
    const double g_vb = p.grad_vb ? double(p.grad_vb[tok]) : 0.0;
    const double g_aux = p.grad_aux ? double(p.grad_aux[tok]) : 0.0;
    if (std::isnan(saved[0])) {
      for (int64_t j = 0; j < K; ++j) e[j] = std::numeric_limits<float>::quiet_NaN();
      store_strided(p, out0, e);
      return;
    }
    const float M = float(saved[0]);
    const double P = saved[1], Y = saved[2], Pi = saved[3], T = saved[4];
    load_token(p.logits, b, n, K, Kp, sc.pre[0], l);
    exp_row(l, M, Kp, e, sc.sums);  // the same p_j as the forward pass
    TokenCoefs k = mr::token_coefs(p.coefs + b * kMrCoefs, xt, K);
    if (!k.t0) mr::normalise(&k, Y);
    const mr::GradCoefs gc = mr::grad_coefs(k, K, x0, P, Y, Pi, T, g_vb, g_aux);
    const float c1 = float(gc.c1), c2 = float(gc.c2), ug = float(k.u_g), vy = float(k.v_g * Y);
    const double p_x0 = double(e[x0]), p_s = k.s >= 0 ? double(e[k.s]) : 0.0;
    if (c2 == 0.f) {
      for (int64_t i = 0; i < Kp; i += W) simd::store<W>(l + i, simd::load<W>(e + i) * c1);
    } else {
      for (int64_t i = 0; i < Kp; i += W) {
        const F pv = simd::load<W>(e + i);
        F pi = ug * pv + vy;
        pi = pi > mr::kPiFloor ? pi : simd::splat<W>(mr::kPiFloor);
        simd::store<W>(l + i, pv * (c1 - c2 / pi));
      }
    }
    l[x0] = float(mr::special_grad(k, K, x0, x0, p_x0, P, Y, Pi, T, g_vb, g_aux));
    if (k.s >= 0 && k.s != x0)
      l[k.s] = float(mr::special_grad(k, K, x0, k.s, p_s, P, Y, Pi, T, g_vb, g_aux));
    store_strided(p, out0, l);
  }

  static void store_strided(const MrVbParams& p, int64_t offset, float* v) {
    const int64_t K = p.num_classes, sc = p.grad_stride_class;
    switch (p.logits.dtype) {
      case DType::kFloat16: {
        uint16_t* dst = static_cast<uint16_t*>(p.grad_logits) + offset;
        for (int64_t j = 0; j < K; ++j) dst[j * sc] = float_to_half_bits(v[j]);
        break;
      }
      case DType::kBFloat16: {
        uint16_t* dst = static_cast<uint16_t*>(p.grad_logits) + offset;
        for (int64_t j = 0; j < K; ++j) dst[j * sc] = float_to_bf16_bits(v[j]);
        break;
      }
      default: {
        float* dst = static_cast<float*>(p.grad_logits) + offset;
        for (int64_t j = 0; j < K; ++j) dst[j * sc] = v[j];
      }
    }
  }
};

// rows[i * Kp + j] = L[b, j, n0 + i] as float for i < count, j < K; -inf padding to Kp.
inline void gather_group(const MrLogits& L, int64_t b, int64_t n0, int64_t count, int64_t K,
                         int64_t Kp, float* rows) {
  const int64_t base = b * L.stride_batch + n0 * L.stride_token, st = L.stride_token;
  float col[kGroup];
  for (int64_t j = 0; j < K; ++j) {
    load_strided_as_float(L.data, base + j * L.stride_class, st, count, L.dtype, col);
    for (int64_t i = 0; i < count; ++i) rows[i * Kp + j] = col[i];
  }
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = K; j < Kp; ++j) rows[i * Kp + j] = -std::numeric_limits<float>::infinity();
}

// Runs token_fn(b, n, scratch) over every token with per-worker scratch; ORs the statuses.
// `inputs` are the logits the token functions read (null data: absent); when their class
// stride is not 1 the driver gathers them kGroup tokens at a time into scratch rows.
// Tokens [n_begin, tokens) of every sample.
template <int W, class TokenFn>
int for_each_token(int64_t batch, int64_t tokens, int64_t K, const MrLogits* inputs,
                   int num_threads, TokenFn token_fn, int64_t n_begin = 0) {
  if (n_begin >= tokens || batch == 0) return kMrOk;
  const bool gather = inputs[0].stride_class != 1;
  const int64_t span = tokens - n_begin;
  int64_t per_task = tokens_per_task(batch, span, num_threads);
  if (gather) per_task = (per_task + kGroup - 1) / kGroup * kGroup;
  const int64_t tasks_per_sample = (span + per_task - 1) / per_task;
  const int64_t tasks = batch * tasks_per_sample;
  const int64_t Kp = padded(K, W), chunks = Kernels<W>::num_chunks(Kp);
  const int64_t group_floats = gather ? 2 * kGroup * Kp : 0;
  const int workers = parallel_workers(tasks, num_threads);
  // Each worker's rows and sums start on a cache line of their own (common/cache_line.h): the
  // sums are written for every token, and neighbouring workers' would share lines.
  const int64_t rows_ld = line_padded<float>(2 * Kp + group_floats);
  const int64_t sums_ld = line_padded<double>(chunks);
  LineVector<float> rows(size_t(workers) * size_t(rows_ld));
  LineVector<double> sums(size_t(workers) * size_t(sums_ld));
  std::atomic<int> status{0};
  parallel_for(tasks, num_threads, [&](int64_t task, int worker) {
    Scratch sc;
    sc.l = rows.data() + size_t(worker) * size_t(rows_ld);
    sc.e = sc.l + Kp;
    float* group = sc.e + Kp;
    sc.sums = sums.data() + size_t(worker) * size_t(sums_ld);
    sc.pre[0] = sc.pre[1] = nullptr;
    const int64_t b = task / tasks_per_sample;
    const int64_t n0 = n_begin + (task % tasks_per_sample) * per_task;
    const int64_t n1 = n0 + per_task < tokens ? n0 + per_task : tokens;
    int local = 0;
    for (int64_t g0 = n0; g0 < n1; g0 += gather ? kGroup : n1 - n0) {
      const int64_t g1 = gather && g0 + kGroup < n1 ? g0 + kGroup : n1;
      if (gather)
        for (int i = 0; i < 2; ++i)
          if (inputs[i].data) gather_group(inputs[i], b, g0, g1 - g0, K, Kp, group + i * kGroup * Kp);
      for (int64_t n = g0; n < g1; ++n) {
        if (gather)
          for (int i = 0; i < 2; ++i)
            sc.pre[i] = inputs[i].data ? group + i * kGroup * Kp + (n - g0) * Kp : nullptr;
        local |= token_fn(b, n, sc);
      }
    }
    if (local) status.fetch_or(local, std::memory_order_relaxed);
  });
  return status.load();
}

}  // namespace
}  // namespace IMGTX_CPU_NS
}  // namespace imgtx

#include "diffusion/diffusion_cpu_lanes.h"

namespace imgtx {
namespace IMGTX_CPU_NS {

template <int W>
int mr_posterior_driver(const MrPosteriorParams& p, int num_threads) {
  const uint64_t seed = p.seed ? uint64_t(*p.seed) : 0;
  const MrLogits inputs[2] = {p.logp, p.logp_uncond};
  auto row = [&](int64_t b, int64_t n, const Scratch& sc) {
    return Kernels<W>::posterior_token(p, b, n, seed, sc);
  };
  const bool lanes = p.logp.stride_token == 1 && p.logp.stride_class != 1 &&
                     (!p.logp_uncond.data || p.logp_uncond.stride_token == 1) && p.tokens >= W;
  if (!lanes) return for_each_token<W>(p.batch, p.tokens, p.num_classes, inputs, num_threads, row);
  // W tokens per vector, kTileGroups vectors per task; the last tokens % W of each sample go
  // through the row kernels.
  typedef LaneKernels<W> L;
  const int64_t K = p.num_classes, groups = p.tokens / W;
  const int64_t tiles = (groups + L::kTileGroups - 1) / L::kTileGroups, tasks = p.batch * tiles;
  const int64_t chunks = L::num_chunks(K);
  const int workers = parallel_workers(tasks, num_threads);
  // Per worker, on cache lines of its own (common/cache_line.h), as in for_each_token.
  const int64_t blocks_ld = line_padded<float>(K * W), sums_ld = line_padded<double>(chunks * W);
  LineVector<float> blocks(size_t(workers) * size_t(blocks_ld));
  LineVector<double> sums(size_t(workers) * size_t(sums_ld));
  std::atomic<int> status{0};
  parallel_for(tasks, num_threads, [&](int64_t task, int worker) {
    const int64_t b = task / tiles, g0 = (task % tiles) * L::kTileGroups;
    const int64_t count = g0 + L::kTileGroups < groups ? L::kTileGroups : groups - g0;
    typename L::F M[L::kTileGroups];
    typename L::I bad[L::kTileGroups];
    L::tile_max(p, b, g0 * W, count, M, bad);
    int local = 0;
    for (int64_t g = 0; g < count; ++g)
      local |= L::posterior_group(p, b, (g0 + g) * W, seed, M[g], bad[g],
                                  blocks.data() + size_t(worker) * size_t(blocks_ld),
                                  sums.data() + size_t(worker) * size_t(sums_ld));
    if (local) status.fetch_or(local, std::memory_order_relaxed);
  });
  return status.load() | for_each_token<W>(p.batch, p.tokens, K, inputs, num_threads, row,
                                           groups * W);
}

template <int W>
int mr_vb_forward_driver(const MrVbParams& p, int num_threads) {
  const MrLogits inputs[2] = {p.logits, MrLogits{}};
  return for_each_token<W>(p.batch, p.tokens, p.num_classes, inputs, num_threads,
                           [&](int64_t b, int64_t n, const Scratch& sc) {
                             return Kernels<W>::vb_forward_token(p, b, n, sc);
                           });
}

template <int W>
void mr_vb_backward_driver(const MrVbParams& p, int num_threads) {
  const MrLogits inputs[2] = {p.logits, MrLogits{}};
  for_each_token<W>(p.batch, p.tokens, p.num_classes, inputs, num_threads,
                    [&](int64_t b, int64_t n, const Scratch& sc) {
                      Kernels<W>::vb_backward_token(p, b, n, sc);
                      return 0;
                    });
}

}  // namespace IMGTX_CPU_NS
}  // namespace imgtx
