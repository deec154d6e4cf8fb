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

}  // namespace codebook
}  // namespace imgtx
