// The CUDA attention forward (FlashAttention-2 style), templated on head dim D and T = __half
// or __nv_bfloat16; one explicit instantiation per file in cuda/fwd_hdim*_*.cu.
//
// CTA = one query tile of the block-sparse plan (attention_cuda_common.cuh, mirroring
// attention_plan.cpp) for one (batch, head chunk): up to kBM = 64 query rows, 4 warps x 16 rows.
// Normally a head chunk is one query head. In decode mode (q_len <= 4) a chunk packs `hpack`
// query heads of one kv head (GQA/MQA: all of them read the same keys) so the CTA's 64 rows are
// mostly real, and the key blocks are split over `splits` CTAs (flash-decoding) that write
// partial (m, l, o) to the workspace for attn_combine_kernel (attention_cuda.cu).
//
// Per key block of kBN = 64 keys (gathered rows, double-buffered, cp.async):
//   S = Q K^T (mma m16n8k16, fp32 acc; Q fragments kept in registers), scale * log2(e) folded
//   into one multiply so the softmax uses exp2f; masks (causal positions / padding keys / user
//   mask) only on blocks the fill step flags as partial; online softmax per row in registers
//   (the 4 lanes of a quad share a row); O += P V with P re-packed from the S accumulators
//   (no shared-memory round trip) and V fragments via ldmatrix.trans.
// Shared memory: Q [64][D+8], K [2][64][D+8], V [2][64][D+8] (T), key rows/positions [2][64],
// row info [64]. The +8 element pad makes ldmatrix rows hit distinct banks for every D in
// {32, 64, 96, 128}. D = 128: 88.8 KB (2 CTAs per SM on A100/H100).
#pragma once

#include "attention/attention_cuda_common.cuh"
#include "common/cuda_check.h"

namespace imgtx {
namespace attn_cuda {

template <int D, class T>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(const FwdArgs a) {
  static_assert(D % 16 == 0 && D <= 128, "head dim");
  constexpr int LD = D + 8;
  constexpr int KT = D / 16;  // k16 steps over the head dim
  constexpr int NT = D / 8;   // n8 tiles of the output
  typedef TypeOps<T> Ops;
  IMGTX_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kBM * LD;
  T* sV = sK + 2 * kBN * LD;
  int* sKeyRow = reinterpret_cast<int*>(sV + 2 * kBN * LD);  // [2][kBN]
  int* sKeyPos = sKeyRow + 2 * kBN;                            // [2][kBN]
  int* sRowI = sKeyPos + 2 * kBN;                              // [kBM]
  int* sRowH = sRowI + kBM;
  int* sRowQ = sRowH + kBM;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const DevPlan& P = a.plan;

  // CTA -> (batch, head chunk, tile, split); heavy (late) tiles first.
  int64_t idx = blockIdx.x;
  const int split = int(idx % a.splits);
  idx /= a.splits;
  const int64_t t = P.tiles - 1 - idx % P.tiles;
  idx /= P.tiles;
  const int64_t chunks = a.kv_heads * a.cpg;
  const int64_t hc = idx % chunks, b = idx / chunks;
  const int64_t kvh = hc / a.cpg;
  const int64_t h0 = kvh * a.group + (hc % a.cpg) * a.hpack;
  const int nh = int(min64(a.hpack, a.group - (hc % a.cpg) * a.hpack));
  Tile tl;
  if (!make_tile(P, t, b, tl)) return;  // uniform
  const int R = nh * tl.n;              // <= kBM (host guarantees hpack * tile_rows <= kBM)

  fill_rows(P, tl, R, h0, sRowI, sRowH, sRowQ);
  __syncthreads();

  // Q tile -> shared (group 0).
  const bool aligned = a.aligned != 0;
  load_tile<D>(sQ, kBM, a.q.data, [&](int r) {
    return r < R ? b * a.q.sb + int64_t(sRowH[r]) * a.q.sh + int64_t(sRowI[r]) * a.q.sr : int64_t(-1);
  }, aligned);
  cp_async_commit();

  // Key blocks of this split.
  const int64_t nb = (total_keys(P, tl) + kBN - 1) / kBN;
  const int64_t n_begin = nb * split / a.splits, n_end = nb * (split + 1) / a.splits;
  int cs = 0;
  int64_t co = 0;
  advance(P, tl, cs, co, n_begin * kBN);
  const bool has_mask = a.mask.kind != int(AttnMaskKind::kNone);
  const int64_t kbase = b * a.k.sb + kvh * a.k.sh, vbase = b * a.v.sb + kvh * a.v.sh;

  auto issue_kv = [&](int buf) {
    load_kv_block<D>(sK + buf * kBN * LD, sV + buf * kBN * LD, sKeyRow + buf * kBN, a.k, a.v,
                     kbase, vbase, aligned);
  };

  bool skip_cur = true, mask_cur = true, skip_nxt = true, mask_nxt = true;
  if (n_begin < n_end) {
    fill_block(P, tl, cs, co, sKeyRow, sKeyPos, has_mask, skip_cur, mask_cur);
    advance(P, tl, cs, co, kBN);
    if (!skip_cur) issue_kv(0);
  }
  cp_async_commit();

  // Per-thread rows: lr[0] = 16 warp + g, lr[1] = lr[0] + 8.
  const int lr0 = warp * 16 + g;
  int qpos[2];
  bool rvalid[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    qpos[rr] = sRowQ[lr0 + 8 * rr];
    rvalid[rr] = lr0 + 8 * rr < R;
  }

  // Q fragments (registers) once the Q group has landed.
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[KT][4];
#pragma unroll
  for (int kk = 0; kk < KT; ++kk)
    ldsm_x4(qf[kk], sQ + (warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16));

  const float ninf = -INFINITY;
  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {ninf, ninf}, l[2] = {0.f, 0.f};

  for (int64_t n = n_begin; n < n_end; ++n) {
    const int buf = int((n - n_begin) & 1);
    if (n + 1 < n_end) {
      fill_block(P, tl, cs, co, sKeyRow + (buf ^ 1) * kBN, sKeyPos + (buf ^ 1) * kBN, has_mask,
                 skip_nxt, mask_nxt);
      advance(P, tl, cs, co, kBN);
      if (!skip_nxt) issue_kv(buf ^ 1);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    if (!skip_cur) {
      const T* k = sK + buf * kBN * LD;
      const T* v = sV + buf * kBN * LD;
      float s[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
          uint32_t bf[4];
          ldsm_x4(bf, k + (16 * jp + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 + 8 * ((lane / 8) % 2));
          Ops::mma(s[2 * jp], qf[kk], bf[0], bf[1]);
          Ops::mma(s[2 * jp + 1], qf[kk], bf[2], bf[3]);
        }
      }
      // Scale (log2 domain) and masks.
      const int* krow = sKeyRow + buf * kBN;
      const int* kpos = sKeyPos + buf * kBN;
      int64_t mrow[2] = {0, 0};  // element offset of the rows' mask rows (recomputed: fewer live registers)
      if (mask_cur && has_mask) {
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int r = lr0 + 8 * rr;
          if (rvalid[rr])
            mrow[rr] = b * a.mask.sb + int64_t(sRowH[r]) * a.mask.sh + int64_t(sRowI[r]) * a.mask.sq;
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[j][e] * a.scale_log2;
          if (mask_cur) {
            const int key = 8 * j + 2 * tq + (e & 1), rr = e >> 1;
            const int jr = krow[key], kp = kpos[key];
            bool vis = jr >= 0 && (kp == kPlainKey || kp <= qpos[rr]);
            if (vis && has_mask && rvalid[rr]) vis = apply_user_mask(a.mask, mrow[rr], jr, x);
            x = vis ? x : ninf;
          }
          s[j][e] = x;
        }
      // Online softmax.
      float alpha[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        float mx = m[rr];
#pragma unroll
        for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * rr], s[j][2 * rr + 1]));
        mx = quad_max(mx);
        const float use = mx == ninf ? 0.f : mx;  // no visible key yet: exp2(-inf - 0) = 0
        alpha[rr] = exp2f(m[rr] - use);
        m[rr] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          s[j][2 * rr] = exp2f(s[j][2 * rr] - use);
          s[j][2 * rr + 1] = exp2f(s[j][2 * rr + 1] - use);
          sum += s[j][2 * rr] + s[j][2 * rr + 1];
        }
        l[rr] = l[rr] * alpha[rr] + sum;  // per-lane partial sums; reduced over the quad at the end
      }
#pragma unroll
      for (int dn = 0; dn < NT; ++dn) {
        o[dn][0] *= alpha[0];
        o[dn][1] *= alpha[0];
        o[dn][2] *= alpha[1];
        o[dn][3] *= alpha[1];
      }
      // O += P V.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t pa[4];
        pa[0] = Ops::pack(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = Ops::pack(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bf[4];
          ldsm_x4_t(bf, v + (16 * kk + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + 16 * dp + 8 * (lane / 16));
          Ops::mma(o[2 * dp], pa, bf[0], bf[1]);
          Ops::mma(o[2 * dp + 1], pa, bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // buffers `buf` are refilled by the next iteration
    skip_cur = skip_nxt;
    mask_cur = mask_nxt;
  }
  cp_async_wait<0>();

  // Epilogue.
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float lsum = quad_sum(l[rr]);
    const int r = lr0 + 8 * rr;
    if (!rvalid[rr]) continue;
    const int64_t i = sRowI[r], h = sRowH[r];
    const int64_t qrow = (b * a.heads + h) * P.nq + i;
    if (a.partial) {
      float* part = a.partial + (qrow * a.splits + split) * (D + 2);
      if (tq == 0) {
        part[0] = m[rr];
        part[1] = lsum;
      }
#pragma unroll
      for (int dn = 0; dn < NT; ++dn) {
        part[2 + 8 * dn + 2 * tq] = o[dn][2 * rr];
        part[2 + 8 * dn + 2 * tq + 1] = o[dn][2 * rr + 1];
      }
      continue;
    }
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;  // no visible key: zeros
    const int64_t ob = b * a.out.sb + h * a.out.sh + i * a.out.sr;
#pragma unroll
    for (int dn = 0; dn < NT; ++dn) {
      Ops::store(a.out.data, ob + 8 * dn + 2 * tq, o[dn][2 * rr] * inv);
      Ops::store(a.out.data, ob + 8 * dn + 2 * tq + 1, o[dn][2 * rr + 1] * inv);
    }
    if (a.lse && tq == 0)
      a.lse[qrow] = lsum > 0.f ? m[rr] * kLn2 + logf(lsum) : (isnan(lsum) ? lsum : kLseEmpty);
  }
}

template <int D, class T>
void launch_fwd(const FwdArgs& a, int64_t ctas, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<D>();
  auto kernel = attn_fwd_kernel<D, T>;
  IMGTX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  IMGTX_LAUNCH(dim3(unsigned(ctas)), kThreads, smem, stream, attn_fwd_kernel<D, T>)(a);
  check_last_launch("attention attn_fwd_kernel");
}

}  // namespace attn_cuda
}  // namespace imgtx
