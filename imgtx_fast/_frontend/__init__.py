"""The framework-free front ends' shared body: the ops on arrays, over a small runtime.

imgtx_fast.numpy and imgtx_fast.cupy each build one ArrayOps over their runtime, an object with:
  framework, xp          'numpy' / 'cupy' and the array module
  host                   True when array values may be read for checks without a device sync
  is_array(x)            whether x is (or converts without a copy to) one of its arrays
  array(x, name, op)     x as its array (numpy/cupy arrays as they are; array-interface or
                         DLPack objects converted without a copy); TypeError naming x otherwise
  device(a)              'cpu' / 'cuda:N', for same-device checks and messages
  on_device(device)      context manager in which outputs are allocated and kernels launched
  ptr(a)                 the address of a's first element
  seed(key)              the (1,) int64 Philox key array the sampling kernels read
  table(sched)           the schedule's float64 table on the current device
  codebook_lookup(args, sizes), attention_forward(args), mr_posterior(args) -> status,
  mr_q_sample(args) -> status: the _C calls with their thread count or stream appended.
Nothing here imports torch; the checks and messages are the torch ops' (the argument is named,
TypeError for a wrong type or dtype, ValueError for a wrong shape, device or value).
"""
from typing import Optional

from . import attention as _attention
from . import codebook as _codebook
from . import diffusion as _diffusion
from .codebook import CodebookLookup
from .schedule import MaskAndReplaceSchedule

__all__ = ["ArrayOps", "CodebookLookup", "MaskAndReplaceSchedule"]


class ArrayOps:
    """The public ops of a front end, bound to its runtime."""

    def __init__(self, runtime):
        self._rt = runtime

    def codebook_lookup(self, z, codebook, *, metric: str = "l2", return_stats: bool = False):
        """Nearest code for every vector of z (..., D) in codebook (K, D).

        Returns (indices, quantized); with return_stats=True a CodebookLookup named tuple that
        also holds sqdist (float32 |z - quantized|^2 per vector) and counts (int64 usage per
        code). metric='cosine' compares directions and returns unit codes. Same kernel and
        results as imgtx_fast.codebook_lookup (exact float64 argmin, lowest index on ties).
        """
        return _codebook.codebook_lookup(self._rt, z, codebook, metric, return_stats)

    def attention(self, q, k, v, *, causal: bool = False, key_lengths=None, attn_mask=None,
                  pattern=None, scale: Optional[float] = None, return_lse: bool = False):
        """softmax(scale * q k^T + mask) v, fused; q (B, H, Nq, D), k/v (B, Hkv, Nk, D[v]).

        causal:      query i sees keys j <= i + Nk - Nq (bottom-right aligned).
        key_lengths: (B,) int32/int64; keys j >= key_lengths[b] are padding.
        attn_mask:   bool (True = visible) or additive float, broadcastable to (B, H, Nq, Nk).
        pattern:     imgtx_fast.Local1d / Local2d (Image Transformer local attention).
        Returns out (B, H, Nq, Dv) in q's dtype, laid out (B, Nq, H, Dv) in memory like the torch
        op; with return_lse=True also the float32 log-sum-exp (B, H, Nq). A query that sees no
        key outputs zeros. Forward only: there is no autograd outside torch.
        """
        return _attention.attention(self._rt, q, k, v, causal, key_lengths, attn_mask, pattern,
                                    scale, return_lse)

    def posterior_sample(self, log_p_x0, x_t, t, sched, generator=None, *,
                         truncation_rate: Optional[float] = None,
                         guidance_scale: Optional[float] = None, log_p_x0_uncond=None,
                         logits: bool = False):
        """x_{t-1} ~ p(x_{t-1} | x_t) for every token: (B, N) int64 in [0, K] (K = MASK).

        log_p_x0 (B, K, N) float, any strides; x_t (B, N) integers; t an int or a (B,) integer
        array; sched a MaskAndReplaceSchedule (this module's, or imgtx_fast.diffusion's).
        generator: None (numpy's global generator), a numpy.random.Generator / RandomState, or
        an int, the kernel's Philox key itself; see imgtx_fast._frontend.common.philox_key.
        Guidance (l_u + s (l_c - l_u)) and top-r truncation are fused as in the torch API.
        """
        return _diffusion.posterior(self._rt, log_p_x0, x_t, t, sched, generator,
                                    truncation_rate, guidance_scale, log_p_x0_uncond, True)

    def posterior_log_probs(self, log_p_x0, x_t, t, sched, *,
                            truncation_rate: Optional[float] = None,
                            guidance_scale: Optional[float] = None, log_p_x0_uncond=None,
                            logits: bool = False):
        """log p(x_{t-1} | x_t), normalised over the K+1 classes: (B, K+1, N) float32 (laid out
        class-contiguous when log_p_x0 is). Impossible classes are -inf."""
        return _diffusion.posterior(self._rt, log_p_x0, x_t, t, sched, None, truncation_rate,
                                    guidance_scale, log_p_x0_uncond, False)

    def q_sample(self, x0, t, sched, generator=None):
        """x_t ~ q(x_t | x0): MASK w.p. C_t, x0 w.p. A_t + B_t, each other class w.p. B_t.
        generator as for posterior_sample."""
        return _diffusion.q_sample(self._rt, x0, t, sched, generator)
