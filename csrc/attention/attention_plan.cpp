#include "attention/attention_plan.h"

#include <algorithm>

namespace imgtx {
namespace attn {

AttnPlan::AttnPlan(const AttnParams& p, int64_t max_tile_rows)
    : p_(p), offset_(p.k_len - p.q_len), max_tile_rows_(max_tile_rows) {
  const AttnPattern& pat = p.pattern;
  const int64_t nq = p.q_len;
  if (pat.kind == AttnPatternKind::kLocal2d) {
    // Image tiles in raster order of tiles; with a KV cache only the pixels that are queries.
    const int64_t H = pat.height, W = pat.width, qh = pat.query_h, qw = pat.query_w;
    const int64_t first = offset_, last = offset_ + nq;  // query positions [first, last)
    const int64_t row_lo = first / W, row_hi = (last - 1) / W;
    for (int64_t r0 = (row_lo / qh) * qh; r0 <= row_hi && r0 < H; r0 += qh) {
      for (int64_t c0 = 0; c0 < W; c0 += qw) {
        int64_t count = 0;
        for (int64_t r = r0; r < std::min(r0 + qh, H); ++r) {
          const int64_t lo = std::max(r * W + c0, first);
          const int64_t hi = std::min(r * W + std::min(c0 + qw, W), last);
          count += std::max<int64_t>(0, hi - lo);
        }
        for (int64_t s = 0; s * max_tile_rows_ < count; ++s) tiles_.push_back({r0, c0, s});
        max_rows_ = std::max(max_rows_, std::min(count, max_tile_rows_));
      }
    }
    return;
  }
  int64_t i = 0;
  while (i < nq) {
    int64_t end = std::min(nq, i + max_tile_rows_);
    if (pat.kind == AttnPatternKind::kLocal1d) {  // a tile never straddles two blocks
      const int64_t L = pat.block;
      const int64_t block = (i + offset_) / L;
      end = std::min(end, (block + 1) * L - offset_);
    }
    tiles_.push_back({i, end, 0});
    max_rows_ = std::max(max_rows_, end - i);
    i = end;
  }
}

void AttnPlan::query_rows(const Desc& d, QueryTile& out) const {
  out.rows.clear();
  out.qpos.clear();
  const AttnPattern& pat = p_.pattern;
  if (pat.kind != AttnPatternKind::kLocal2d) {
    for (int64_t i = d.a; i < d.b; ++i) {
      int64_t pos = i + (pat.kind == AttnPatternKind::kDense ? p_.causal_offset : offset_);
      pos = std::max<int64_t>(-1, std::min<int64_t>(pos, p_.k_len));  // fits int32
      out.rows.push_back(i);
      out.qpos.push_back(int32_t(pos));
    }
    return;
  }
  // Pixels of the tile in the tile's own raster order: qpos is the pixel's index in the tile.
  const int64_t H = pat.height, W = pat.width, qh = pat.query_h, qw = pat.query_w;
  const int64_t r0 = d.a, c0 = d.b;
  int64_t seen = 0;
  const int64_t skip = d.sub * max_tile_rows_;
  for (int64_t r = r0; r < std::min(r0 + qh, H); ++r) {
    for (int64_t c = c0; c < std::min(c0 + qw, W); ++c) {
      const int64_t i = r * W + c - offset_;
      if (i < 0 || i >= p_.q_len) continue;
      if (seen++ < skip) continue;
      if (int64_t(out.rows.size()) == max_tile_rows_) return;
      out.rows.push_back(i);
      out.qpos.push_back(int32_t((r - r0) * qw + (c - c0)));
    }
  }
}

void AttnPlan::tile(int64_t t, int64_t b, QueryTile& out) const {
  const Desc& d = tiles_[size_t(t)];
  query_rows(d, out);
  out.segments.clear();
  const int64_t kend = p_.key_lengths ? std::min(p_.key_lengths[b], p_.k_len) : p_.k_len;
  const auto add = [&](int64_t start, int64_t end, bool causal, int64_t kpos0) {
    const int64_t s = std::max<int64_t>(start, 0), e = std::min(end, kend);
    if (e > s) out.segments.push_back({s, e - s, causal, kpos0 + (s - start)});
  };
  const AttnPattern& pat = p_.pattern;
  switch (pat.kind) {
    case AttnPatternKind::kDense:
      if (!p_.causal) {
        add(0, kend, false, 0);
      } else if (!out.qpos.empty()) {
        add(0, int64_t(out.qpos.back()) + 1, true, 0);  // qpos increases along the tile
      }
      break;
    case AttnPatternKind::kLocal1d: {
      const int64_t L = pat.block;
      const int64_t block = (d.a + offset_) / L;
      if (pat.causal) {
        add(block * L - L, block * L, false, 0);
        add(block * L, d.b - 1 + offset_ + 1, true, block * L);
      } else {
        add(block * L - pat.filter_width, (block + 1) * L + pat.filter_width, false, 0);
      }
      break;
    }
    case AttnPatternKind::kLocal2d: {
      const int64_t H = pat.height, W = pat.width, qh = pat.query_h, qw = pat.query_w;
      const int64_t fh = pat.flange_h, fw = pat.flange_w;
      const int64_t r0 = d.a, c0 = d.b;
      const int64_t cl = std::max<int64_t>(c0 - fw, 0), cr = std::min(c0 + qw + fw, W);
      if (!pat.causal) {
        for (int64_t r = std::max<int64_t>(r0 - fh, 0); r < std::min(r0 + qh + fh, H); ++r)
          add(r * W + cl, r * W + cr, false, 0);
        break;
      }
      for (int64_t r = std::max<int64_t>(r0 - fh, 0); r < r0; ++r)
        add(r * W + cl, r * W + cr, false, 0);
      for (int64_t r = r0; r < std::min(r0 + qh, H); ++r) {
        add(r * W + cl, r * W + c0, false, 0);  // left flange
        add(r * W + c0, r * W + std::min(c0 + qw, W), true, (r - r0) * qw);  // own tile
      }
      break;
    }
  }
}

}  // namespace attn
}  // namespace imgtx
