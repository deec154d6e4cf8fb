// C++ tests of the framework-free core: the public C++ API (imgtx/codebook.h) against a
// brute-force float64 argmin, on every CPU path this machine runs, with odd sizes, strides,
// fp16/bf16 inputs, the cosine metric and bad arguments. No Python, no torch.
// Built by CMake with -DIMGTX_FAST_BUILD_TESTS=ON (target imgtx_core_tests); run by
// tests/test_cpp_core.py. Prints "N passed, N failed" and exits non-zero on any failure.
#include <cmath>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "common/cpu_features.h"
#include "imgtx/codebook.h"

void run_diffusion_tests();  // test_diffusion.cpp
void run_attention_tests();  // test_attention.cpp
void run_thread_pool_tests();  // test_thread_pool.cpp
void run_cache_line_tests();   // test_cache_line.cpp

namespace {

using imgtx_test::check;
using imgtx_test::g_failed;
using imgtx_test::g_passed;

// Brute-force float64 argmin over codes with finite entries (lowest index on ties).
int64_t brute_force(const std::vector<float>& z, int64_t zoff, int64_t zstride,
                    const std::vector<float>& cb, int64_t K, int64_t D, bool cosine) {
  int64_t best_k = 0;
  double best = INFINITY;
  for (int64_t k = 0; k < K; ++k) {
    double dist = 0.0, n2 = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double c = cb[size_t(k * D + d)], x = z[size_t(zoff + d * zstride)];
      n2 += c * c;
      dist += cosine ? -x * c : (x - c) * (x - c);
    }
    if (!std::isfinite(n2)) continue;
    if (cosine) dist /= std::max(std::sqrt(n2), 1e-12);
    if (dist < best) {
      best = dist;
      best_k = k;
    }
  }
  return best_k;
}

void test_against_brute_force(std::mt19937& rng, int64_t N, int64_t K, int64_t D, bool cosine,
                              bool transposed, const char* isa) {
  std::normal_distribution<float> normal;
  std::vector<float> z(static_cast<size_t>(N * D)), cb(static_cast<size_t>(K * D));
  for (auto& v : z) v = normal(rng);
  for (auto& v : cb) v = normal(rng);
  imgtx::CodebookLookupParams p;
  p.z = z.data();
  p.batch = 1;
  p.rows = N;
  p.dim = D;
  p.z_stride_row = transposed ? 1 : D;  // transposed: z stored (D, N)
  p.z_stride_dim = transposed ? N : 1;
  p.codebook = cb.data();
  p.num_codes = K;
  p.cb_stride_code = D;
  p.metric = cosine ? imgtx::CodebookMetric::kCosine : imgtx::CodebookMetric::kL2;
  std::vector<int64_t> idx(static_cast<size_t>(N), -1), counts(static_cast<size_t>(K), 0);
  std::vector<float> q(static_cast<size_t>(N * D)), sq(static_cast<size_t>(N));
  p.indices = idx.data();
  p.quantized = q.data();
  p.sqdist = sq.data();
  p.counts = counts.data();
  imgtx::codebook_lookup_cpu(p, 2);
  int wrong = 0, bad_q = 0;
  int64_t total = 0;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t want = brute_force(z, n * p.z_stride_row, p.z_stride_dim, cb, K, D, cosine);
    wrong += idx[size_t(n)] != want;
    if (!cosine)
      for (int64_t d = 0; d < D; ++d) bad_q += q[size_t(n * D + d)] != cb[size_t(want * D + d)];
  }
  for (auto c : counts) total += c;
  char what[160];
  std::snprintf(what, sizeof what, "%s N=%lld K=%lld D=%lld %s%s: %d wrong indices, %d bad q",
                isa, (long long)N, (long long)K, (long long)D, cosine ? "cosine" : "l2",
                transposed ? " transposed" : "", wrong, bad_q);
  check(wrong == 0 && bad_q == 0 && total == N, what);
}

void test_half_inputs(const char* isa) {
  // fp16 z (0x3C00 = 1.0, 0x4000 = 2.0) against an fp32 codebook {0.9, 2.2, -1}: 1 -> 0, 2 -> 1
  const uint16_t z[2] = {0x3C00, 0x4000};
  const float cb[3] = {0.9f, 2.2f, -1.0f};
  imgtx::CodebookLookupParams p;
  p.z = z;
  p.z_dtype = imgtx::DType::kFloat16;
  p.batch = 1;
  p.rows = 2;
  p.dim = 1;
  p.z_stride_row = 1;
  p.codebook = cb;
  p.num_codes = 3;
  p.cb_stride_code = 1;
  int64_t idx[2] = {-1, -1};
  uint16_t q[2] = {0, 0};
  p.indices = idx;
  p.quantized = q;
  imgtx::codebook_lookup_cpu(p, 1);
  // quantized is written in z's dtype: 0.9 -> 0x3B33, 2.2 -> 0x4066 (round to nearest even)
  check(idx[0] == 0 && idx[1] == 1 && q[0] == 0x3B33 && q[1] == 0x4066,
        std::string(isa) + " fp16 z / fp32 codebook");
}

void test_bad_arguments() {
  imgtx::CodebookLookupParams p;
  float z = 0.0f, cb = 0.0f;
  int64_t idx = 0;
  p.z = &z;
  p.codebook = &cb;
  p.indices = &idx;
  p.batch = p.rows = p.dim = 1;
  p.num_codes = 0;
  bool threw = false;
  try {
    imgtx::codebook_lookup_cpu(p, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "K = 0 throws std::invalid_argument");
  p.num_codes = 1;
  p.dim = 0;
  threw = false;
  try {
    imgtx::codebook_lookup_cpu(p, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "D = 0 throws std::invalid_argument");
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  imgtx_test::for_each_cpu_isa([&](const std::string& name) {
    const char* isa = name.c_str();
    for (bool cosine : {false, true}) {
      test_against_brute_force(rng, 1, 1, 1, cosine, false, isa);
      test_against_brute_force(rng, 13, 37, 5, cosine, false, isa);
      test_against_brute_force(rng, 100, 70, 130, cosine, true, isa);
      test_against_brute_force(rng, 777, 333, 64, cosine, false, isa);
    }
    test_half_inputs(isa);
  });
  test_bad_arguments();
  run_diffusion_tests();
  run_attention_tests();
  run_thread_pool_tests();
  run_cache_line_tests();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed ? 1 : 0;
}
