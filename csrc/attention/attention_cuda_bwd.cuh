// The CUDA attention backward, templated on head dim D and T = __half or __nv_bfloat16; one
// explicit instantiation per file in cuda/bwd_hdim*_*.cu.
//
// CTA = one query tile of the forward's block-sparse plan (64 rows, 4 warps x 16 rows) of one
// (batch, query head); it visits exactly the key blocks the forward visits. This is the
// "query-major" variant of FlashAttention-2's backward: dQ accumulates in registers and is
// written once (a query row belongs to one CTA), while dK/dV are accumulated with fp32 atomics
// into workspace buffers (they sum over query tiles and over the query heads of a kv head),
// converted to the output dtype by attn_convert_kernel. Chosen because it reuses the plan of
// every pattern unchanged (a key-major CTA would need the inverse plan: which query tiles see
// a key block, non-trivial for Local2d) and needs no dQ workspace pass.
//
// Per key block (gathered rows, double-buffered, cp.async), per warp (16 query rows):
//   S = Q K^T, P = exp2(S * scale * log2e - lse * log2e) (masks on partial blocks),
//   dP = dO V^T, dS = P (dP - Delta) with Delta = rowsum(dO * O) - grad_lse,
//   dQ += dS K (registers; K via ldmatrix.trans);
// then P and dS (T) go to shared memory and each warp owns 16 keys of the block:
//   dV[keys] += P^T dO, dK[keys] += scale dS^T Q   (ldmatrix.trans of P / dS, atomics).
// Shared memory: Q, dO [64][D+8], K, V [2][64][D+8], P, dS [64][72] (T), indices, lse, Delta.
// D = 128: 122 KB, one CTA per SM.
#pragma once

#include "attention/attention_cuda_common.cuh"
#include "common/cuda_check.h"

namespace imgtx {
namespace attn_cuda {

template <int D, class T>
__global__ void __launch_bounds__(kThreads) attn_bwd_kernel(const BwdArgs a) {
  static_assert(D % 16 == 0 && D <= 128, "head dim");
  constexpr int LD = D + 8;
  constexpr int PLD = kBN + 8;
  constexpr int KT = D / 16;
  constexpr int NT = D / 8;
  typedef TypeOps<T> Ops;
  IMGTX_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sDO = sQ + kBM * LD;
  T* sK = sDO + kBM * LD;
  T* sV = sK + 2 * kBN * LD;
  T* sP = sV + 2 * kBN * LD;
  T* sDS = sP + kBM * PLD;
  int* sKeyRow = reinterpret_cast<int*>(sDS + kBM * PLD);  // [2][kBN]
  int* sKeyPos = sKeyRow + 2 * kBN;
  int* sRowI = sKeyPos + 2 * kBN;  // [kBM]
  int* sRowQ = sRowI + kBM;
  float* sLse = reinterpret_cast<float*>(sRowQ + kBM);  // log2 domain; +inf: P = 0
  float* sDelta = sLse + kBM;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const DevPlan& P = a.plan;
  int64_t idx = blockIdx.x;
  const int64_t t = P.tiles - 1 - idx % P.tiles;
  idx /= P.tiles;
  const int64_t h = idx % a.heads, b = idx / a.heads, kvh = h / a.group;
  Tile tl;
  if (!make_tile(P, t, b, tl)) return;
  const int R = tl.n;

  fill_rows(P, tl, R, h, sRowI, nullptr, sRowQ);
  __syncthreads();

  const bool aligned = a.aligned != 0;
  load_tile_pair<D>(sQ, a.q.data, sDO, a.dout.data, kBM, [&](int r, int64_t& oq, int64_t& odo) {
    const int64_t i = r < R ? sRowI[r] : 0;
    oq = b * a.q.sb + h * a.q.sh + i * a.q.sr;
    odo = b * a.dout.sb + h * a.dout.sh + i * a.dout.sr;
    return r < R;
  }, aligned);
  cp_async_commit();

  // lse and Delta = rowsum(dO * O) - grad_lse: two threads per row.
  {
    const int r = tid / 2, half = tid % 2;
    float sum = 0.f;
    if (r < R) {
      const int64_t i = sRowI[r];
      const int64_t ob = b * a.out.sb + h * a.out.sh + i * a.out.sr;
      const int64_t db = b * a.dout.sb + h * a.dout.sh + i * a.dout.sr;
      for (int d = half * (D / 2); d < (half + 1) * (D / 2); ++d)
        sum += Ops::load(a.out.data, ob + d) * Ops::load(a.dout.data, db + d);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (half == 0) {
      if (r < R) {
        const int64_t row = (b * a.heads + h) * P.nq + sRowI[r];
        const float lse = a.lse[row];
        sLse[r] = lse == kLseEmpty ? INFINITY : lse * kLog2e;
        sDelta[r] = sum - (a.dlse ? a.dlse[row] : 0.f);
      } else {
        sLse[r] = INFINITY;
        sDelta[r] = 0.f;
      }
    }
  }
  __syncthreads();  // sLse / sDelta

  const int64_t nb = (total_keys(P, tl) + kBN - 1) / kBN;
  int cs = 0;
  int64_t co = 0;
  const bool has_mask = a.mask.kind != int(AttnMaskKind::kNone);
  const int64_t kbase = b * a.k.sb + kvh * a.k.sh, vbase = b * a.v.sb + kvh * a.v.sh;
  auto issue_kv = [&](int buf) {
    load_kv_block<D>(sK + buf * kBN * LD, sV + buf * kBN * LD, sKeyRow + buf * kBN, a.k, a.v,
                     kbase, vbase, aligned);
  };
  bool skip_cur = true, mask_cur = true, skip_nxt = true, mask_nxt = true;
  if (nb > 0) {
    fill_block(P, tl, cs, co, sKeyRow, sKeyPos, has_mask, skip_cur, mask_cur);
    advance(P, tl, cs, co, kBN);
    if (!skip_cur) issue_kv(0);
  }
  cp_async_commit();

  const int lr0 = warp * 16 + g;
  int qpos[2];
  int64_t mrow[2];
  bool rvalid[2];
  float lse2[2], delta[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int r = lr0 + 8 * rr;
    qpos[rr] = sRowQ[r];
    rvalid[rr] = r < R;
    mrow[rr] = rvalid[rr] ? b * a.mask.sb + h * a.mask.sh + int64_t(sRowI[r]) * a.mask.sq : 0;
    lse2[rr] = sLse[r];
    delta[rr] = sDelta[r];
  }
  const int64_t acc_base = (b * a.kv_heads + kvh) * P.nk;

  float dq[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
  const float ninf = -INFINITY;

  for (int64_t n = 0; n < nb; ++n) {
    const int buf = int(n & 1);
    if (n + 1 < nb) {
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
      const int* krow = sKeyRow + buf * kBN;
      const int* kpos = sKeyPos + buf * kBN;
      float s[8][4], dp[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
      // S = Q K^T and dP = dO V^T.
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        uint32_t qa[4], da[4];
        const int arow = (warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + kk * 16 + 8 * (lane / 16);
        ldsm_x4(qa, sQ + arow);
        ldsm_x4(da, sDO + arow);
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
          const int brow = (16 * jp + (lane % 8) + 8 * (lane / 16)) * LD + kk * 16 + 8 * ((lane / 8) % 2);
          uint32_t bf[4];
          ldsm_x4(bf, k + brow);
          Ops::mma(s[2 * jp], qa, bf[0], bf[1]);
          Ops::mma(s[2 * jp + 1], qa, bf[2], bf[3]);
          ldsm_x4(bf, v + brow);
          Ops::mma(dp[2 * jp], da, bf[0], bf[1]);
          Ops::mma(dp[2 * jp + 1], da, bf[2], bf[3]);
        }
      }
      // P and dS.
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rr = e >> 1;
          float x = s[j][e] * a.scale_log2;
          if (mask_cur) {
            const int key = 8 * j + 2 * tq + (e & 1);
            const int jr = krow[key], kp = kpos[key];
            bool vis = jr >= 0 && (kp == kPlainKey || kp <= qpos[rr]);
            if (vis && has_mask && rvalid[rr]) vis = apply_user_mask(a.mask, mrow[rr], jr, x);
            x = vis ? x : ninf;
          }
          const float pr = exp2f(x - lse2[rr]);
          s[j][e] = pr;
          dp[j][e] = pr * (dp[j][e] - delta[rr]);
        }
      // P, dS -> shared (for the key-major products below).
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int off = (lr0 + 8 * rr) * PLD + 8 * j + 2 * tq;
          *reinterpret_cast<uint32_t*>(sP + off) = Ops::pack(s[j][2 * rr], s[j][2 * rr + 1]);
          *reinterpret_cast<uint32_t*>(sDS + off) = Ops::pack(dp[j][2 * rr], dp[j][2 * rr + 1]);
        }
      // dQ += dS K.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t pa[4];
        pa[0] = Ops::pack(dp[2 * kk][0], dp[2 * kk][1]);
        pa[1] = Ops::pack(dp[2 * kk][2], dp[2 * kk][3]);
        pa[2] = Ops::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
        pa[3] = Ops::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
          uint32_t bf[4];
          ldsm_x4_t(bf, k + (16 * kk + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + 16 * dn + 8 * (lane / 16));
          Ops::mma(dq[2 * dn], pa, bf[0], bf[1]);
          Ops::mma(dq[2 * dn + 1], pa, bf[2], bf[3]);
        }
      }
      __syncthreads();  // P and dS of every warp in shared memory

      // This warp's 16 keys: dV += P^T dO, then dK += scale dS^T Q.
      const int kr[2] = {krow[16 * warp + g], krow[16 * warp + g + 8]};
#pragma unroll
      for (int which = 0; which < 2; ++which) {
        const T* src = which == 0 ? sP : sDS;
        const T* rhs = which == 0 ? sDO : sQ;
        float* accg = which == 0 ? a.dv_acc : a.dk_acc;
        const float mul = which == 0 ? 1.f : a.scale;
        float acc[NT][4];
#pragma unroll
        for (int dn = 0; dn < NT; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
          uint32_t pa[4];
          ldsm_x4_t(pa, src + (16 * ks + (lane % 8) + 8 * (lane / 16)) * PLD + 16 * warp + 8 * ((lane / 8) % 2));
#pragma unroll
          for (int dn = 0; dn < D / 16; ++dn) {
            uint32_t bf[4];
            ldsm_x4_t(bf, rhs + (16 * ks + (lane % 8) + 8 * ((lane / 8) % 2)) * LD + 16 * dn + 8 * (lane / 16));
            Ops::mma(acc[2 * dn], pa, bf[0], bf[1]);
            Ops::mma(acc[2 * dn + 1], pa, bf[2], bf[3]);
          }
        }
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          if (kr[rr] < 0) continue;
          float* dst = accg + (acc_base + kr[rr]) * D + 2 * tq;
#pragma unroll
          for (int dn = 0; dn < NT; ++dn) {
            atomicAdd(dst + 8 * dn, acc[dn][2 * rr] * mul);
            atomicAdd(dst + 8 * dn + 1, acc[dn][2 * rr + 1] * mul);
          }
        }
      }
    }
    __syncthreads();
    skip_cur = skip_nxt;
    mask_cur = mask_nxt;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    if (!rvalid[rr]) continue;
    const int64_t i = sRowI[lr0 + 8 * rr];
    const int64_t ob = b * a.dq.sb + h * a.dq.sh + i * a.dq.sr + 2 * tq;
#pragma unroll
    for (int dn = 0; dn < NT; ++dn) {
      Ops::store(a.dq.data, ob + 8 * dn, dq[dn][2 * rr] * a.scale);
      Ops::store(a.dq.data, ob + 8 * dn + 1, dq[dn][2 * rr + 1] * a.scale);
    }
  }
}

template <int D, class T>
void launch_bwd(const BwdArgs& a, int64_t ctas, cudaStream_t stream) {
  constexpr int smem = bwd_smem_bytes<D>();
  auto kernel = attn_bwd_kernel<D, T>;
  IMGTX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  IMGTX_LAUNCH(dim3(unsigned(ctas)), kThreads, smem, stream, attn_bwd_kernel<D, T>)(a);
  check_last_launch("attention attn_bwd_kernel");
}

}  // namespace attn_cuda
}  // namespace imgtx
