"""VQ-Diffusion's training loss: fused per-token terms and gradients vs plain float64 PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from diffusion_helpers import cumulative_matrix, one_step_matrix, replace_heavy_schedule
from imgtx_fast import backend
from imgtx_fast.diffusion import MaskAndReplaceSchedule, TimestepSampler, vb_loss, vb_terms
from imgtx_fast.reference import diffusion as ref


def _case(B, K, N, T, layout, dtype, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, K, N, generator=gen) * scale).to(dtype)
    if layout == "class_contiguous":
        logits = logits.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    x0 = torch.randint(0, K, (B, N), generator=gen)
    x_t = torch.where(torch.rand(B, N, generator=gen) < 0.5, torch.full_like(x0, K),
                      torch.randint(0, K, (B, N), generator=gen))
    x_t[:, 0] = x0[:, 0]  # x_t == x0 (the special class is the true class)
    t = torch.randint(0, T, (B,), generator=gen)
    t[0] = 0
    return logits, x0, x_t, t


def _kl_by_matrices(logits, x0, x_t, t, sched):
    """Per-token KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) from explicit matrices (one token)."""
    K = sched.num_classes
    p = torch.softmax(logits.double(), 0)
    Q1, Qprev, Qt = one_step_matrix(sched, t), cumulative_matrix(sched, t - 1), cumulative_matrix(sched, t)

    def post(px0):
        out = torch.zeros(K + 1, dtype=torch.float64)
        for k in range(K):
            if px0[k] > 0:
                out += px0[k] * Q1[:, x_t] * Qprev[k, :] / Qt[k, x_t]
        return out / out.sum()

    q = post(F.one_hot(torch.tensor(x0), K).double())
    m = post(p)
    nz = q > 0
    return float((q[nz] * (q[nz].log() - m[nz].log())).sum())


@pytest.mark.parametrize("heavy", [False, True])
def test_kl_matches_explicit_matrices(heavy):
    K, T = 5, 6
    sched = replace_heavy_schedule(K, T) if heavy else MaskAndReplaceSchedule(K, T)
    gen = torch.Generator().manual_seed(int(heavy))
    logits = torch.randn(1, K, 12, generator=gen) * 2
    x0 = torch.randint(0, K, (1, 12), generator=gen)
    x_t = torch.cat([torch.full((1, 4), K), x0[:, 4:8], torch.randint(0, K, (1, 4), generator=gen)], 1)
    for t in range(1, T):
        lv, _ = vb_terms(logits, x0, x_t, t, sched)
        for n in range(12):
            want = _kl_by_matrices(logits[0, :, n], int(x0[0, n]), int(x_t[0, n]), t, sched)
            assert abs(float(lv[0, n]) - want) < 2e-5 * max(1.0, abs(want)), (t, n)


@pytest.mark.parametrize("layout", ["token_contiguous", "class_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,N,heavy", [(3, 7, 11, False), (2, 64, 9, True), (2, 513, 5, False),
                                         (1, 1, 3, False)])
def test_vb_terms_and_gradients_vs_reference(B, K, N, heavy, layout, dtype, cpu_isa):
    T = 30
    sched = replace_heavy_schedule(K, T) if heavy else MaskAndReplaceSchedule(K, T)
    logits, x0, x_t, t = _case(B, K, N, T, layout, dtype, seed=B + K + N)
    x = logits.detach().requires_grad_()
    lv, la = vb_terms(x, x0, x_t, t, sched)
    xr = logits.detach().double().requires_grad_()
    rv, ra = ref.vb_terms(xr, x0, x_t, sched.coefs(t, B, "cpu"))
    torch.testing.assert_close(lv.double(), rv, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(la.double(), ra, rtol=2e-5, atol=2e-5)
    gv, ga = torch.randn(B, N), torch.randn(B, N)
    g, = torch.autograd.grad((lv * gv).sum() + (la * ga).sum(), x)
    gr, = torch.autograd.grad((rv * gv.double()).sum() + (ra * ga.double()).sum(), xr)
    assert g.dtype == dtype and g.stride() == logits.stride()
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16: the gradient is stored in bf16
    torch.testing.assert_close(g.double(), gr, rtol=tol, atol=tol)


def test_gradcheck():
    """Finite differences through the fused forward (float32 inside, hence the tolerances)."""
    K, N = 6, 4
    sched = replace_heavy_schedule(K, 8)
    _, x0, x_t, _ = _case(1, K, N, 8, "token_contiguous", torch.float32, seed=2)
    for t in (0, 3):
        def f(z):
            lv, la = vb_terms(z.float(), x0, x_t, t, sched)
            return (lv.double() * torch.arange(1, N + 1) + 0.3 * la.double()).sum()
        z = (torch.randn(1, K, N, dtype=torch.float64) * 1.5).requires_grad_()
        assert torch.autograd.gradcheck(f, (z,), eps=1e-3, atol=2e-3, rtol=2e-2)


def _plain_loss(logits, x0, x_t, t, sched, aux_weight, pt, mask_weight):
    """VQ-Diffusion's loss written out in float64 PyTorch (the reference terms + weighting)."""
    B, K, N = logits.shape
    T = sched.num_timesteps
    lv, la = ref.vb_terms(logits, x0, x_t, sched.coefs(t, B, "cpu"))
    m = torch.where(x_t == K, mask_weight[0], mask_weight[1]).double()
    m = torch.where((t == 0).view(B, 1), torch.ones_like(m), m)
    per = (lv * m).mean(1) + aux_weight * (2 - t.double() / T) * (la * m).mean(1)
    return (per / pt).mean() / T


def test_vb_loss_weighting_vs_plain_pytorch():
    B, K, N, T = 4, 20, 16, 50
    sched = MaskAndReplaceSchedule(K, T)
    logits, x0, x_t, t = _case(B, K, N, T, "class_contiguous", torch.float32, seed=7)
    pt = torch.tensor([0.01, 0.03, 0.02, 0.05], dtype=torch.float64)
    x = logits.detach().requires_grad_()
    loss = vb_loss(x, x0, x_t, t, sched, aux_weight=0.1, pt=pt, mask_weight=(2.0, 0.5))
    loss.backward()
    xr = logits.detach().double().requires_grad_()
    want = _plain_loss(xr, x0, x_t, t, sched, 0.1, pt, (2.0, 0.5))
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 * abs(want.item())
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-4, atol=1e-7)
    with backend("reference"):  # the reference backend gives the same loss
        loss_ref = vb_loss(logits, x0, x_t, t, sched, aux_weight=0.1, pt=pt, mask_weight=(2.0, 0.5))
        assert abs(loss_ref.item() - want.item()) < 1e-6 * abs(want.item())  # float32 output


def test_timestep_sampler():
    T = 5
    s = TimestepSampler(T)
    t, pt = s.sample(1000, torch.Generator().manual_seed(0))
    assert torch.allclose(pt, torch.full_like(pt, 1 / T))  # uniform until every t seen > 10 times
    for _ in range(12):
        s.update(torch.arange(T), torch.tensor([1.0, 1.0, 4.0, 9.0, 16.0]))
    p = s.probs()
    assert abs(float(p.sum()) - 1) < 1e-12
    assert p[0] == p[1] and p[4] > p[3] > p[2] > p[1]
    t, pt = s.sample(200_000, torch.Generator().manual_seed(1))
    freq = torch.bincount(t, minlength=T).double() / t.numel()
    assert torch.allclose(freq, p, atol=5e-3)
    assert torch.equal(pt, p[t])


def test_vb_loss_trains_a_toy_denoiser():
    """End to end: a per-token logit table trained with vb_loss learns the data distribution."""
    torch.manual_seed(0)
    K, N, T = 8, 4, 10
    sched = MaskAndReplaceSchedule(K, T)
    data = torch.tensor([1, 5, 5, 2])  # every sample is this sequence
    table = torch.zeros(T, K + 1, K, N, requires_grad=True)  # logits per (t, x_t class)
    opt = torch.optim.Adam([table], lr=0.1)
    ts = TimestepSampler(T)
    first = None
    for step in range(150):
        x0 = data.view(1, N).expand(16, N)
        t, pt = ts.sample(16)
        x_t = __import__("imgtx_fast").diffusion.q_sample(x0, t, sched)
        logits = table[t.view(-1, 1), x_t, :, torch.arange(N)].permute(0, 2, 1)  # (B, K, N)
        loss, per = vb_loss(logits, x0, x_t, t, sched, pt=pt, return_per_sample=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.update(t, per)
        first = loss.item() if first is None else first
    assert loss.item() < 0.2 * first
    masked = table[T - 1, K].argmax(0)  # fully masked input at the last step predicts the data
    assert torch.equal(masked, data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vb_loss_dtype_is_the_same_with_either_backend(dtype):
    """float32 losses and per-token terms from both backends, gradients in the logits' dtype."""
    B, K, N, T = 2, 9, 11, 10
    sched = MaskAndReplaceSchedule(K, T)
    logits, x0, x_t, t = _case(B, K, N, T, "token_contiguous", dtype, seed=3)
    out = {}
    for name in ("fast", "reference"):
        x = logits.detach().clone().requires_grad_()
        with backend(name):
            loss, per = vb_loss(x, x0, x_t, t, sched, return_per_sample=True)
            terms = vb_terms(x, x0, x_t, t, sched)
        loss.backward()
        out[name] = (loss.dtype, per.dtype, terms[0].dtype, terms[1].dtype, x.grad.dtype)
        assert out[name] == (torch.float32,) * 4 + (dtype,), name
    assert out["fast"] == out["reference"]


def test_vb_loss_rejects_float64_logits_with_either_backend():
    B, K, N, T = 2, 5, 4, 10
    sched = MaskAndReplaceSchedule(K, T)
    logits, x0, x_t, t = _case(B, K, N, T, "token_contiguous", torch.float32, seed=4)
    for name in ("fast", "reference"):
        with backend(name), pytest.raises(TypeError, match="logits must be float32, float16 or bfloat16"):
            vb_loss(logits.double(), x0, x_t, t, sched)
