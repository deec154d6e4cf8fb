// Which keys each query tile visits: the block-sparse plan shared by every attention kernel.
//
// A plan cuts the queries into tiles; each tile lists its queries (rows, in an order where the
// causal rule is a plain comparison of positions) and the key segments it may see. Keys of a
// segment are contiguous rows [start, start + len). In a "causal" segment key start + t has
// position kpos0 + t and is visible to a query iff kpos <= that query's qpos; a plain segment
// is visible to every query of the tile. Kernels chunk the concatenated segments into key
// blocks, skip blocks no query can see and mask only blocks that are partly visible, so work
// is proportional to the visible pairs. key_lengths clip segments, so padding costs nothing.
#pragma once

#include <cstdint>
#include <vector>

#include "common/cache_line.h"
#include "imgtx/attention.h"

namespace imgtx {
namespace attn {

struct KeySegment {
  int64_t start = 0, len = 0;
  bool causal = false;
  int64_t kpos0 = 0;
};

struct QueryTile {  // kernels keep one per worker: its storage has its own cache lines
  LineVector<int64_t> rows;  // query rows i
  LineVector<int32_t> qpos;  // their positions for causal segments
  LineVector<KeySegment> segments;
};

class AttnPlan {
 public:
  explicit AttnPlan(const AttnParams& p, int64_t max_tile_rows);
  int64_t num_tiles() const { return int64_t(tiles_.size()); }
  int64_t max_rows() const { return max_rows_; }
  // Fills `out` for tile t of batch b (key_lengths depend on b).
  void tile(int64_t t, int64_t b, QueryTile& out) const;

 private:
  struct Desc {
    int64_t a = 0, b = 0;  // dense/1d: rows [a, b); 2d: tile origin (r0, c0)
    int64_t sub = 0;       // 2d: which chunk of the image tile's pixels
  };
  void query_rows(const Desc& d, QueryTile& out) const;
  const AttnParams& p_;
  int64_t offset_;  // query position = row + offset_ (k_len - q_len)
  int64_t max_tile_rows_, max_rows_ = 0;
  std::vector<Desc> tiles_;
};

}  // namespace attn
}  // namespace imgtx
