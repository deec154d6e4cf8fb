// When is the fp32 argmin of the fast pass provably the float64 argmin?
//
// The fast pass scores code k against row n as  s~ = fl(norm32_k - 2 * fl(z_n . c_k))  with an
// fp32 FMA (or multiply-add) chain over D terms; norm32_k = |c_k|^2 rounded to fp32 (0 for the
// cosine metric, whose packed unit codes are rounded to fp32). Rounding analysis (Higham,
// Thm 3.5 / Lemma 3.1), u = 2^-24:
//   |fl(z.c) - z.c|          <= gamma_D |z||c|,   gamma_D = D u / (1 - D u)
//   rounding of norm32       <= u |c|^2
//   rounding of the final op <= u (|c|^2 + 2 |z||c|)    (to first order)
//   cosine code rounding     <= u |z||c|  in the dot product
// so every score is within E_n = 2u ((D + 2) |z_n| C + C^2) (1 + 1e-2) of its exact value,
// C = max_k |c_k|; the 1% covers gamma's denominator and second-order terms for D < 10^5,
// and an absolute term covers fp32's subnormal range (each rounding errs by <= 2^-150 there).
// If the best score b and the second-best score s (over all other codes) satisfy s - b > 2 E_n,
// the best code is the exact argmin. Otherwise only codes scoring <= b + 2 E_n (in any
// computation with the same error bound) can be the exact argmin: they are re-checked in
// float64. Rows whose scores could overflow fp32 are re-searched in float64 over all codes.
#pragma once

#include <cmath>
#include <limits>

#include "common/host_device.h"

namespace imgtx {
namespace codebook {

IMGTX_HD double score_error_bound(double z_norm, double code_norm_max, long long dim) {
  const double u = 5.9604644775390625e-08;    // 2^-24
  const double tiny = 1.401298464324817e-45;  // 2^-149, the smallest fp32 subnormal
  return 1.01 * 2.0 * u * (double(dim + 2) * z_norm * code_norm_max +
                           code_norm_max * code_norm_max) +
         double(dim + 4) * tiny;
}

// Whether fp32 scores of this row are meaningful at all (no overflow, no NaN norms).
IMGTX_HD bool scores_are_finite_range(double z_norm, double code_norm_max) {
  return 2.0 * z_norm * code_norm_max + code_norm_max * code_norm_max < 1e36;
}

// best, second: fp32 scores of the best and second-best code (second = +inf when K == 1).
IMGTX_HD bool argmin_is_certified(float best, float second, double z_norm, double code_norm_max,
                                  long long dim) {
  if (!scores_are_finite_range(z_norm, code_norm_max)) return false;
  if (!(std::fabs(double(best)) < 1e38)) return false;  // non-finite best: re-search
  const double gap = double(second) - double(best);      // +inf when there is no second code
  return gap > 2.0 * score_error_bound(z_norm, code_norm_max, dim);
}

// Codes whose fp32 score is <= this may be the exact argmin (see above).
IMGTX_HD double candidate_threshold(float best, double z_norm, double code_norm_max,
                                    long long dim) {
  return double(best) + 2.0 * score_error_bound(z_norm, code_norm_max, dim);
}

// ---- the tensor-core pass of the CUDA backend (3xTF32; codebook_cuda.cu) --------------------
//
// That pass splits each fp32 input x (a z element, or a packed code element) into tf32 parts,
//   x_h = rt(x),  x_l = x - x_h (exact in fp32),  x_l' = rt(x_l),
// rt = round to nearest (ties away) to tf32's 11 significant bits, u_t = 2^-11 = 2^13 u. So
// |x - x_h| <= u_t |x|, |x_l - x_l'| <= u_t |x_l| <= u_t^2 |x| = 4u |x|, |x_h| <= (1 + u_t) |x|.
// It forms T = sum_d z_h c_h (the "big" accumulator) and sum_d z_h c_l' + z_l' c_h (the "small"
// one) with mma.sync m16n8k8 (8 dims per instruction, fp32 accumulators), then
// dot~ = fl(big~ + small~) and the score fl(norm32 - 2 dot~) (one fma).
//
// (1) The split: z.c - (sum z_h c_h + z_h c_l' + z_l' c_h)
//       = sum_d z_h (c_l - c_l') + (z_l - z_l') c_h + z_l c_l,
//     each term <= 4u (1 + u_t) |z_d||c_d|: <= 12.01 u sum_d |z_d c_d| <= 12.01 u |z||c|.
//     (fp16/bf16 inputs are exact tf32, x_l = 0 and this term vanishes; the bound keeps it.)
// (2) One mma, D = C + sum_{8} p_k with exact tf32 x tf32 products p_k: NVIDIA does not specify
//     the internal rounding (tensor cores have been measured to align the addends to the largest
//     exponent and to truncate, not round). Assumed: |mma - (C + sum p)| <= a (|C| + sum |p|)
//     with a = 36u = 18 * 2^-23: the 9 addends each truncated once at alignment and up to 9
//     truncating additions (a k = 8 instruction run as two k = 4 passes included), each
//     <= 2^-23 = 2u relative. (The emulator rounds once in double, far inside this.)
// (3) A chain of m mma (C = the previous result): the error e_j obeys
//     |e_j| <= (1 + a) |e_{j-1}| + a S_j, S_j the sum of |p| so far, so
//     |e_m| <= ((1 + a)^m - 1) S <= g_m S,  g_m = m a / (1 - m a)  (needs m a < 1).
//     big: m = B = ceil(D / 8), S <= (1 + u_t)^2 |z||c| <= 1.001 |z||c|;
//     small: m = 2B, S <= 2 u_t (1 + u_t)^2 |z||c| <= 2^-10 (1.001) |z||c|.
// (4) fl(big~ + small~): <= u (1 + 2^-10)(1 + g_B) |z||c| <= 1.34 u |z||c| (g_B < 1/3 below);
//     the cosine metric's fp32 unit codes add <= u |z||c| (as in the fp32 bound above).
// So |dot~ - z.c| <= (14.35 u + 1.001 (g_B + 2^-10 g_2B)) |z||c|, and as above the score's
// other errors are u |c|^2 (norm32) and u (|c|^2 + 2 |z||c|) (the final fma), in all
//   E_tc = 1.01 * 2 ((16 u + 1.001 (g_B + 2^-10 g_2B)) |z| C + u C^2) + absolute term,
// the 1% covering second-order terms. Against the fp32 bound's 2u (D + 2) |z| C the |z| C term
// is about 4.5x wider (36u per 8 dims against u per dim): the price of not trusting the tensor
// cores' rounding. Absolute term: if the hardware flushes fp32/tf32 subnormals, every product
// of an input below 2^-126 errs by <= 2^-126 times the other input (3 products per d: <=
// 3.01 2^-126 sqrt(D) (|z| + C) over the row), every flushed product or mma result by
// <= 2^-126 (3D products, 10 per mma, 3B mma), and rt in the subnormal range by 2^-137 per
// element: all inside 2^-124 (2 sqrt(D) (|z| + C) + 4D + 16) for the score.
// Rows with 2B a >= 1/2 (D > 931k) are never certified (the bound is +inf).
IMGTX_HD double tf32x3_score_error_bound(double z_norm, double code_norm_max, long long dim) {
  const double u = 0x1p-24, tiny = 0x1p-124;
  const double ma = double((dim + 7) / 8) * 36.0 * u;  // B a
  if (!(2.0 * ma < 0.5)) return std::numeric_limits<double>::infinity();
  const double g_big = ma / (1.0 - ma), g_small = 2.0 * ma / (1.0 - 2.0 * ma);
  return 1.01 * 2.0 * ((16.0 * u + 1.001 * (g_big + g_small / 1024.0)) * z_norm * code_norm_max +
                       u * code_norm_max * code_norm_max) +
         tiny * (2.0 * std::sqrt(double(dim)) * (z_norm + code_norm_max) + 4.0 * double(dim) +
                 16.0);
}

// As scores_are_finite_range, and no input may round to +-inf in the split (rt overflows at
// 2^128 (1 - 2^-12)): |z| and C below 1e38 bound every element.
IMGTX_HD bool tf32x3_scores_are_finite_range(double z_norm, double code_norm_max) {
  return scores_are_finite_range(z_norm, code_norm_max) && z_norm < 1e38 && code_norm_max < 1e38;
}

// best, second: the tensor-core pass's scores of the best and second-best code.
IMGTX_HD bool tf32x3_argmin_is_certified(float best, float second, double z_norm,
                                         double code_norm_max, long long dim) {
  if (!tf32x3_scores_are_finite_range(z_norm, code_norm_max)) return false;
  if (!(std::fabs(double(best)) < 1e38)) return false;
  const double gap = double(second) - double(best);
  return gap > 2.0 * tf32x3_score_error_bound(z_norm, code_norm_max, dim);
}

// The candidates of an uncertified row, when the row is re-scored by the fp32 FMA chain (the
// bound score_error_bound above): the exact argmin k* has exact score <= that of the
// tensor-core best, <= best + E_tc, so its re-score is <= best + E_tc + E_fp32. (For two
// passes with the same bound E this is candidate_threshold's best + 2E.)
IMGTX_HD double tf32x3_candidate_threshold(float best, double z_norm, double code_norm_max,
                                           long long dim) {
  return double(best) + tf32x3_score_error_bound(z_norm, code_norm_max, dim) +
         score_error_bound(z_norm, code_norm_max, dim);
}

}  // namespace codebook
}  // namespace imgtx
