// The per-token scalar math of mask-and-replace diffusion, shared by the CPU and CUDA kernels.
//
// Every reverse-step posterior has one shape (spec: docs/specs/mask_and_replace.md):
//   pi_j = u_j p_j + v_j Y     (j < K)        pi_K = w Y        Y = sum_j y_j p_j
// where p_j = exp(l_j - max l) and u, v, y take a "generic" value for every real class except
// the special one s = x_t (when x_t is a real class). Then
//   x_t = MASK:  u = c A',  v = c B',  w = C',  y = 1            (the spec's form times C)
//   x_t = s < K: u_g = b A', u_s = (a+b) A' B/(A+B), v_g = b B', v_s = (a+b) B', w = 0,
//                y_g = 1, y_s = B/(A+B)                           (the spec's form times B)
//   t = 0:       u = 1, v = w = 0                                 (p(x_{t-1}) = p(x0 | x_t))
// Scaling pi by a constant changes nothing (the posterior is normalised), so these forms are
// chosen to be finite for every valid schedule (no division by B ~ 1e-10).
#pragma once

#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "imgtx/diffusion.h"

namespace imgtx {
namespace mr {

struct TokenCoefs {
  double u_g, u_s, v_g, v_s, w, y_g, y_s;
  int64_t s;  // the special real class (x_t), or -1 when x_t = MASK
  bool t0;
};

IMGTX_HD TokenCoefs token_coefs(const double* c, int64_t x_t, int64_t K) {
  TokenCoefs r;
  r.t0 = c[kMrTZero] != 0.0;
  r.s = x_t < K ? x_t : -1;
  if (r.t0) {
    r.u_g = r.u_s = 1.0;
    r.v_g = r.v_s = r.w = 0.0;
    r.y_g = r.y_s = 1.0;
  } else if (r.s < 0) {
    r.u_g = r.u_s = c[kMrC1] * c[kMrAp];
    r.v_g = r.v_s = c[kMrC1] * c[kMrBp];
    r.w = c[kMrCp];
    r.y_g = r.y_s = 1.0;
  } else {
    const double a = c[kMrA1], b = c[kMrB1], A = c[kMrAc], B = c[kMrBc];
    const double Ap = c[kMrAp], Bp = c[kMrBp];
    r.u_g = b * Ap;
    r.u_s = (a + b) * Ap * (B / (A + B));
    r.v_g = b * Bp;
    r.v_s = (a + b) * Bp;
    r.w = 0.0;
    r.y_g = 1.0;
    r.y_s = B / (A + B);
  }
  return r;
}

// Y for a token whose (truncated) p sums to P with p_s at the special class.
IMGTX_HD double token_y(const TokenCoefs& k, double P, double p_s) {
  return k.s < 0 ? k.y_g * P : k.y_g * (P - p_s) + k.y_s * p_s;
}

// Rescales u, v, w so that the largest pi_j is O(1): the elementwise float math (log pi,
// 1 / pi) then neither overflows nor underflows. Returns the factor applied.
IMGTX_HD double normalise(TokenCoefs* k, double Y) {
  const double umax = k->u_g > k->u_s ? k->u_g : k->u_s;
  const double vmax = k->v_g > k->v_s ? k->v_g : k->v_s;
  const double sigma = 1.0 / (umax + (vmax + k->w) * Y);
  k->u_g *= sigma;
  k->u_s *= sigma;
  k->v_g *= sigma;
  k->v_s *= sigma;
  k->w *= sigma;
  return sigma;
}

// Sum of v_j over the K real classes plus w (the weight of the "Y part" per unit Y).
IMGTX_HD double v_total(const TokenCoefs& k, int64_t K) {
  return k.s < 0 ? k.v_g * double(K) + k.w : k.v_g * double(K - 1) + k.v_s + k.w;
}

// Total mass Pi = sum_j pi_j.
IMGTX_HD double pi_total(const TokenCoefs& k, int64_t K, double P, double p_s, double Y) {
  const double w1 = k.s < 0 ? k.u_g * P : k.u_g * (P - p_s) + k.u_s * p_s;
  return w1 + v_total(k, K) * Y;
}

// ---- top-r truncation: the boundary tie ---------------------------------------------------
// The kernels find u0, the smallest p value whose mass strictly above (`above`) is < r P
// (`threshold`). diffusers sorts p descending, equal values in index order, and keeps a class
// while the mass before it in that order is < r P: of the `count` classes equal to the
// boundary value v only the first n by index stay, n = #{m in [0, count) : above + m v < r P}
// (>= 1, since above < r P). Classes above v are all kept, classes below it all dropped.
IMGTX_HD int64_t tie_keep(double threshold, double above, double v, int64_t count) {
  if (!(v > 0.0) || above + double(count - 1) * v < threshold) return count;
  const double n = ceil((threshold - above) / v);  // m < (threshold - above) / v
  return n < 1.0 ? 1 : (n > double(count) ? count : int64_t(n));
}

// ---- forward noising ----------------------------------------------------------------------
// x_t ~ q(x_t | x0) from two uniforms: MASK with probability C_t, x0 with A_t, a uniform real
// class with K B_t (x0 included: A_t + B_t for x0, B_t for every other class).
IMGTX_HD int64_t q_sample_token(const double* c, int64_t x0, int64_t K, double u0, double u1) {
  if (u0 < c[kMrCc]) return K;
  if (u0 < c[kMrCc] + c[kMrAc]) return x0;
  const int64_t x = int64_t(u1 * double(K));
  return x < K ? x : K - 1;
}

// ---- sampling -----------------------------------------------------------------------------
// pi is a mixture of two parts: the "p part" (weights u_j p_j over real classes) and the
// "Y part" (weights v_j Y over real classes, w Y for MASK, independent of p). The sampler
// draws u0 to pick the part, then u1 inside it: the Y part has a closed form; the p part is an
// inverse-CDF scan over the token's p (the only O(K) work), which the caller does with
// target `scan_target` over p where p_s has been multiplied by `scan_special_factor`.
struct SampleChoice {
  int64_t index;        // >= 0: the drawn class; -1: scan the p part
  double scan_target;   // in units of p (already divided by u_g)
  double scan_special_factor;  // u_s / u_g
};

IMGTX_HD SampleChoice choose(const TokenCoefs& k, int64_t K, double P, double p_s, double u0,
                             double u1) {
  SampleChoice r{-1, 0.0, 1.0};
  const double w1 = k.s < 0 ? k.u_g * P : k.u_g * (P - p_s) + k.u_s * p_s;
  const double Y = token_y(k, P, p_s);
  const double V = v_total(k, K);
  const double w2 = V * Y;
  if (u0 * (w1 + w2) < w1) {  // p part
    if (!(k.u_g > 0.0)) {     // only the special class carries p weight
      r.index = k.s >= 0 ? k.s : 0;
      return r;
    }
    r.scan_target = u1 * w1 / k.u_g;
    r.scan_special_factor = k.u_s / k.u_g;
    return r;
  }
  double t = u1 * V;  // Y part
  if (t < k.w) {
    r.index = K;
    return r;
  }
  t -= k.w;
  if (k.s >= 0) {
    if (t < k.v_s) {
      r.index = k.s;
      return r;
    }
    t -= k.v_s;
    int64_t j = k.v_g > 0.0 ? int64_t(t / k.v_g) : 0;
    j = j < 0 ? 0 : (j > K - 2 ? K - 2 : j);
    r.index = j >= k.s ? j + 1 : j;
    if (K == 1) r.index = k.s;
    return r;
  }
  int64_t j = k.v_g > 0.0 ? int64_t(t / k.v_g) : 0;
  r.index = j < 0 ? 0 : (j > K - 1 ? K - 1 : j);
  return r;
}

// ---- training loss ------------------------------------------------------------------------
// The true posterior q = posterior(onehot(x0 = k)) takes at most four distinct values: at k,
// at s, at MASK and at every other real class ("generic"). KL(q || pi / Pi) and its gradient
// then need, from the model side, only sum_j log pi_j and sum_j 1 / pi_j over the real classes
// computed with the generic formula u_g p_j + v_g Y, which the kernels reduce; the special
// classes are corrected here in float64.
struct Trueq {
  double q_g, q_k, q_s, q_K;  // q at generic, x0, x_t (if real and != x0), MASK
  bool s_distinct;            // x_t is real and != x0
  double generic_count;       // number of generic classes
};

IMGTX_HD Trueq true_posterior(const TokenCoefs& k, int64_t K, int64_t x0) {
  Trueq q;
  const bool k_is_s = x0 == k.s;
  q.s_distinct = k.s >= 0 && !k_is_s;
  const double Yt = k_is_s ? k.y_s : k.y_g;
  const double u_k = k_is_s ? k.u_s : k.u_g;
  const double v_k = k_is_s ? k.v_s : k.v_g;
  const double Pi = u_k + v_total(k, K) * Yt;
  q.q_g = k.v_g * Yt / Pi;
  q.q_k = (u_k + v_k * Yt) / Pi;
  q.q_s = q.s_distinct ? k.v_s * Yt / Pi : 0.0;
  q.q_K = k.w * Yt / Pi;
  q.generic_count = double(K - 1 - (q.s_distinct ? 1 : 0));
  return q;
}

IMGTX_HD double xlogx(double x) { return x > 0.0 ? x * log(x) : 0.0; }

// pi_j of the model for real class j given its p_j (exact special handling).
IMGTX_HD double pi_of(const TokenCoefs& k, int64_t j, double p_j, double Y) {
  return j == k.s ? k.u_s * p_j + k.v_s * Y : k.u_g * p_j + k.v_g * Y;
}
IMGTX_HD double pi_generic(const TokenCoefs& k, double p_j, double Y) {
  return k.u_g * p_j + k.v_g * Y;
}

// Guard for logs/reciprocals of pi computed in float: the normalised pi never needs less.
constexpr float kPiFloor = 1.1754944e-38f;  // FLT_MIN

// KL(q || pi / Pi) and the scalar T = sum_j q_j v_j / pi_j + q_K w / pi_K of its gradient,
// from the kernels' reductions sum_log = sum_{j<K} log(max(pi_generic(p_j), floor)) and
// sum_inv = sum_{j<K} 1 / max(pi_generic(p_j), floor).
struct KlOut {
  double kl, T;
};
IMGTX_HD KlOut kl_finish(const TokenCoefs& k, int64_t K, int64_t x0, double p_k, double p_s,
                         double Y, double Pi, double sum_log, double sum_inv) {
  const Trueq q = true_posterior(k, K, x0);
  const double floor_ = double(kPiFloor);
  auto clampf = [floor_](double v) { return v > floor_ ? v : floor_; };
  // Remove the generic-formula terms of the special classes from the reductions.
  const double gk = clampf(pi_generic(k, p_k, Y));
  double s_log = sum_log - log(gk), s_inv = sum_inv - 1.0 / gk;
  if (q.s_distinct) {
    const double gs = clampf(pi_generic(k, p_s, Y));
    s_log -= log(gs);
    s_inv -= 1.0 / gs;
  }
  const double pik = clampf(pi_of(k, x0, p_k, Y));
  const double v_k = x0 == k.s ? k.v_s : k.v_g;
  double cross = q.q_g * s_log + q.q_k * log(pik);  // sum_j q_j log pi_j
  double T = q.q_g * k.v_g * s_inv + q.q_k * v_k / pik;
  if (q.s_distinct) {
    const double pis = clampf(k.u_s * p_s + k.v_s * Y);
    cross += q.q_s * log(pis);
    T += q.q_s * k.v_s / pis;
  }
  if (q.q_K > 0.0) {
    cross += q.q_K * log(k.w * Y);
    T += q.q_K / Y;  // q_K * w / (w Y)
  }
  const double neg_entropy =
      q.generic_count * xlogx(q.q_g) + xlogx(q.q_k) + xlogx(q.q_s) + xlogx(q.q_K);
  KlOut r;
  r.kl = neg_entropy - cross + log(Pi);
  r.T = T;
  return r;
}

// Gradient of g_vb * L_vb + g_aux * L_aux with respect to logit i:
//   generic i:   p_i * (c1 - c2 / pi_generic(p_i))          (the kernels' elementwise pass)
//   special i (x0, x_t): special_grad(...)                   (scalar, overwrites)
struct GradCoefs {
  double c1, c2;
};
IMGTX_HD GradCoefs grad_coefs(const TokenCoefs& k, int64_t K, int64_t x0, double P, double Y,
                              double Pi, double T, double g_vb, double g_aux) {
  (void)Y;  // the elementwise pass folds Y into pi_generic; kept for a symmetric signature
  GradCoefs r;
  if (k.t0) {  // L_vb = L_aux = cross-entropy
    r.c1 = (g_vb + g_aux) / P;
    r.c2 = 0.0;
    return r;
  }
  const Trueq q = true_posterior(k, K, x0);
  r.c1 = g_vb * (-k.y_g * T + (k.u_g + k.y_g * v_total(k, K)) / Pi) + g_aux / P;
  r.c2 = g_vb * q.q_g * k.u_g;
  return r;
}

IMGTX_HD double special_grad(const TokenCoefs& k, int64_t K, int64_t x0, int64_t i, double p_i,
                             double P, double Y, double Pi, double T, double g_vb,
                             double g_aux) {
  const double onehot = i == x0 ? 1.0 : 0.0;
  if (k.t0) return (g_vb + g_aux) * (p_i / P - onehot);
  const Trueq q = true_posterior(k, K, x0);
  const bool is_s = i == k.s;
  const double u_i = is_s ? k.u_s : k.u_g;
  const double y_i = is_s ? k.y_s : k.y_g;
  const double q_i = i == x0 ? q.q_k : (is_s ? q.q_s : q.q_g);
  double pi_i = pi_of(k, i, p_i, Y);
  pi_i = pi_i > double(kPiFloor) ? pi_i : double(kPiFloor);
  const double dF = -q_i * u_i / pi_i - y_i * T + (u_i + y_i * v_total(k, K)) / Pi;
  return g_vb * p_i * dF + g_aux * (p_i / P - onehot);
}

}  // namespace mr
}  // namespace imgtx
