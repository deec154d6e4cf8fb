// The one float64 summation order for per-row sums that are outputs (sqdist) or feed the
// certification bound (|z|): 8 running sums over d mod 8, each in increasing d, combined as
// ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)). The CPU and CUDA backends both use it,
// so their outputs agree bit for bit; 8 independent chains also keep the CPU loop from being
// latency-bound (one sequential chain cost ~4 cycles per element).
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace imgtx {

constexpr int kSumLanes = 8;

IMGTX_HD double combine_sum_lanes(const double* s) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// sum over d < n of term(d), in the order above. Host code; CUDA kernels split the lanes
// over threads and call combine_sum_lanes.
template <class Term>
inline double sum_in_lanes(int64_t n, Term term) {
  double s[kSumLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + kSumLanes <= n; d += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) s[l] += term(d + l);
  for (int l = 0; d + l < n; ++l) s[l] += term(d + l);
  return combine_sum_lanes(s);
}

}  // namespace imgtx
