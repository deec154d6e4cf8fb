"""imgtx_fast.cupy (the framework-free CUDA front end) against the torch ops on the same GPU data.

The torch op and the CuPy front end launch the same kernels with the same arguments, so the
results are compared bitwise (torch sees the cupy arrays through DLPack, without a copy; samples
use the Philox key the torch op draws from its generator). Mirrors tests/test_numpy_frontend.py
in miniature. Needs a GPU, a CUDA build and CuPy (in the GPU machine's image).
"""
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import imgtx_fast
from imgtx_fast import Local1d, Local2d
from imgtx_fast import diffusion as tdiff

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy")
itx = pytest.importorskip("imgtx_fast.cupy")


def randn(rng, shape, dtype=np.float32, scale=1.0):
    return cp.asarray((rng.standard_normal(shape) * scale).astype(dtype))


def tt(a):
    """The same GPU memory as a torch tensor (strides kept)."""
    return torch.from_dlpack(a)


def assert_same(ours, ref):
    assert isinstance(ours, cp.ndarray)
    assert ours.shape == tuple(ref.shape)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(ours), ref.cpu().numpy())


def key_from(gen: torch.Generator) -> int:
    """The Philox key the torch API will draw from the CUDA generator gen."""
    g = torch.Generator(device="cuda").set_state(gen.get_state())
    return int(torch.randint(0, 2**62, (1,), generator=g, device="cuda", dtype=torch.int64))


def test_import_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, imgtx_fast.cupy\n"
                        "assert 'torch' not in sys.modules"], capture_output=True, text=True, timeout=120,
                       cwd=tempfile.gettempdir())  # outside the checkout: the source tree has no _C
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("lead,K,D", [((1,), 1, 1), ((33,), 17, 9), ((3, 4, 5), 13, 7), ((0,), 4, 3),
                                      ((2, 300), 1024, 64)])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_codebook_lookup_matches_torch(lead, K, D, metric, dtype):
    rng = np.random.default_rng(K * 31 + D)
    z, cb = randn(rng, lead + (D,), dtype), randn(rng, (K, D), dtype)
    ours = itx.codebook_lookup(z, cb, metric=metric, return_stats=True)
    ref = imgtx_fast.codebook_lookup(tt(z), tt(cb), metric=metric, return_stats=True)
    for a, b in zip(ours, ref):
        assert_same(a, b)


def test_codebook_lookup_strided_and_on_a_side_stream():
    rng = np.random.default_rng(1)
    z = randn(rng, (2, 16, 5, 6)).transpose(0, 2, 3, 1)  # channels last view, no copy
    cb = randn(rng, (19, 32))[:, ::2]
    ref = imgtx_fast.codebook_lookup(tt(z), tt(cb), return_stats=True)
    torch.cuda.synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        ours = itx.codebook_lookup(z, cb, return_stats=True)
    stream.synchronize()
    for a, b in zip(ours, ref):
        assert_same(a, b)


ATTENTION_CASES = {
    "dense": dict(shape=(2, 3, 3, 17, 17, 64)),
    "causal_gqa": dict(shape=(2, 4, 2, 7, 19, 64), causal=True),
    "key_lengths_mask": dict(shape=(2, 2, 2, 9, 21, 64), key_lengths=[21, 5], mask=(9, 21)),
    "local1d": dict(shape=(1, 2, 2, 45, 45, 64), pattern=Local1d(8)),
    "local2d": dict(shape=(1, 2, 1, 63, 63, 128), pattern=Local2d(7, 9, (2, 4), (1, 2))),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_matches_torch(name, monkeypatch):
    monkeypatch.setenv("IMGTX_FAST_CUDA_ATTENTION", "1")  # the torch op then runs the same kernels
    c = ATTENTION_CASES[name]
    B, H, Hkv, Nq, Nk, D = c["shape"]
    rng = np.random.default_rng(len(name))
    q = randn(rng, (B, Nq, H, D), np.float16).transpose(0, 2, 1, 3)  # (B, N, H, D) projections
    k, v = randn(rng, (B, Hkv, Nk, D), np.float16), randn(rng, (B, Hkv, Nk, D), np.float16)
    kw = {n: c[n] for n in ("causal", "pattern") if n in c}
    if "key_lengths" in c:
        kw["key_lengths"] = cp.asarray(np.array(c["key_lengths"], dtype=np.int64))
    if "mask" in c:
        kw["attn_mask"] = cp.asarray(rng.random(c["mask"]) < 0.7)
    out, lse = itx.attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = imgtx_fast.attention(tt(q), tt(k), tt(v), return_lse=True,
                                            **{n: tt(x) if isinstance(x, cp.ndarray) else x
                                               for n, x in kw.items()})
    assert_same(out, ref_out)
    assert_same(lse, ref_lse)


def test_attention_cases_without_a_cuda_kernel_say_so(monkeypatch):
    rng = np.random.default_rng(2)
    q = randn(rng, (1, 1, 4, 64), np.float16)
    monkeypatch.delenv("IMGTX_FAST_CUDA_ATTENTION", raising=False)
    with pytest.raises(NotImplementedError, match="IMGTX_FAST_CUDA_ATTENTION"):
        itx.attention(q, q, q)
    monkeypatch.setenv("IMGTX_FAST_CUDA_ATTENTION", "1")
    q32 = q.astype(cp.float32)
    with pytest.raises(NotImplementedError, match="float16"):
        itx.attention(q32, q32, q32)


@pytest.mark.parametrize("B,K,N", [(1, 1, 1), (3, 17, 33), (2, 1024, 256), (0, 5, 4)])
@pytest.mark.parametrize("guided", [False, True])
def test_posterior_matches_torch(B, K, N, guided):
    rng = np.random.default_rng(B * 7 + K + N)
    ours_s, ref_s = itx.MaskAndReplaceSchedule(K), tdiff.MaskAndReplaceSchedule(K)
    logp = randn(rng, (B, N, K), scale=3.0).transpose(0, 2, 1)  # diffusers' layout, no copy
    x_t = cp.asarray(rng.integers(0, K + 1, (B, N)))
    t = cp.asarray(rng.integers(0, 100, (B,)))
    kw = dict(truncation_rate=0.8)
    if guided:
        kw.update(guidance_scale=3.0, log_p_x0_uncond=randn(rng, (B, K, N), scale=3.0))
    ref_kw = {n: tt(x) if isinstance(x, cp.ndarray) else x for n, x in kw.items()}
    assert_same(itx.posterior_log_probs(logp, x_t, t, ours_s, **kw),
                tdiff.posterior_log_probs(tt(logp), tt(x_t), tt(t), ref_s, **ref_kw))
    gen = torch.Generator(device="cuda").manual_seed(B + K + N)
    key = key_from(gen)
    assert_same(itx.posterior_sample(logp, x_t, t, ours_s, key, **kw),
                tdiff.posterior_sample(tt(logp), tt(x_t), tt(t), ref_s, gen, **ref_kw))


@pytest.mark.parametrize("B,K,N", [(1, 1, 1), (3, 200, 65), (4, 7, 0)])
def test_q_sample_matches_torch(B, K, N):
    rng = np.random.default_rng(K + N)
    x0 = cp.asarray(rng.integers(0, K, (B, 2 * N)))[:, ::2]
    s, rs = itx.MaskAndReplaceSchedule(K), tdiff.MaskAndReplaceSchedule(K)
    gen = torch.Generator(device="cuda").manual_seed(K)
    key = key_from(gen)
    assert_same(itx.q_sample(x0, 37, s, key), tdiff.q_sample(tt(x0), 37, rs, gen))


def test_bad_input_names_the_argument():
    rng = np.random.default_rng(3)
    z, cb = randn(rng, (4, 8)), randn(rng, (5, 8))
    with pytest.raises(TypeError, match=r"codebook_lookup: z must be a cupy.ndarray"):
        itx.codebook_lookup(cp.asnumpy(z), cb)
    with pytest.raises(TypeError, match=r"codebook_lookup: codebook must be float32"):
        itx.codebook_lookup(z, cb.astype(cp.float64))
    with pytest.raises(ValueError, match=r"codebook_lookup: z must have shape"):
        itx.codebook_lookup(z[:, :7], cb)
    s = itx.MaskAndReplaceSchedule(5)
    logp, x_t = randn(rng, (2, 5, 3)), cp.full((2, 3), 6)
    with pytest.raises(ValueError, match=r"posterior_sample: x_t has values outside"):
        itx.posterior_sample(logp, x_t, 2, s, 0)
    with pytest.raises(ValueError, match=r"q_sample: t must be in"):
        itx.q_sample(x_t - 1, cp.asarray([1, 100]), s, 0)
