"""`imgtx-fast demo --kernels`: each fused kernel family timed against the plain-PyTorch way of
doing the same thing, on shapes of a real model."""
import time


def _median_time(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def codebook(n: int = 8192, k: int = 4096, d: int = 64) -> None:
    """Quantize a batch of VQ latents with the fused kernel and with torch.cdist + argmin."""
    import torch

    from imgtx_fast import codebook_lookup

    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(k, d, generator=g)
    z = codebook[torch.randint(0, k, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    out = codebook_lookup(z, codebook, return_stats=True)
    expected = torch.cdist(z, codebook).argmin(1)
    agree = (out.indices == expected).float().mean().item()
    ours = _median_time(lambda: codebook_lookup(z, codebook))
    theirs = _median_time(lambda: codebook[torch.cdist(z, codebook).argmin(1)])
    used = int((out.counts > 0).sum())
    print(f"VQ codebook lookup: {n} latents x {k} codes x dim {d}, {torch.get_num_threads()} threads")
    print(f"  imgtx_fast.codebook_lookup : {ours * 1e3:8.1f} ms  ({2 * n * k * d / ours / 1e9:.0f} GFLOP/s)")
    print(f"  torch.cdist + argmin       : {theirs * 1e3:8.1f} ms  -> {theirs / ours:.1f}x faster")
    print(f"  same indices as cdist on {agree * 100:.2f}% of rows; codes used {used}/{k}; "
          f"mean commitment |z-q|^2/D = {out.sqdist.mean().item() / d:.4f}")


def diffusion_step(b: int = 4, k: int = 4096, n: int = 1024) -> None:
    """One VQ-Diffusion reverse step (guidance + truncation + sampling) fused, against the same
    step written in plain PyTorch (float64 reference; diffusers' scheduler when installed)."""
    import torch

    from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_sample
    from imgtx_fast.reference import diffusion as ref

    g = torch.Generator().manual_seed(0)
    sched = MaskAndReplaceSchedule(k, 100)
    cond = (3 * torch.randn(b, k, n, generator=g)).log_softmax(1)
    uncond = (3 * torch.randn(b, k, n, generator=g)).log_softmax(1)
    x_t = torch.where(torch.rand(b, n, generator=g) < 0.5, k, torch.randint(0, k, (b, n), generator=g))
    kw = dict(truncation_rate=0.86, guidance_scale=5.0, log_p_x0_uncond=uncond)
    ours = _median_time(lambda: posterior_sample(cond, x_t, 50, sched, g, **kw))
    print(f"VQ-Diffusion reverse step: B={b}, K={k} codes, N={n} tokens, guidance 5, truncation 0.86")
    print(f"  imgtx_fast.diffusion.posterior_sample : {ours * 1e3:8.1f} ms (one fused pass per token)")
    try:
        from diffusers import VQDiffusionScheduler
    except ImportError:
        coefs = sched.coefs(50, b, "cpu")
        theirs = _median_time(lambda: ref.posterior_sample(cond, x_t, coefs, generator=g, log_p_uncond=uncond,
                                                           guidance_scale=5.0, truncation_rate=0.86), repeat=1)
        print(f"  plain PyTorch (float64 reference)     : {theirs * 1e3:8.1f} ms  -> {theirs / ours:.0f}x faster")
        return
    stock = VQDiffusionScheduler(num_vec_classes=k + 1)

    def peer():  # the pipeline's sequence (diffusers' own truncate lives on the pipeline class)
        mo = uncond + 5.0 * (cond - uncond)
        mo = mo - torch.logsumexp(mo, dim=1, keepdim=True)
        p = ref.truncate(mo.exp(), 0.86)
        mo = torch.where(p > 0, mo, torch.full_like(mo, -70.0))
        return stock.step(mo, 50, x_t, generator=g).prev_sample
    theirs = _median_time(peer, repeat=1)
    print(f"  diffusers VQDiffusionScheduler.step   : {theirs * 1e3:8.1f} ms  -> {theirs / ours:.0f}x faster "
          "(with guidance and truncation as tensor passes)")


def local_attention(b: int = 1, h: int = 8, n: int = 4096, d: int = 64) -> None:
    """Image Transformer local 1D attention (block 256) fused and block-sparse, against torch
    SDPA given the same pattern as a dense mask, and dense attention against SDPA."""
    import torch
    import torch.nn.functional as F

    from imgtx_fast import Local1d, attention
    from imgtx_fast.reference.attention import visible_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    pattern = Local1d(block=256)
    mask = visible_mask(n, n, pattern=pattern)
    err = (attention(q, k, v, pattern=pattern) - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max()
    ours = _median_time(lambda: attention(q, k, v, pattern=pattern))
    theirs = _median_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeat=1)
    print(f"Local 1D attention (block 256, causal): B={b}, H={h}, N={n}, D={d}")
    print(f"  imgtx_fast.attention(pattern=Local1d) : {ours * 1e3:8.1f} ms (visits only the visible key tiles)")
    print(f"  torch SDPA with the dense mask        : {theirs * 1e3:8.1f} ms  -> {theirs / ours:.1f}x faster; "
          f"max |difference| {err:.1e}")
    ours = _median_time(lambda: attention(q, k, v, causal=True))
    theirs = _median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"  causal dense: imgtx_fast {ours * 1e3:.1f} ms, torch SDPA {theirs * 1e3:.1f} ms")


def run() -> None:
    codebook()
    diffusion_step()
    local_attention()
