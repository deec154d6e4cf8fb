// C++ tests of the mask-and-replace core (imgtx/diffusion.h), no Python or torch: Philox
// known-answer vectors, the posterior's closed form against Bayes' rule with explicit
// transition matrices, sampled frequencies, q_sample, and bad arguments, on every CPU path.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "common/cpu_features.h"
#include "common/philox.h"
#include "common/simd.h"
#include "imgtx/dtype.h"
#include "imgtx/diffusion.h"

using imgtx_test::check;

namespace {

// The schedule of MaskAndReplaceSchedule (python) at K classes, T steps; rows per t.
struct Schedule {
  int64_t K, T;
  std::vector<double> A, C;  // cumulative, t = 0..T-1
  double Acum(int64_t t) const { return t < 0 ? 1.0 : A[size_t(t)]; }
  double Ccum(int64_t t) const { return t < 0 ? 0.0 : C[size_t(t)]; }
  double Bcum(int64_t t) const { return (1.0 - Acum(t) - Ccum(t)) / double(K); }
  Schedule(int64_t K_, int64_t T_, double a0, double a1, double c0, double c1) : K(K_), T(T_) {
    for (int64_t t = 0; t < T; ++t) {
      const double f = double(t) / double(T - 1);
      A.push_back(a0 + f * (a1 - a0));
      C.push_back(c0 + f * (c1 - c0));
    }
  }
  std::vector<double> row(int64_t t) const {
    const double a = Acum(t) / Acum(t - 1), c = 1.0 - (1.0 - Ccum(t)) / (1.0 - Ccum(t - 1));
    return {a,       (1.0 - a - c) / double(K), c,          Acum(t),        Bcum(t),
            Ccum(t), Acum(t - 1),               Bcum(t - 1), Ccum(t - 1), t == 0 ? 1.0 : 0.0};
  }
  // q(x_t = j | x_{t-1} = i) (one step) or q(x_t = j | x_0 = i) (cumulative), MASK = K.
  double q(int64_t t, bool cumulative, int64_t i, int64_t j) const {
    if (i == K) return j == K ? 1.0 : 0.0;
    const std::vector<double> r = row(t);
    const double a = cumulative ? r[3] : r[0], b = cumulative ? r[4] : r[1];
    const double c = cumulative ? r[5] : r[2];
    return j == K ? c : (i == j ? a + b : b);
  }
  double q_prev_cum(int64_t t, int64_t x0, int64_t j) const {  // q(x_{t-1} = j | x0)
    if (t == 0) return j == x0 ? 1.0 : 0.0;
    return q(t - 1, true, x0, j);
  }
};

// p(x_{t-1} | x_t) by Bayes' rule over x0, normalised, (K+1) entries.
std::vector<double> bayes(const Schedule& s, const std::vector<double>& p, int64_t x_t, int64_t t) {
  const int64_t K = s.K;
  std::vector<double> out(size_t(K + 1), 0.0);
  for (int64_t x0 = 0; x0 < K; ++x0) {
    if (t == 0) {
      out[size_t(x0)] += p[size_t(x0)];
      continue;
    }
    const double qt = s.q(t, true, x0, x_t);
    if (qt == 0.0) continue;
    for (int64_t j = 0; j <= K; ++j)
      out[size_t(j)] += p[size_t(x0)] * s.q(t, false, j, x_t) * s.q_prev_cum(t, x0, j) / qt;
  }
  double z = 0.0;
  for (double v : out) z += v;
  for (double& v : out) v /= z;
  return out;
}

void test_philox_known_answers() {
  // Random123's kat_vectors for philox4x32_10.
  const imgtx::Philox4 a = imgtx::philox4x32_10(0, 0, 0, 0, 0, 0);
  check(a.v[0] == 0x6627e8d5u && a.v[1] == 0xe169c58du && a.v[2] == 0xbc57ac4cu &&
            a.v[3] == 0x9b00dbd8u,
        "philox4x32_10 known answer (zero counter and key)");
  const imgtx::Philox4 b = imgtx::philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  check(b.v[0] == 0x408f276du && b.v[1] == 0x41c83b0eu && b.v[2] == 0xa20bc7c6u &&
            b.v[3] == 0x6d5451fdu,
        "philox4x32_10 known answer (all-ones counter and key)");
  const imgtx::Philox4 c = imgtx::philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu,
                                                0x03707344u, 0xa4093822u, 0x299f31d0u);
  check(c.v[0] == 0xd16cfe09u && c.v[1] == 0x94fdccebu && c.v[2] == 0x5001e420u &&
            c.v[3] == 0x24126ea1u,
        "philox4x32_10 known answer (pi digits)");
}

// log_probs of the kernel against Bayes for every x_t and t, class- and token-contiguous.
void test_posterior_vs_bayes(std::mt19937& rng, const std::string& isa) {
  const int64_t K = 5, T = 6, N = 40;  // N >= 16: the token-parallel path runs too
  const Schedule s(K, T, 0.9, 0.2, 0.02, 0.5);
  std::normal_distribution<float> normal(0.f, 2.f);
  for (int layout = 0; layout < 2; ++layout) {
    std::vector<float> logits(static_cast<size_t>(K * N));
    for (float& v : logits) v = normal(rng);
    const bool class_contig = layout == 0;
    auto at = [&](int64_t j, int64_t n) { return class_contig ? n * K + j : j * N + n; };
    std::vector<int64_t> x_t(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) x_t[size_t(n)] = n % (K + 1);
    double worst = 0.0;
    for (int64_t t = 0; t < T; ++t) {
      const std::vector<double> coefs = s.row(t);
      std::vector<float> out(static_cast<size_t>((K + 1) * N));
      imgtx::MrPosteriorParams p;
      p.batch = 1;
      p.num_classes = K;
      p.tokens = N;
      p.logp.data = logits.data();
      p.logp.stride_class = class_contig ? 1 : N;
      p.logp.stride_token = class_contig ? K : 1;
      p.x_t.data = x_t.data();
      p.x_t.stride_token = 1;
      p.coefs = coefs.data();
      p.log_probs = out.data();
      p.out_stride_class = N;
      p.out_stride_token = 1;
      check(imgtx::mr_posterior_cpu(p, 2) == imgtx::kMrOk, "posterior status ok");
      for (int64_t n = 0; n < N; ++n) {
        std::vector<double> pr(static_cast<size_t>(K));
        for (int64_t j = 0; j < K; ++j) pr[size_t(j)] = std::exp(double(logits[size_t(at(j, n))]));
        const std::vector<double> want = bayes(s, pr, x_t[size_t(n)], t);
        double tv = 0.0;
        for (int64_t j = 0; j <= K; ++j)
          tv += std::fabs(std::exp(double(out[size_t(j * N + n)])) - want[size_t(j)]);
        worst = std::fmax(worst, tv / 2);
      }
    }
    check(worst < 1e-6, "posterior log-probs vs Bayes (" + isa + ", layout " +
                            std::to_string(layout) + "): TV " + std::to_string(worst));
  }
}

// Frequencies of 200k draws (one distribution, stride-0 tokens) within 5 sigma of Bayes.
void test_sampling_frequencies(std::mt19937& rng, const std::string& isa) {
  const int64_t K = 4, T = 5, N = 200000;
  const Schedule s(K, T, 0.9, 0.2, 0.02, 0.5);
  std::vector<float> logits = {0.3f, -1.0f, 1.2f, 0.0f};
  const int64_t seed = int64_t(rng());
  for (int64_t x : {int64_t(1), K}) {
    for (int64_t t : {int64_t(0), int64_t(3)}) {
      const std::vector<double> coefs = s.row(t);
      std::vector<int64_t> out(static_cast<size_t>(N));
      imgtx::MrPosteriorParams p;
      p.batch = 1;
      p.num_classes = K;
      p.tokens = N;
      p.logp.data = logits.data();
      p.logp.stride_class = 1;
      p.logp.stride_token = 0;
      p.x_t.data = &x;
      p.x_t.stride_token = 0;
      p.coefs = coefs.data();
      p.x_prev = out.data();
      p.seed = &seed;
      check(imgtx::mr_posterior_cpu(p, 2) == imgtx::kMrOk, "sampling status ok");
      std::vector<double> pr(static_cast<size_t>(K));
      for (int64_t j = 0; j < K; ++j) pr[size_t(j)] = std::exp(double(logits[size_t(j)]));
      const std::vector<double> want = bayes(s, pr, x, t);
      std::vector<double> count(size_t(K + 1), 0.0);
      bool in_range = true;
      for (int64_t v : out) {
        in_range &= v >= 0 && v <= K;
        if (v >= 0 && v <= K) count[size_t(v)] += 1.0;
      }
      bool ok = in_range;
      for (int64_t j = 0; j <= K; ++j) {
        const double pj = want[size_t(j)], sd = std::sqrt(double(N) * pj * (1 - pj)) + 1e-9;
        ok &= std::fabs(count[size_t(j)] - double(N) * pj) <= 5 * sd + 1e-9;
      }
      check(ok, "sampled frequencies within 5 sigma (" + isa + ", x_t " + std::to_string(x) +
                    ", t " + std::to_string(t) + ")");
    }
  }
}

void test_q_sample() {
  const int64_t K = 3, N = 100000;
  const Schedule s(K, 4, 0.9, 0.2, 0.02, 0.5);
  const std::vector<double> coefs = s.row(2);
  const int64_t x0 = 1, seed = 7;
  std::vector<int64_t> out(static_cast<size_t>(N));
  imgtx::MrQSampleParams p;
  p.batch = 1;
  p.num_classes = K;
  p.tokens = N;
  p.x0.data = &x0;
  p.coefs = coefs.data();
  p.seed = &seed;
  p.x_t = out.data();
  check(imgtx::mr_q_sample_cpu(p, 2) == imgtx::kMrOk, "q_sample status ok");
  std::vector<double> count(size_t(K + 1), 0.0);
  for (int64_t v : out) count[size_t(v)] += 1.0;
  bool ok = true;
  for (int64_t j = 0; j <= K; ++j) {
    const double pj = s.q(2, true, x0, j), sd = std::sqrt(double(N) * pj * (1 - pj));
    ok &= std::fabs(count[size_t(j)] - double(N) * pj) <= 5 * sd;
  }
  check(ok, "q_sample frequencies within 5 sigma");
}

// The vector fp16/bf16 -> float widenings against the scalar ones, for all 65536 patterns.
template <int W>
void test_half_widening() {
  bool f16_ok = true, bf16_ok = true;
  for (uint32_t base = 0; base < 65536; base += W) {
    uint16_t h[W];
    for (int i = 0; i < W; ++i) h[i] = uint16_t(base + uint32_t(i));
    const typename imgtx::simd::Vec<W>::F a = imgtx::simd::load_f16<W>(h);
    const typename imgtx::simd::Vec<W>::F b = imgtx::simd::load_bf16<W>(h);
    for (int i = 0; i < W; ++i) {
      const float fa = a[i], fb = b[i];
      const float wa = imgtx::half_bits_to_float(h[i]), wb = imgtx::bf16_bits_to_float(h[i]);
      uint32_t xa, xb, ya, yb;
      std::memcpy(&xa, &fa, 4);
      std::memcpy(&ya, &wa, 4);
      std::memcpy(&xb, &fb, 4);
      std::memcpy(&yb, &wb, 4);
      f16_ok &= xa == ya;
      bf16_ok &= xb == yb;
    }
  }
  check(f16_ok, "simd::load_f16<" + std::to_string(W) + "> bit-exact for every fp16 pattern");
  check(bf16_ok, "simd::load_bf16<" + std::to_string(W) + "> bit-exact for every bf16 pattern");
}

void test_bad_arguments() {
  imgtx::MrPosteriorParams p;
  p.batch = 1;
  p.tokens = 1;
  p.num_classes = 0;
  bool threw = false;
  try {
    imgtx::validate(p);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "num_classes = 0 throws std::invalid_argument");
  p.num_classes = 4;
  float logit = 0.f;
  int64_t x = 0;
  const double coefs[imgtx::kMrCoefs] = {};
  p.logp.data = &logit;
  p.x_t.data = &x;
  p.coefs = coefs;
  threw = false;
  try {
    imgtx::validate(p);  // neither x_prev nor log_probs
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  check(threw, "no output throws std::invalid_argument");
}

}  // namespace

void run_diffusion_tests() {
  std::mt19937 rng(99);
  test_philox_known_answers();
  imgtx_test::for_each_cpu_isa([&](const std::string& name) {
    test_posterior_vs_bayes(rng, name);
    test_sampling_frequencies(rng, name);
  });
  test_q_sample();
  test_half_widening<8>();
  test_half_widening<16>();
  test_bad_arguments();
}
