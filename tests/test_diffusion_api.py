"""Mask-and-replace API: bad input gets a clear error naming the argument; torch integration
(opcheck, fake tensors, torch.compile) works."""
import pytest
import torch

from imgtx_fast.diffusion import (MaskAndReplaceSchedule, posterior_log_probs, posterior_sample,
                                  q_sample, vb_loss)
from imgtx_fast.diffusion.sampling import philox_seed

K, N, B, T = 6, 5, 2, 10


@pytest.fixture
def sched():
    return MaskAndReplaceSchedule(K, T)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, K, N, generator=g).log_softmax(1),
            torch.randint(0, K + 1, (B, N), generator=g), torch.randint(0, K, (B, N), generator=g))


@pytest.mark.parametrize("fn", ["sample", "log_probs"])
def test_posterior_bad_input(fn, sched):
    logp, x_t, _ = _inputs()
    f = posterior_sample if fn == "sample" else posterior_log_probs
    bad_xt = x_t.clone()
    bad_xt[1, 2] = K + 1
    with pytest.raises(ValueError, match=r"x_t has values outside \[0, 6\]"):
        f(logp, bad_xt, 3, sched)
    bad_xt[1, 2] = -1
    with pytest.raises(ValueError, match="x_t"):
        f(logp, bad_xt, 3, sched)
    with pytest.raises(ValueError, match=r"x_t must have shape \(2, 5\)"):
        f(logp, x_t[:, :4], 3, sched)
    with pytest.raises(TypeError, match="x_t must be an integer tensor"):
        f(logp, x_t.float(), 3, sched)
    with pytest.raises(ValueError, match=r"t must be in \[0, 10\)"):
        f(logp, x_t, 10, sched)
    with pytest.raises(ValueError, match=r"t must be in \[0, 10\)"):
        f(logp, x_t, torch.tensor([1, -1]), sched)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        f(logp, x_t, torch.tensor([1, 2, 3]), sched)
    with pytest.raises(TypeError, match="t must be an int"):
        f(logp, x_t, 1.5, sched)
    with pytest.raises(ValueError, match="K = 5 classes .* num_classes = 6"):
        f(logp[:, :5], x_t, 3, sched)
    with pytest.raises(ValueError, match=r"log_p_x0 must have shape \(B, K, N\)"):
        f(logp[0], x_t, 3, sched)
    with pytest.raises(TypeError, match="log_p_x0 must be float32, float16 or bfloat16"):
        f(logp.double(), x_t, 3, sched)
    nan = logp.clone()
    nan[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="log_p_x0 has a token whose values hold NaN"):
        f(nan, x_t, 3, sched)
    ninf = logp.clone()
    ninf[1, :, 3] = float("-inf")
    with pytest.raises(ValueError, match="all -inf"):
        f(ninf, x_t, 3, sched)
    for r in (-0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="truncation_rate must be in"):
            f(logp, x_t, 3, sched, truncation_rate=r)
    with pytest.raises(ValueError, match="guidance_scale and log_p_x0_uncond must be given together"):
        f(logp, x_t, 3, sched, guidance_scale=2.0)
    with pytest.raises(ValueError, match="log_p_x0_uncond must match"):
        f(logp, x_t, 3, sched, guidance_scale=2.0, log_p_x0_uncond=logp[:1])
    with pytest.raises(TypeError, match="sched must be a MaskAndReplaceSchedule"):
        f(logp, x_t, 3, None)
    with pytest.raises(TypeError, match="log_p_x0 must be a torch.Tensor"):
        f(logp.numpy(), x_t, 3, sched)


def test_q_sample_and_loss_bad_input(sched):
    logp, x_t, x0 = _inputs()
    bad = x0.clone()
    bad[0, 0] = K  # MASK is not a valid x0
    with pytest.raises(ValueError, match=r"x0 has values outside \[0, 6\)"):
        q_sample(bad, 3, sched)
    with pytest.raises(ValueError, match="x0 must have shape"):
        q_sample(x0[0], 3, sched)
    with pytest.raises(ValueError, match=r"x0 must be in \[0, 6\) and x_t in \[0, 6\]"):
        vb_loss(logp, bad, x_t, 3, sched)
    with pytest.raises(ValueError, match="logits has a token"):
        vb_loss(torch.full_like(logp, float("nan")), x0, x_t, 3, sched)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, K, N\)"):
        vb_loss(logp[0], x0, x_t, 3, sched)


def test_opcheck(sched):
    logp, x_t, x0 = _inputs()
    coefs = sched.coefs(torch.tensor([0, 7]), B, "cpu")
    seed = philox_seed(torch.Generator().manual_seed(1), torch.device("cpu"))
    unc = torch.randn(B, N, K).log_softmax(-1).permute(0, 2, 1)
    ops = torch.ops.imgtx
    torch.library.opcheck(ops.mr_posterior_sample, (logp, None, x_t, coefs, seed, 1.0, 0.9))
    torch.library.opcheck(ops.mr_posterior_sample, (logp, unc, x_t, coefs, seed, 3.0, 1.0))
    torch.library.opcheck(ops.mr_posterior_log_probs, (logp, None, x_t, coefs, 1.0, 1.0))
    torch.library.opcheck(ops.mr_posterior_log_probs, (logp.permute(0, 2, 1).contiguous().permute(0, 2, 1),
                                                       unc, x_t, coefs, 2.0, 0.8))
    torch.library.opcheck(ops.mr_q_sample, (x0, coefs, seed, K))
    logits = torch.randn(B, K, N, requires_grad=True)
    torch.library.opcheck(ops.mr_vb_terms, (logits, x0, x_t, coefs))


def test_torch_compile_fullgraph(sched):
    logp, x_t, x0 = _inputs()
    coefs = sched.coefs(5, B, "cpu")
    seed = torch.tensor([123])

    @torch.compile(fullgraph=True, backend="eager")
    def step(logp, x_t, coefs, seed):
        x = torch.ops.imgtx.mr_posterior_sample(logp, None, x_t, coefs, seed, 1.0, 0.9)
        lv, la, _ = torch.ops.imgtx.mr_vb_terms(logp, x0, x_t, coefs)
        return x, lv.sum() + la.sum()

    x, loss = step(logp, x_t, coefs, seed)
    eager = torch.ops.imgtx.mr_posterior_sample(logp, None, x_t, coefs, seed, 1.0, 0.9)
    assert torch.equal(x, eager) and torch.isfinite(loss)


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous"])
def test_non_finite_logits_on_every_path(layout, cpu_isa):
    """-inf is a legal log-probability; NaN, +inf and all -inf tokens are errors. N = 300 runs the
    token-parallel path's full tiles and its tail; the class-contiguous layout the row path."""
    K, N = 12, 300
    sched = MaskAndReplaceSchedule(K, 10)
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(2, K, N, generator=g).log_softmax(1)
    logp[:, 3, :] = float("-inf")  # a class nobody can be: fine
    logp[1, :5, 7] = float("-inf")
    if layout == "class_contiguous":
        logp = logp.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    x_t = torch.randint(0, K + 1, (2, N), generator=g)
    x = posterior_sample(logp, x_t, 4, sched, g, truncation_rate=0.9)
    assert x.shape == (2, N) and int(x.min()) >= 0 and int(x.max()) <= K
    for n, value in [(150, float("nan")), (299, float("inf")), (5, float("nan"))]:
        bad = logp.clone()
        bad[1, 2, n] = value
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            posterior_sample(bad, x_t, 4, sched)
    empty = logp.clone()
    empty[0, :, 200] = float("-inf")
    with pytest.raises(ValueError, match="all -inf"):
        posterior_log_probs(empty, x_t, 4, sched)
