// The block-sparse plan in a form CUDA kernels can evaluate per CTA without memory: which
// query rows a tile holds and which key segments it visits. It MIRRORS attention_plan.cpp (the
// CPU plan; keep the two in sync). Plain C++ with IMGTX_HD functions, so that the C++ tests
// (tests/cpp/test_attention.cpp) check it on the CPU against the spec's visibility rules.
//
// One difference of representation: a Local1d causal tile's "previous block" + "own block"
// segments, and a Local2d causal row's "left flange" + "own tile" segments, are contiguous in
// key rows and are merged here into one segment whose keys at rows >= `cf` are causal
// (kpos = kb + row - cf) and plain before. That visits the same keys in the same order with
// the same visibility rule: key j is visible to query q iff kpos == kPlainKey || kpos <= qpos.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/host_device.h"
#include "imgtx/attention.h"

namespace imgtx {
namespace attn_cuda {

constexpr int kPlainKey = INT_MIN;  // kpos of a key every query of the tile sees

inline int64_t plan_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- plan ---------------------------------------------------------------------------------
struct DevPlan {
  int kind = 0;          // AttnPatternKind
  int causal = 0;        // dense: AttnParams::causal
  int pcausal = 0;       // pattern's own causality
  int64_t nq = 0, nk = 0, offset = 0, causal_offset = 0;  // offset = k_len - q_len
  int64_t L = 0, fw1 = 0;                                // Local1d block, filter width
  int64_t H = 0, W = 0, qh = 0, qw = 0, fh = 0, fw = 0;  // Local2d
  int64_t tile_rows = 0;   // max query rows of a tile (set by make_plan)
  int64_t tiles = 0;
  int64_t blo = 0, slots = 0;            // Local1d: first query block, tiles per block
  int64_t trlo = 0, ntc = 0, subs = 0;   // Local2d: first tile row, tile columns, chunks/tile
  const int64_t* key_lengths = nullptr;  // device pointer or null
};

struct Tile {
  int n = 0;                  // query rows
  int64_t a = 0;              // dense/1d: first query row
  int64_t bs = 0;             // 1d: start position of the query block
  int64_t r0 = 0, c0 = 0, e0 = 0, tw = 0, rlo = 0;  // 2d
  int qmin = 0, qmax = 0;     // positions of the first and last row (they increase)
  int64_t kend = 0;           // keys clipped at key_lengths[b]
  int nseg = 0;
};

struct Seg {
  int64_t start, end;  // key rows [start, end), end may be <= start (empty)
  int64_t cf;          // rows >= cf are causal
  int64_t kb;          // kpos of row cf
};

IMGTX_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
IMGTX_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
IMGTX_HD int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Query row and position of row k of the tile (mirrors AttnPlan::query_rows).
IMGTX_HD void tile_row(const DevPlan& P, const Tile& T, int k, int64_t& i,
                                         int& qpos) {
  if (P.kind != int(AttnPatternKind::kLocal2d)) {
    i = T.a + k;
    const int64_t pos =
        i + (P.kind == int(AttnPatternKind::kDense) ? P.causal_offset : P.offset);
    qpos = int(clamp64(pos, -1, P.nk));
    return;
  }
  const int64_t e = T.e0 + k, r = T.r0 + e / T.tw, c = T.c0 + e % T.tw;
  i = r * P.W + c - P.offset;
  qpos = int((r - T.r0) * P.qw + (c - T.c0));
}

// Number of pixels of a 2d tile whose position is < x.
IMGTX_HD int64_t pixels_below(const DevPlan& P, int64_t r0, int64_t c0,
                                                int64_t th, int64_t tw, int64_t x) {
  int64_t n = 0;
  for (int64_t rr = 0; rr < th; ++rr) n += clamp64(x - ((r0 + rr) * P.W + c0), 0, tw);
  return n;
}

// Tile t of batch b (mirrors the AttnPlan constructor and AttnPlan::tile). Returns false for
// an empty tile (the grid is a superset of the CPU plan's tiles).
IMGTX_HD bool make_tile(const DevPlan& P, int64_t t, int64_t b, Tile& T) {
  const int64_t R = P.tile_rows;
  if (P.kind == int(AttnPatternKind::kLocal2d)) {
    const int64_t per = P.ntc * P.subs;
    const int64_t tr = P.trlo + t / per, rem = t % per;
    T.r0 = tr * P.qh;
    T.c0 = (rem / P.subs) * P.qw;
    const int64_t sub = rem % P.subs;
    const int64_t th = min64(P.qh, P.H - T.r0);
    T.tw = min64(P.qw, P.W - T.c0);
    if (th <= 0 || T.tw <= 0) return false;
    const int64_t lo = pixels_below(P, T.r0, T.c0, th, T.tw, P.offset);
    const int64_t hi = pixels_below(P, T.r0, T.c0, th, T.tw, P.offset + P.nq);
    T.e0 = lo + sub * R;
    const int64_t n = min64(hi, T.e0 + R) - T.e0;
    if (n <= 0) return false;
    T.n = int(n);
  } else if (P.kind == int(AttnPatternKind::kLocal1d)) {
    const int64_t bi = P.blo + t / P.slots, s = t % P.slots;
    T.bs = bi * P.L;
    const int64_t start = max64(T.bs, P.offset), end = min64(T.bs + P.L, P.offset + P.nq);
    const int64_t p0 = start + s * R;
    const int64_t n = min64(p0 + R, end) - p0;
    if (n <= 0) return false;
    T.n = int(n);
    T.a = p0 - P.offset;
  } else {
    T.a = t * R;
    const int64_t n = min64(R, P.nq - T.a);
    if (n <= 0) return false;
    T.n = int(n);
  }
  int64_t i;
  tile_row(P, T, 0, i, T.qmin);
  tile_row(P, T, T.n - 1, i, T.qmax);
  T.kend = P.key_lengths ? min64(P.key_lengths[b], P.nk) : P.nk;
  if (P.kind == int(AttnPatternKind::kLocal2d)) {
    T.rlo = max64(T.r0 - P.fh, 0);
    const int64_t rhi = P.pcausal ? min64(T.r0 + P.qh, P.H) : min64(T.r0 + P.qh + P.fh, P.H);
    T.nseg = int(rhi - T.rlo);
  } else {
    T.nseg = 1;
  }
  return true;
}

// Segment s of the tile, clipped to [0, kend) (mirrors the `add` calls of AttnPlan::tile).
IMGTX_HD Seg get_seg(const DevPlan& P, const Tile& T, int s) {
  constexpr int64_t kNever = INT64_MAX;
  Seg g;
  g.cf = kNever;
  g.kb = 0;
  if (P.kind == int(AttnPatternKind::kDense)) {
    g.start = 0;
    g.end = P.causal ? min64(int64_t(T.qmax) + 1, T.kend) : T.kend;
    if (P.causal) g.cf = 0;
  } else if (P.kind == int(AttnPatternKind::kLocal1d)) {
    if (P.pcausal) {
      g.start = max64(T.bs - P.L, 0);
      g.end = min64(T.a + T.n + P.offset, T.kend);  // last query position + 1
      g.cf = T.bs;
      g.kb = T.bs;
    } else {
      g.start = max64(T.bs - P.fw1, 0);
      g.end = min64(T.bs + P.L + P.fw1, T.kend);
    }
  } else {
    const int64_t r = T.rlo + s;
    const int64_t cl = max64(T.c0 - P.fw, 0);
    const int64_t cr = min64(T.c0 + P.qw + P.fw, P.W);
    g.start = r * P.W + cl;
    if (P.pcausal && r >= T.r0) {  // left flange (plain) then own tile row (causal)
      g.end = r * P.W + min64(T.c0 + P.qw, P.W);
      g.cf = r * P.W + T.c0;
      g.kb = (r - T.r0) * P.qw;
    } else {
      g.end = r * P.W + cr;
    }
    g.end = min64(g.end, T.kend);
  }
  return g;
}

IMGTX_HD int64_t seg_len(const Seg& g) {
  return g.end > g.start ? g.end - g.start : 0;
}

// Moves the cursor (s, off) forward by d keys over the concatenated segments. Returns whether
// the cursor still points at a key.
IMGTX_HD bool advance(const DevPlan& P, const Tile& T, int& s, int64_t& off,
                               int64_t d) {
  while (s < T.nseg) {
    const int64_t len = seg_len(get_seg(P, T, s));
    if (off + d < len) {
      off += d;
      return true;
    }
    d -= len - off;
    ++s;
    off = 0;
  }
  return false;
}

IMGTX_HD int64_t total_keys(const DevPlan& P, const Tile& T) {
  int64_t n = 0;
  for (int s = 0; s < T.nseg; ++s) n += seg_len(get_seg(P, T, s));
  return n;
}

// Key at cursor (s, off) + d: its row (or -1 past the end) and kpos.
IMGTX_HD void key_at(const DevPlan& P, const Tile& T, int s, int64_t off,
                                       int64_t d, int& row, int& kpos) {
  row = -1;
  kpos = kPlainKey;
  if (!advance(P, T, s, off, d)) return;
  const Seg g = get_seg(P, T, s);
  const int64_t j = g.start + off;
  row = int(j);
  if (j >= g.cf) kpos = int(g.kb + (j - g.cf));
}

// Mirrors the AttnPlan constructor (attention_plan.cpp): the number of tiles and the numbers
// make_tile needs. The grid may contain empty tiles (make_tile returns false for them).
inline DevPlan make_plan(const AttnParams& p, int64_t tile_rows) {
  DevPlan P;
  const AttnPattern& pat = p.pattern;
  P.kind = int(pat.kind);
  P.causal = p.causal ? 1 : 0;
  P.pcausal = pat.causal ? 1 : 0;
  P.nq = p.q_len;
  P.nk = p.k_len;
  P.offset = p.k_len - p.q_len;
  P.causal_offset = p.causal_offset;
  P.tile_rows = tile_rows;
  P.key_lengths = p.key_lengths;
  switch (pat.kind) {
    case AttnPatternKind::kDense: P.tiles = plan_ceil_div(p.q_len, tile_rows); break;
    case AttnPatternKind::kLocal1d: {
      P.L = pat.block;
      P.fw1 = pat.filter_width;
      P.blo = P.offset / P.L;
      const int64_t bhi = (P.offset + P.nq - 1) / P.L;
      P.slots = plan_ceil_div(std::min(P.L, P.nq), tile_rows);
      P.tiles = (bhi - P.blo + 1) * P.slots;
      break;
    }
    case AttnPatternKind::kLocal2d: {
      P.H = pat.height;
      P.W = pat.width;
      P.qh = pat.query_h;
      P.qw = pat.query_w;
      P.fh = pat.flange_h;
      P.fw = pat.flange_w;
      const int64_t row_lo = P.offset / P.W, row_hi = (P.offset + P.nq - 1) / P.W;
      P.trlo = row_lo / P.qh;
      const int64_t trhi = std::min(row_hi, P.H - 1) / P.qh;
      P.ntc = plan_ceil_div(P.W, P.qw);
      // A tile holds at most min(its pixels, q_len) queries (the CPU loops while s * rows < count).
      P.subs = plan_ceil_div(std::min(std::min(P.qh, P.H) * std::min(P.qw, P.W), P.nq), tile_rows);
      P.tiles = (trhi - P.trlo + 1) * P.ntc * P.subs;
      break;
    }
  }
  return P;
}

}  // namespace attn_cuda
}  // namespace imgtx
