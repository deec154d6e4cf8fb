"""imgtx_fast.nn.VectorQuantizer against plain-PyTorch copies of taming's quantizer (float64)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import imgtx_fast
from imgtx_fast.nn import VectorQuantizer

RTOL, ATOL = 1e-4, 1e-5  # the module runs in float32, the oracles in float64


# ---------------------------------------------------------------- oracles (plain torch, float64)

def taming_forward(z, weight, beta, legacy):
    """taming VectorQuantizer2.forward (+ VectorQuantizer's one-hot perplexity), z (B, C, H, W)."""
    e_dim = weight.shape[1]
    z = z.permute(0, 2, 3, 1).contiguous()
    z_flat = z.view(-1, e_dim)
    d = (z_flat ** 2).sum(1, keepdim=True) + (weight ** 2).sum(1) - 2 * z_flat @ weight.t()
    idx = torch.argmin(d, dim=1)
    z_q = F.embedding(idx, weight).view(z.shape)
    if legacy:
        loss = torch.mean((z_q.detach() - z) ** 2) + beta * torch.mean((z_q - z.detach()) ** 2)
    else:
        loss = beta * torch.mean((z_q.detach() - z) ** 2) + torch.mean((z_q - z.detach()) ** 2)
    z_q = z + (z_q - z).detach()
    z_q = z_q.permute(0, 3, 1, 2).contiguous()
    one_hot = torch.zeros(idx.shape[0], weight.shape[0], dtype=z.dtype)
    one_hot.scatter_(1, idx[:, None], 1)
    e_mean = one_hot.mean(0)
    perplexity = torch.exp(-torch.sum(e_mean * torch.log(e_mean + 1e-10)))
    return z_q, loss, perplexity, idx


def cosine_forward(z_cl, weight, beta, legacy):
    """Cosine-similarity VQ (vector-quantize-pytorch style) on channel-last z."""
    z_hat = F.normalize(z_cl, dim=-1, eps=1e-12)
    c_hat = F.normalize(weight, dim=-1, eps=1e-12)
    idx = (z_hat.reshape(-1, z_cl.shape[-1]) @ c_hat.t()).argmax(1)
    q = c_hat[idx].view(z_hat.shape)
    commit, cb = torch.mean((q.detach() - z_hat) ** 2), torch.mean((q - z_hat.detach()) ** 2)
    loss = commit + beta * cb if legacy else beta * commit + cb
    return z_hat + (q - z_hat).detach(), loss, idx


def make_inputs(B=2, C=8, H=3, W=5, K=16, seed=0, code_scale=0.7):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, C, generator=g, dtype=torch.float64) * code_scale
    return z, w


def run_module(vq, z32, g_out):
    """Forward + backward of sum(z_q * g_out) + loss; returns outputs and grads."""
    z32 = z32.clone().requires_grad_(True)
    z_q, loss, (ppl, one_hot, idx) = vq(z32)
    ((z_q * g_out.to(z_q.dtype)).sum() + loss).backward()
    wgrad = vq.embedding.weight.grad
    return z_q.detach(), loss.detach(), ppl, one_hot, idx, z32.grad, wgrad


def close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- taming compatibility

def test_init_and_state_dict_match_taming():
    torch.manual_seed(123)
    vq = VectorQuantizer(32, 4)
    torch.manual_seed(123)
    ref = nn.Embedding(32, 4)
    ref.weight.data.uniform_(-1.0 / 32, 1.0 / 32)
    assert torch.equal(vq.embedding.weight, ref.weight)
    assert list(vq.state_dict()) == ["embedding.weight"]
    # a taming checkpoint loads strictly
    other = VectorQuantizer(32, 4)
    other.load_state_dict({"embedding.weight": ref.weight.detach().clone()})
    assert torch.equal(other.embedding.weight, ref.weight)


@pytest.mark.parametrize("legacy", [True, False])
def test_forward_backward_match_taming(legacy):
    z64, w64 = make_inputs(seed=1)
    g_out = torch.randn(z64.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    beta = 0.3
    vq = VectorQuantizer(w64.shape[0], w64.shape[1], beta, legacy=legacy)
    vq.embedding.weight.data.copy_(w64.float())
    z_q, loss, ppl, one_hot, idx, zgrad, wgrad = run_module(vq, z64.float(), g_out)

    # the oracle sees exactly the float32 inputs the module saw
    zr = z64.float().double().requires_grad_(True)
    wr = w64.float().double().requires_grad_(True)
    rz_q, rloss, rppl, ridx = taming_forward(zr, wr, beta, legacy)
    ((rz_q * g_out).sum() + rloss).backward()

    assert one_hot is None
    assert idx.dtype == torch.int64 and idx.shape == (z64.numel() // z64.shape[1],)
    assert torch.equal(idx, ridx)
    assert z_q.shape == z64.shape and z_q.is_contiguous()
    close(z_q, rz_q.detach())
    close(loss, rloss.detach())
    close(ppl, rppl)
    close(zgrad, zr.grad)
    close(wgrad, wr.grad)


def test_legacy_flag_changes_gradients():
    # guards the test above against an oracle that would ignore `legacy` too
    z64, w64 = make_inputs(seed=3)
    g0 = torch.zeros(z64.shape, dtype=torch.float64)
    grads = {}
    for legacy in (True, False):
        vq = VectorQuantizer(16, 8, 0.25, legacy=legacy)
        vq.embedding.weight.data.copy_(w64.float())
        *_, zgrad, wgrad = run_module(vq, z64.float(), g0)
        grads[legacy] = (zgrad, wgrad)
    # legacy: z side weight 1, codebook side beta; fixed: the other way round
    close(grads[True][0] * 0.25, grads[False][0])
    close(grads[True][1], grads[False][1] * 0.25)


def test_perplexity_matches_one_hot_formula():
    z64, w64 = make_inputs(B=3, H=4, W=4, K=6, seed=4, code_scale=1.5)
    vq = VectorQuantizer(6, 8).eval()
    vq.embedding.weight.data.copy_(w64.float())
    with torch.no_grad():
        _, _, (ppl, _, idx) = vq(z64.float())
    one_hot = F.one_hot(idx, 6).double()
    p = one_hot.mean(0)
    expected = torch.exp(-(p * torch.log(p + 1e-10)).sum())
    assert len(idx.unique()) > 1  # a non-trivial distribution
    close(ppl, expected)


def test_channel_last_matches_bchw():
    z64, w64 = make_inputs(seed=5)
    g_out = torch.randn(z64.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = VectorQuantizer(16, 8)
    b = VectorQuantizer(16, 8, channel_last=True)
    for m in (a, b):
        m.embedding.weight.data.copy_(w64.float())
    za_q, la, pa, _, ia, gza, gwa = run_module(a, z64.float(), g_out)
    z_cl = z64.float().permute(0, 2, 3, 1).contiguous()
    zb_q, lb, pb, _, ib, gzb, gwb = run_module(b, z_cl, g_out.permute(0, 2, 3, 1))
    assert zb_q.shape == z_cl.shape
    assert torch.equal(ia, ib)
    close(zb_q, za_q.permute(0, 2, 3, 1))
    close(lb, la)
    close(pb, pa)
    close(gzb, gza.permute(0, 2, 3, 1))
    close(gwb, gwa)


def test_strided_and_channels_last_inputs():
    z64, w64 = make_inputs(B=2, C=8, H=4, W=6, seed=7)
    vq = VectorQuantizer(16, 8).eval()
    vq.embedding.weight.data.copy_(w64.float())
    z = z64.float()
    with torch.no_grad():
        base = vq(z)
        for variant in (z.to(memory_format=torch.channels_last),  # permuted view is dense
                        torch.stack([z, -z], dim=-1)[..., 0],       # strided slice
                        z.permute(0, 1, 3, 2).contiguous().transpose(2, 3)):
            assert torch.equal(variant, z)
            out = vq(variant)
            assert torch.equal(out[2][2], base[2][2])
            assert torch.equal(out[0], base[0])
            assert torch.equal(out[1], base[1])


def test_op_gets_the_permuted_view_not_a_copy(monkeypatch):
    import imgtx_fast.nn.vector_quantizer as vqmod
    seen = []

    def spy(z, codebook, **kw):
        seen.append(z)
        return imgtx_fast.codebook_lookup(z, codebook, **kw)

    monkeypatch.setattr(vqmod, "codebook_lookup", spy)
    z = torch.randn(2, 8, 3, 5)
    VectorQuantizer(16, 8)(z)
    assert len(seen) == 1  # one fused call per forward
    assert seen[0].data_ptr() == z.data_ptr() and not seen[0].is_contiguous()
    assert seen[0].shape == (2, 3, 5, 8)


def test_cosine_matches_plain():
    z64, w64 = make_inputs(seed=8)
    g_out = torch.randn(z64.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    vq = VectorQuantizer(16, 8, 0.25, metric="cosine")
    vq.embedding.weight.data.copy_(w64.float())
    z_q, loss, ppl, _, idx, zgrad, wgrad = run_module(vq, z64.float(), g_out)

    zr = z64.float().double().requires_grad_(True)
    wr = w64.float().double().requires_grad_(True)
    rz_q, rloss, ridx = cosine_forward(zr.permute(0, 2, 3, 1), wr, 0.25, legacy=True)
    rz_q = rz_q.permute(0, 3, 1, 2)
    ((rz_q * g_out).sum() + rloss).backward()
    assert torch.equal(idx, ridx)
    close(z_q, rz_q.detach())
    close(z_q.norm(dim=1), torch.ones(z_q.shape[0], *z_q.shape[2:], dtype=torch.float64))
    close(loss, rloss.detach())
    close(zgrad, zr.grad)
    close(wgrad, wr.grad)


def test_get_codebook_entry():
    z64, w64 = make_inputs(B=2, C=8, H=3, W=5, seed=10)
    vq = VectorQuantizer(16, 8).eval()
    vq.embedding.weight.data.copy_(w64.float())
    with torch.no_grad():
        z_q, _, (_, _, idx) = vq(z64.float())
        entry = vq.get_codebook_entry(idx, shape=(2, 3, 5, 8))
        flat = vq.get_codebook_entry(idx)
    assert entry.shape == (2, 8, 3, 5)
    assert torch.equal(entry, z_q)
    assert torch.equal(flat, vq.embedding.weight[idx])


# ---------------------------------------------------------------- EMA and dead codes

def hand_ema_step(cluster_size, embed_sum, z_flat, idx, K, decay, eps):
    one_hot = F.one_hot(idx, K).double()
    cluster_size = decay * cluster_size + (1 - decay) * one_hot.sum(0)
    embed_sum = decay * embed_sum + (1 - decay) * one_hot.t() @ z_flat
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def test_ema_update_matches_hand_written_step():
    K, C, decay, eps, beta = 8, 4, 0.9, 1e-3, 0.25
    vq = VectorQuantizer(K, C, beta, ema=True, decay=decay, eps=eps)
    g = torch.Generator().manual_seed(11)
    vq.embedding.weight.data.copy_(torch.randn(K, C, generator=g))
    vq.embed_sum.copy_(vq.embedding.weight.data)
    assert not vq.embedding.weight.requires_grad
    assert set(vq.state_dict()) == {"embedding.weight", "cluster_size", "embed_sum"}

    cs = torch.zeros(K, dtype=torch.float64)
    es = vq.embedding.weight.detach().double().clone()
    w = es.clone()
    for step in range(2):
        z = torch.randn(2, C, 4, 4, generator=g, dtype=torch.float64)
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        idx = torch.cdist(z_flat, w).argmin(1)
        commit = ((w[idx] - z_flat) ** 2).mean()
        zin = z.float().requires_grad_(True)
        _, loss, (_, _, got_idx) = vq(zin)
        assert torch.equal(got_idx, idx)
        close(loss, beta * commit)  # no codebook term under EMA
        loss.backward()
        close(zin.grad, (beta * 2 * (z_flat - w[idx]) / z_flat.numel()).view(2, 4, 4, C).permute(0, 3, 1, 2))
        cs, es, w = hand_ema_step(cs, es, z_flat.float().double(), idx, K, decay, eps)
        close(vq.cluster_size, cs)
        close(vq.embed_sum, es)
        close(vq.embedding.weight, w)

    # eval mode leaves the codebook alone
    vq.eval()
    before = vq.embedding.weight.clone()
    vq(torch.randn(2, C, 4, 4))
    assert torch.equal(vq.embedding.weight, before)


def test_ema_state_dict_round_trip_and_taming_checkpoint():
    a = VectorQuantizer(8, 4, ema=True)
    a.train()
    a(torch.randn(2, 4, 3, 3))
    b = VectorQuantizer(8, 4, ema=True)
    b.load_state_dict(a.state_dict())
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k
    # a taming checkpoint (embedding.weight only) starts a fresh EMA from its codes
    w = torch.randn(8, 4)
    c = VectorQuantizer(8, 4, ema=True)
    c.load_state_dict({"embedding.weight": w})
    assert torch.equal(c.embedding.weight, w) and torch.equal(c.embed_sum, w)
    assert torch.equal(c.cluster_size, torch.zeros(8))


def far_codebook(K_near=4, K_far=4, C=4):
    """Codes 0..K_near-1 sit near the data; the rest are far away and never chosen."""
    g = torch.Generator().manual_seed(12)
    near = torch.randn(K_near, C, generator=g)
    far = 100.0 + torch.randn(K_far, C, generator=g)
    return torch.cat([near, far])


def is_batch_row(codes, z_flat):
    return (torch.cdist(codes.double(), z_flat.double()).min(1).values < 1e-6).all()


def test_dead_code_restart_replaces_unused_codes():
    w = far_codebook()
    vq = VectorQuantizer(8, 4, dead_code_threshold=1)
    vq.embedding.weight.data.copy_(w)
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    z_flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)

    vq.eval()
    vq(z)
    assert torch.equal(vq.embedding.weight, w)  # eval: untouched

    vq.train()
    z_q, loss, (_, _, idx) = vq(z)
    used = torch.zeros(8, dtype=torch.bool)
    used[idx] = True
    assert not used[4:].any()
    new = vq.embedding.weight.detach()
    assert torch.equal(new[used], w[used])          # used codes kept
    assert is_batch_row(new[~used], z_flat)         # dead ones now batch vectors
    assert (new[4:].abs() < 50).all()
    (z_q.sum() + loss).backward()                   # the restart does not break backward
    assert z.grad is not None and vq.embedding.weight.grad is not None


def test_dead_code_restart_ema():
    w = far_codebook()
    thr = 0.5
    vq = VectorQuantizer(8, 4, ema=True, decay=0.5, dead_code_threshold=thr)
    vq.embedding.weight.data.copy_(w)
    vq.embed_sum.copy_(w)
    vq.cluster_size.fill_(1.0)  # all alive before the step
    z = torch.randn(2, 4, 4, 4)
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    _, _, (_, _, idx) = vq(z)
    assert (idx < 4).all()
    # far codes: usage 0.5 * 1 + 0 = 0.5 is not < 0.5, so they survive this step ...
    assert (vq.embedding.weight[4:].abs() > 50).all()
    vq(z)
    # ... and die on the next one (0.25 < 0.5)
    new = vq.embedding.weight
    assert is_batch_row(new[4:], z_flat)
    close(vq.cluster_size[4:], torch.full((4,), thr))
    close(vq.embed_sum[4:], new[4:] * thr)


# ---------------------------------------------------------------- backends and compile

@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_backend_identical(metric):
    z64, w64 = make_inputs(seed=13)
    g_out = torch.randn(z64.shape, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    vq = VectorQuantizer(16, 8, metric=metric)
    vq.embedding.weight.data.copy_(w64.float())
    fast = run_module(vq, z64.float(), g_out)
    vq.embedding.weight.grad = None
    with imgtx_fast.backend("reference"):
        ref = run_module(vq, z64.float(), g_out)
    assert torch.equal(fast[4], ref[4])   # indices
    assert torch.equal(fast[1], ref[1])   # loss
    assert torch.equal(fast[2], ref[2])   # perplexity
    # z_q: the reference's straight-through is z + (q - z).detach(), which rounds (1 ulp)
    close(fast[0], ref[0], rtol=1e-6, atol=1e-7)
    close(fast[5], ref[5])                # grad z
    close(fast[6], ref[6])                # grad codebook


def test_half_precision_input():
    z64, w64 = make_inputs(seed=15)
    vq = VectorQuantizer(16, 8).eval()
    vq.embedding.weight.data.copy_(w64.float())
    z = z64.to(torch.bfloat16)
    z_q, loss, (_, _, idx) = vq(z)
    assert z_q.dtype == torch.bfloat16 and loss.dtype == torch.float32
    _, _, _, ridx = taming_forward(z.double(), vq.embedding.weight.double(), 0.25, True)
    assert torch.equal(idx, ridx)


def test_bad_shapes_raise():
    vq = VectorQuantizer(16, 8)
    with pytest.raises(ValueError):
        vq(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError):
        VectorQuantizer(16, 8, channel_last=True)(torch.randn(2, 8, 3, 3))


def _compiled_matches_eager(backend):
    torch._dynamo.reset()
    z64, w64 = make_inputs(seed=16)
    vq = VectorQuantizer(16, 8).eval()
    vq.embedding.weight.data.copy_(w64.float())
    z = z64.float()
    compiled = torch.compile(vq, fullgraph=True, backend=backend)
    with torch.no_grad():
        got, want = compiled(z), vq(z)
    assert torch.equal(got[2][2], want[2][2])
    close(got[0], want[0], rtol=0, atol=0)
    close(got[1], want[1], rtol=1e-6, atol=1e-7)
    close(got[2][0], want[2][0], rtol=1e-6, atol=1e-7)


def test_compile_fullgraph_eval():
    # aot_eager: full dynamo capture and the op's fake kernel, without inductor's codegen time
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_fullgraph_eval_inductor():
    _compiled_matches_eager("inductor")  # ~20 s on 2 cores


def test_compile_fullgraph_train_ema_dead_codes():
    # training mode too: the EMA / restart writes are sync-free and capture in one graph
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = VectorQuantizer(16, 8, ema=True, dead_code_threshold=1.0)
    comp = VectorQuantizer(16, 8, ema=True, dead_code_threshold=1.0)
    comp.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    z = torch.randn(2, 8, 3, 5)
    torch.manual_seed(1)
    want = eager(z)
    torch.manual_seed(1)
    got = compiled(z)
    assert torch.equal(got[2][2], want[2][2])
    assert (eager.cluster_size > 0).any()  # the step did update
    for k, v in eager.state_dict().items():
        close(comp.state_dict()[k], v, rtol=1e-6, atol=1e-6)


def test_video_layout():
    # (B, C, T, H, W) works like its channel-last flattening
    _, w64 = make_inputs(seed=17)
    z = torch.randn(2, 8, 2, 3, 4, generator=torch.Generator().manual_seed(18))
    a = VectorQuantizer(16, 8).eval()
    b = VectorQuantizer(16, 8, channel_last=True).eval()
    for m in (a, b):
        m.embedding.weight.data.copy_(w64.float())
    with torch.no_grad():
        za, la, (_, _, ia) = a(z)
        zb, lb, (_, _, ib) = b(z.movedim(1, -1).reshape(-1, 8))
    assert za.shape == z.shape
    assert torch.equal(ia, ib)
    assert torch.equal(za.movedim(1, -1).reshape(-1, 8), zb)
    close(la, lb, rtol=1e-6, atol=1e-7)
