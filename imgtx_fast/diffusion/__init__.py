"""Mask-and-replace discrete diffusion (VQ-Diffusion) on fused kernels.

    from imgtx_fast.diffusion import MaskAndReplaceSchedule, q_sample, posterior_sample
    sched = MaskAndReplaceSchedule(num_classes=K, num_timesteps=100)
    x_prev = posterior_sample(log_p_x0, x_t, t, sched, truncation_rate=0.86)
"""
from .loss import TimestepSampler, vb_loss, vb_terms
from .sampling import posterior_log_probs, posterior_sample, q_sample
from .schedule import MaskAndReplaceSchedule

__all__ = ["MaskAndReplaceSchedule", "TimestepSampler", "posterior_log_probs", "posterior_sample",
           "q_sample", "vb_loss", "vb_terms"]
