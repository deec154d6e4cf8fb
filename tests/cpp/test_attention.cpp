// C++ tests of the attention core against a naive float64 implementation of the spec's
// visibility rules (written independently of attention_plan.cpp), on every compiled ISA.
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/attention_plan_device.h"
#include "check.h"
#include "common/cpu_features.h"
#include "imgtx/attention.h"

using imgtx_test::check;

namespace {

struct Case {
  std::string name;
  int64_t B, H, Hkv, Nq, Nk, D, Dv;
  imgtx::AttnPattern pattern;
  bool causal = false;
  bool key_lengths = false;
};

bool visible(const Case& c, int64_t b, int64_t i, int64_t j, const std::vector<int64_t>& len) {
  if (c.key_lengths && j >= len[size_t(b)]) return false;
  const int64_t p = i + c.Nk - c.Nq;
  if (c.causal && j > p) return false;
  const imgtx::AttnPattern& t = c.pattern;
  if (t.kind == imgtx::AttnPatternKind::kLocal1d) {
    const int64_t L = t.block, blk = p / L;
    if (t.causal) return j <= p && j >= blk * L - L;
    return j >= blk * L - t.filter_width && j < (blk + 1) * L + t.filter_width;
  }
  if (t.kind == imgtx::AttnPatternKind::kLocal2d) {
    const int64_t W = t.width, r = p / W, col = p % W, rk = j / W, ck = j % W;
    const int64_t r0 = r / t.query_h * t.query_h, c0 = col / t.query_w * t.query_w;
    if (!t.causal)
      return rk >= r0 - t.flange_h && rk < r0 + t.query_h + t.flange_h &&
             ck >= c0 - t.flange_w && ck < c0 + t.query_w + t.flange_w;
    const bool top = rk >= r0 - t.flange_h && rk < r0 && ck >= c0 - t.flange_w &&
                     ck < c0 + t.query_w + t.flange_w;
    const bool rows = rk >= r0 && rk < r0 + t.query_h;
    const bool left = rows && ck >= c0 - t.flange_w && ck < c0;
    const bool center = rows && ck >= c0 && ck < c0 + t.query_w &&
                        (rk - r0) * t.query_w + (ck - c0) <= (r - r0) * t.query_w + (col - c0);
    return top || left || center;
  }
  return true;
}

void run_case(const Case& c, std::mt19937& rng, const std::string& isa) {
  std::normal_distribution<float> nd;
  std::vector<float> q(size_t(c.B * c.H * c.Nq * c.D)), k(size_t(c.B * c.Hkv * c.Nk * c.D)),
      v(size_t(c.B * c.Hkv * c.Nk * c.Dv)), go(size_t(c.B * c.H * c.Nq * c.Dv));
  for (auto* vec : {&q, &k, &v, &go})
    for (float& x : *vec) x = nd(rng);
  std::vector<int64_t> len(size_t(c.B));
  for (int64_t b = 0; b < c.B; ++b) len[size_t(b)] = int64_t(rng() % uint32_t(c.Nk + 1));
  const float scale = 1.0f / std::sqrt(float(c.D));
  const auto tensor = [](const std::vector<float>& x, int64_t H, int64_t N, int64_t D) {
    return imgtx::AttnTensor{x.data(), imgtx::DType::kFloat32, H * N * D, N * D, D};
  };
  imgtx::AttnForwardParams p;
  p.batch = c.B; p.heads = c.H; p.kv_heads = c.Hkv; p.q_len = c.Nq; p.k_len = c.Nk;
  p.head_dim = c.D; p.v_dim = c.Dv;
  p.q = tensor(q, c.H, c.Nq, c.D);
  p.k = tensor(k, c.Hkv, c.Nk, c.D);
  p.v = tensor(v, c.Hkv, c.Nk, c.Dv);
  p.scale = scale;
  p.causal = c.causal;
  p.causal_offset = c.Nk - c.Nq;
  p.key_lengths = c.key_lengths ? len.data() : nullptr;
  p.pattern = c.pattern;
  std::vector<float> out(go.size()), lse(size_t(c.B * c.H * c.Nq));
  p.out = {out.data(), imgtx::DType::kFloat32, c.H * c.Nq * c.Dv, c.Nq * c.Dv, c.Dv};
  p.lse = lse.data();
  imgtx::attention_forward_cpu(p, 2);

  imgtx::AttnBackwardParams g;
  static_cast<imgtx::AttnParams&>(g) = p;
  g.out = tensor(out, c.H, c.Nq, c.Dv);
  g.grad_out = tensor(go, c.H, c.Nq, c.Dv);
  g.lse = lse.data();
  std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
  g.grad_q = {dq.data(), imgtx::DType::kFloat32, c.H * c.Nq * c.D, c.Nq * c.D, c.D};
  g.grad_k = {dk.data(), imgtx::DType::kFloat32, c.Hkv * c.Nk * c.D, c.Nk * c.D, c.D};
  g.grad_v = {dv.data(), imgtx::DType::kFloat32, c.Hkv * c.Nk * c.Dv, c.Nk * c.Dv, c.Dv};
  imgtx::attention_backward_cpu(g, 2);

  // Naive float64 forward and backward.
  double err_o = 0, err_l = 0, err_g = 0;
  std::vector<double> rdk(k.size(), 0.0), rdv(v.size(), 0.0);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t gh = h / (c.H / c.Hkv);
      for (int64_t i = 0; i < c.Nq; ++i) {
        const float* qi = &q[size_t(((b * c.H + h) * c.Nq + i) * c.D)];
        std::vector<double> s(size_t(c.Nk), -INFINITY);
        double m = -INFINITY;
        for (int64_t j = 0; j < c.Nk; ++j) {
          if (!visible(c, b, i, j, len)) continue;
          const float* kj = &k[size_t(((b * c.Hkv + gh) * c.Nk + j) * c.D)];
          double dot = 0;
          for (int64_t d = 0; d < c.D; ++d) dot += double(qi[d]) * kj[d];
          s[size_t(j)] = dot * scale;
          m = std::max(m, s[size_t(j)]);
        }
        double l = 0;
        for (int64_t j = 0; j < c.Nk; ++j) l += std::isinf(s[size_t(j)]) ? 0.0 : std::exp(s[size_t(j)] - m);
        const size_t orow = size_t(((b * c.H + h) * c.Nq + i) * c.Dv);
        std::vector<double> o(size_t(c.Dv), 0.0), pr(size_t(c.Nk), 0.0);
        for (int64_t j = 0; j < c.Nk; ++j) {
          if (l == 0 || std::isinf(s[size_t(j)])) continue;
          pr[size_t(j)] = std::exp(s[size_t(j)] - m) / l;
          const float* vj = &v[size_t(((b * c.Hkv + gh) * c.Nk + j) * c.Dv)];
          for (int64_t d = 0; d < c.Dv; ++d) o[size_t(d)] += pr[size_t(j)] * vj[d];
        }
        for (int64_t d = 0; d < c.Dv; ++d)
          err_o = std::max(err_o, std::fabs(o[size_t(d)] - out[orow + size_t(d)]));
        const double rl = l == 0 ? double(imgtx::kLseEmpty) : m + std::log(l);
        err_l = std::max(err_l, std::fabs(rl - lse[size_t((b * c.H + h) * c.Nq + i)]) /
                                    std::max(1.0, std::fabs(rl)));
        // dP, dS, dQ, dK, dV for this row.
        double delta = 0;
        for (int64_t d = 0; d < c.Dv; ++d) delta += double(go[orow + size_t(d)]) * o[size_t(d)];
        std::vector<double> rdq(size_t(c.D), 0.0);
        for (int64_t j = 0; j < c.Nk; ++j) {
          if (pr[size_t(j)] == 0) continue;
          const size_t kr = size_t(((b * c.Hkv + gh) * c.Nk + j));
          double dpj = 0;
          for (int64_t d = 0; d < c.Dv; ++d) {
            dpj += double(go[orow + size_t(d)]) * v[kr * size_t(c.Dv) + size_t(d)];
            rdv[kr * size_t(c.Dv) + size_t(d)] += pr[size_t(j)] * go[orow + size_t(d)];
          }
          const double ds = pr[size_t(j)] * (dpj - delta);
          for (int64_t d = 0; d < c.D; ++d) {
            rdq[size_t(d)] += scale * ds * k[kr * size_t(c.D) + size_t(d)];
            rdk[kr * size_t(c.D) + size_t(d)] += scale * ds * qi[d];
          }
        }
        for (int64_t d = 0; d < c.D; ++d)
          err_g = std::max(err_g, std::fabs(rdq[size_t(d)] -
                                            dq[size_t(((b * c.H + h) * c.Nq + i) * c.D + d)]));
      }
    }
  for (size_t x = 0; x < k.size(); ++x) err_g = std::max(err_g, std::fabs(rdk[x] - dk[x]));
  for (size_t x = 0; x < v.size(); ++x) err_g = std::max(err_g, std::fabs(rdv[x] - dv[x]));
  check(err_o < 2e-5, isa + " " + c.name + ": forward output (err " + std::to_string(err_o) + ")");
  check(err_l < 2e-5, isa + " " + c.name + ": log-sum-exp (err " + std::to_string(err_l) + ")");
  check(err_g < 1e-4 * std::sqrt(double(c.Nk)),
        isa + " " + c.name + ": gradients (err " + std::to_string(err_g) + ")");
}

imgtx::AttnParams plan_params(const Case& c, const std::vector<int64_t>& len) {
  imgtx::AttnParams p;
  p.batch = c.B; p.heads = c.H; p.kv_heads = c.Hkv; p.q_len = c.Nq; p.k_len = c.Nk;
  p.head_dim = c.D; p.v_dim = c.Dv;
  p.causal = c.causal;
  p.causal_offset = c.Nk - c.Nq;
  p.key_lengths = c.key_lengths ? len.data() : nullptr;
  p.pattern = c.pattern;
  return p;
}

// The CUDA kernels' plan (attention_plan_device.h), evaluated on the CPU: every query row in
// exactly one tile, no key twice in a tile, and the visible (query, key) pairs exactly the spec's.
void test_device_plan(const Case& c, std::mt19937& rng, int64_t tile_rows) {
  using namespace imgtx::attn_cuda;
  std::vector<int64_t> len(size_t(c.B));
  for (int64_t b = 0; b < c.B; ++b) len[size_t(b)] = int64_t(rng() % uint32_t(c.Nk + 1));
  const imgtx::AttnParams p = plan_params(c, len);
  const DevPlan P = make_plan(p, tile_rows);
  bool ok = true;
  for (int64_t b = 0; b < c.B && ok; ++b) {
    std::vector<int> seen(size_t(c.Nq), 0);
    std::vector<char> vis(size_t(c.Nq * c.Nk), 0);
    for (int64_t t = 0; t < P.tiles; ++t) {
      Tile T;
      if (!make_tile(P, t, b, T)) continue;
      std::vector<int64_t> rows(size_t(T.n));
      std::vector<int> qpos(size_t(T.n));
      for (int k = 0; k < T.n; ++k) {
        tile_row(P, T, k, rows[size_t(k)], qpos[size_t(k)]);
        if (rows[size_t(k)] < 0 || rows[size_t(k)] >= c.Nq) { ok = false; break; }
        ++seen[size_t(rows[size_t(k)])];
      }
      std::vector<char> key_seen(size_t(c.Nk), 0);
      const int64_t total = total_keys(P, T);
      for (int64_t d = 0; d < total && ok; ++d) {
        int row = -1, kpos = 0;
        key_at(P, T, 0, 0, d, row, kpos);
        if (row < 0 || row >= c.Nk || key_seen[size_t(row)]++) { ok = false; break; }
        for (int k = 0; k < T.n; ++k)
          if (kpos == kPlainKey || kpos <= qpos[size_t(k)])
            vis[size_t(rows[size_t(k)] * c.Nk + row)] = 1;
      }
    }
    for (int64_t i = 0; i < c.Nq && ok; ++i) {
      ok = seen[size_t(i)] == 1;
      for (int64_t j = 0; j < c.Nk && ok; ++j)
        ok = (vis[size_t(i * c.Nk + j)] != 0) == visible(c, b, i, j, len);
    }
  }
  check(ok, "device plan (tile rows " + std::to_string(tile_rows) + "): " + c.name);
}

void test_bad_arguments() {
  imgtx::AttnForwardParams p;
  p.batch = 1; p.heads = 3; p.kv_heads = 2; p.q_len = 4; p.k_len = 4; p.head_dim = 8; p.v_dim = 8;
  bool threw = false;
  try { imgtx::validate(p); } catch (const std::invalid_argument&) { threw = true; }
  check(threw, "kv heads not dividing heads throws std::invalid_argument");
  p.kv_heads = 3; p.head_dim = 300; threw = false;
  try { imgtx::validate(p); } catch (const std::invalid_argument&) { threw = true; }
  check(threw, "head dim > 256 throws std::invalid_argument");
}

}  // namespace

void run_attention_tests() {
  using imgtx::AttnPatternKind;
  std::mt19937 rng(7);
  std::vector<Case> cases;
  cases.push_back({"dense", 2, 3, 3, 45, 70, 40, 24, {}, false, false});
  cases.push_back({"causal gqa kv-cache", 1, 4, 2, 37, 100, 64, 64, {}, true, true});
  cases.push_back({"decode mqa", 2, 4, 1, 1, 300, 16, 16, {}, true, false});
  imgtx::AttnPattern l1;
  l1.kind = AttnPatternKind::kLocal1d; l1.block = 16; l1.causal = true;
  cases.push_back({"local1d causal", 1, 2, 2, 70, 70, 32, 32, l1, false, true});
  l1.causal = false; l1.filter_width = 5;
  cases.push_back({"local1d window", 1, 2, 1, 70, 70, 17, 17, l1, false, false});
  imgtx::AttnPattern l2;
  l2.kind = AttnPatternKind::kLocal2d; l2.height = 9; l2.width = 11; l2.query_h = 4;
  l2.query_w = 5; l2.flange_h = 2; l2.flange_w = 3; l2.causal = true;
  cases.push_back({"local2d causal", 1, 2, 2, 99, 99, 32, 32, l2, false, false});
  cases.push_back({"local2d decode", 1, 2, 2, 3, 60, 32, 32, l2, false, false});
  l2.causal = false;
  cases.push_back({"local2d window", 2, 1, 1, 99, 99, 80, 80, l2, false, false});
  imgtx_test::for_each_cpu_isa([&](const std::string& name) {
    for (const Case& c : cases) run_case(c, rng, name);
  });
  // The CUDA plan on odd geometries: KV-cache offsets that are not multiples of the block,
  // partial image tiles, tiles larger than a CTA (chunks), 1-pixel images, flange 0.
  std::vector<Case> plans = cases;
  imgtx::AttnPattern a = l1;
  a.causal = true; a.filter_width = 0; a.block = 7;
  plans.push_back({"local1d block 7 kv-cache", 2, 1, 1, 19, 40, 8, 8, a, false, true});
  a.block = 100;
  plans.push_back({"local1d block 100", 1, 1, 1, 250, 250, 8, 8, a, false, true});
  imgtx::AttnPattern b2 = l2;
  b2.causal = true; b2.height = 20; b2.width = 20; b2.query_h = 16; b2.query_w = 16;
  b2.flange_h = 0; b2.flange_w = 5;
  plans.push_back({"local2d 16x16 tiles, chunks", 1, 1, 1, 400, 400, 8, 8, b2, false, true});
  plans.push_back({"local2d decode chunk", 1, 1, 1, 5, 237, 8, 8, b2, false, false});
  b2.causal = false;
  plans.push_back({"local2d window 16x16", 1, 1, 1, 400, 400, 8, 8, b2, false, true});
  b2.height = 1; b2.width = 1; b2.causal = true;
  plans.push_back({"local2d 1 pixel", 1, 1, 1, 1, 1, 8, 8, b2, false, false});
  plans.push_back({"dense causal cross", 2, 1, 1, 70, 30, 8, 8, {}, true, true});
  for (const Case& c : plans)
    for (int64_t rows : {64, 4, 3}) test_device_plan(c, rng, rows);
  test_bad_arguments();
}
