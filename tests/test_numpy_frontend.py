"""imgtx_fast.numpy (the framework-free CPU front end) against the torch ops on the same data.

Both front ends call the same kernels with the same arguments, so results must be bitwise
equal (the CPU front end is run with torch's thread count): indices, quantized vectors,
attention outputs and lse, posterior log-probs, and samples drawn with the same Philox key.
Also: strided views without copies where the torch op takes them, bad input (same exception
type, message naming the argument), array-interface / DLPack inputs, and that importing the
front end does not import torch.
"""
import subprocess
import sys
import tempfile
import types
import zlib

import numpy as np
import pytest
import torch

import imgtx_fast
import imgtx_fast.numpy as itx
from imgtx_fast import Local1d, Local2d
from imgtx_fast import diffusion as tdiff


@pytest.fixture(autouse=True)
def _same_threads():
    """The CPU kernels use the thread count they are given; equal counts, equal work split."""
    previous = itx.get_num_threads()
    itx.set_num_threads(torch.get_num_threads())
    yield
    itx.set_num_threads(previous)


def rng_for(*params) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def randn(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def tt(a):
    """The same data as a torch tensor, sharing memory and strides (negative strides, which
    torch lacks, and read-only broadcasts, which torch warns about, become a copy)."""
    if any(s < 0 for s in a.strides) or not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def assert_same(np_out, torch_out):
    assert isinstance(np_out, np.ndarray)
    assert np_out.shape == tuple(torch_out.shape)
    assert np_out.dtype == torch_out.numpy().dtype
    np.testing.assert_array_equal(np_out, torch_out.numpy())


def key_from(gen: torch.Generator) -> int:
    """The Philox key the torch API will draw from gen (diffusion.sampling.philox_seed), read
    from a copy of gen's state."""
    g = torch.Generator().set_state(gen.get_state())
    return int(torch.randint(0, 2**62, (1,), generator=g, dtype=torch.int64))


# ---- import: no torch -------------------------------------------------------------------------
def _run(code: str) -> subprocess.CompletedProcess:
    """`python -c code` outside the checkout: with `-c` the working directory comes first on
    sys.path, and a source tree there (no compiled _C; CI runs from one) would shadow the install."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())


def test_importing_the_numpy_front_end_does_not_import_torch():
    r = _run("import sys, numpy as np\n"
             "import imgtx_fast, imgtx_fast.numpy as itx\n"
             "from imgtx_fast import Local1d, Local2d, __version__, set_backend\n"
             "s = itx.MaskAndReplaceSchedule(4)\n"
             "z = np.ones((3, 2), np.float32)\n"
             "itx.codebook_lookup(z, z)\n"
             "q = np.ones((1, 1, 4, 8), np.float16)\n"
             "itx.attention(q, q, q, pattern=Local1d(2))\n"
             "itx.posterior_sample(np.zeros((1, 4, 3), np.float32), np.full((1, 3), 4), 2, s, 0)\n"
             "itx.q_sample(np.zeros((1, 3), np.int64), 2, s, np.random.default_rng(0))\n"
             "assert 'torch' not in sys.modules, 'torch was imported'\n"
             "print(__version__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == imgtx_fast.__version__


def test_importing_the_cupy_front_end_does_not_import_torch():
    r = _run("import sys\n"
             "try:\n"
             "    import imgtx_fast.cupy\n"
             "except ImportError as e:\n"
             "    assert 'cupy' in str(e).lower(), e\n"
             "assert 'torch' not in sys.modules, 'torch was imported'")
    assert r.returncode == 0, r.stderr


def test_package_names_load_torch_ops_on_first_use():
    """The lazy package __init__: the torch names still import from the package, and the
    custom ops are registered whichever of torch and imgtx_fast is imported first."""
    r = _run("import sys, imgtx_fast\n"
             "assert 'torch' not in sys.modules\n"
             "from imgtx_fast import attention, codebook_lookup, CodebookLookup, Local1d\n"
             "import torch\n"
             "assert hasattr(torch.ops.imgtx, 'codebook_lookup')\n"
             "assert imgtx_fast.codebook_lookup is codebook_lookup\n"
             "assert 'attention' in dir(imgtx_fast) and imgtx_fast.ops.attention is attention\n")
    assert r.returncode == 0, r.stderr
    r = _run("import torch, imgtx_fast\n"
             "assert hasattr(torch.ops.imgtx, 'attention_forward')\n"
             "assert hasattr(torch.ops.imgtx, 'mr_posterior_sample')\n")
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        imgtx_fast.nonexistent  # noqa: B018


def test_patterns_module_is_torch_free():
    r = _run("import sys, imgtx_fast.patterns\nassert 'torch' not in sys.modules")
    assert r.returncode == 0, r.stderr


# ---- codebook_lookup --------------------------------------------------------------------------
CODEBOOK_SHAPES = [((1,), 1, 1), ((7,), 5, 3), ((33,), 17, 9), ((2, 5), 64, 16), ((3, 4, 5), 13, 7),
                   ((0,), 4, 3), ((2, 0, 3), 4, 3), ((300,), 257, 33), ((4, 1, 6), 9, 64)]


@pytest.mark.parametrize("lead,K,D", CODEBOOK_SHAPES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codebook_lookup_matches_torch(lead, K, D, metric):
    rng = rng_for(lead, K, D, metric)
    z, cb = randn(rng, lead + (D,)), randn(rng, (K, D))
    ours = itx.codebook_lookup(z, cb, metric=metric, return_stats=True)
    ref = imgtx_fast.codebook_lookup(tt(z), tt(cb), metric=metric, return_stats=True)
    assert type(ours).__name__ == "CodebookLookup" and ours._fields == ref._fields
    for a, b in zip(ours, ref):
        assert_same(a, b)
    idx, q = itx.codebook_lookup(z, cb, metric=metric)
    np.testing.assert_array_equal(idx, ours.indices)
    np.testing.assert_array_equal(q, ours.quantized)


@pytest.mark.parametrize("zt,ct", [(np.float16, np.float16), (np.float16, np.float32),
                                   (np.float32, np.float16)])
def test_codebook_lookup_half(zt, ct):
    rng = rng_for(zt, ct)
    z, cb = randn(rng, (5, 37, 24), zt), randn(rng, (45, 24), ct)
    for a, b in zip(itx.codebook_lookup(z, cb, return_stats=True),
                    imgtx_fast.codebook_lookup(tt(z), tt(cb), return_stats=True)):
        assert_same(a, b)


def _codebook_views(rng):
    fused = randn(rng, (6, 7, 3 * 16))
    bchw = randn(rng, (2, 16, 5, 6))
    return {
        "column_slice": fused[..., 16:32],                  # a slice of a fused projection
        "bchw_to_bhwc": bchw.transpose(0, 2, 3, 1),         # channels last, no copy
        "row_step": randn(rng, (40, 16))[::3],
        "dim_step": randn(rng, (9, 32))[:, ::2],
        "three_levels": randn(rng, (4, 6, 8, 16))[:, ::2, 1:7],  # does not collapse: one copy
        "reversed": randn(rng, (11, 16))[::-1],             # negative stride: a copy
        "broadcast": np.broadcast_to(randn(rng, (1, 16)), (5, 16)),
    }


@pytest.mark.parametrize("view", list(_codebook_views(np.random.default_rng(0))))
def test_codebook_lookup_strided_views(view):
    rng = rng_for(view)
    z = _codebook_views(rng)[view]
    for cb in (randn(rng, (19, 16)), randn(rng, (19, 32))[:, 1::2]):  # dense, column-strided
        for a, b in zip(itx.codebook_lookup(z, cb, return_stats=True),
                        imgtx_fast.codebook_lookup(tt(z), tt(cb), return_stats=True)):
            assert_same(a, b)


def test_codebook_lookup_transposed_codebook():
    rng = rng_for("cbT")
    z, cbT = randn(rng, (23, 12)), randn(rng, (12, 31))
    cb = cbT.T  # (K, D) with stride (1, K): no copy
    for a, b in zip(itx.codebook_lookup(z, cb, return_stats=True),
                    imgtx_fast.codebook_lookup(tt(z), tt(cb), return_stats=True)):
        assert_same(a, b)


def test_codebook_lookup_view_is_not_copied(monkeypatch):
    """A column slice reaches the kernel as a pointer into the original buffer."""
    rng = rng_for("nocopy")
    fused = randn(rng, (6, 3 * 16))
    z, cb = fused[:, 16:32], randn(rng, (7, 16))
    seen = {}
    real = itx._ops._rt.codebook_lookup

    def spy(args, sizes):
        seen["ptr"] = args[0]
        real(args, sizes)
    monkeypatch.setattr(itx._ops._rt, "codebook_lookup", spy)
    itx.codebook_lookup(z, cb)
    assert seen["ptr"] == fused.__array_interface__["data"][0] + 16 * 4


# ---- attention --------------------------------------------------------------------------------
def _mask(rng, kind, shape, dtype=np.float32):
    visible = rng.random(shape) < 0.7
    if kind == "bool":
        return visible
    bias = rng.standard_normal(shape) * 2.0
    bias[rng.random(shape) < 0.25] = -np.inf
    return bias.astype(dtype)


ATTENTION_CASES = {
    "dense": dict(shape=(2, 3, 3, 17, 17, 16, 16)),
    "dense_odd": dict(shape=(1, 1, 1, 1, 1, 1, 1)),
    "cross": dict(shape=(3, 2, 2, 5, 29, 24, 40)),
    "causal_kv": dict(shape=(2, 4, 2, 7, 19, 32, 32), causal=True),
    "causal_square": dict(shape=(1, 2, 1, 33, 33, 64, 64), causal=True),
    "gqa": dict(shape=(2, 6, 2, 13, 13, 8, 8)),
    "mqa_decode": dict(shape=(3, 4, 1, 1, 41, 16, 16), causal=True),
    "key_lengths_64": dict(shape=(3, 2, 2, 9, 21, 16, 16), key_lengths=[21, 0, 7]),
    "key_lengths_32": dict(shape=(2, 2, 1, 9, 12, 16, 16), key_lengths=[5, 12], kl_dtype=np.int32, causal=True),
    "bool_mask": dict(shape=(2, 2, 2, 11, 14, 16, 16), mask=("bool", (2, 2, 11, 14))),
    "bool_mask_bcast": dict(shape=(2, 3, 3, 11, 14, 16, 16), mask=("bool", (11, 14))),
    "add_mask_bcast": dict(shape=(2, 3, 3, 11, 14, 16, 16), mask=("add", (2, 1, 1, 14))),
    "add_mask_causal_lengths": dict(shape=(2, 2, 2, 10, 10, 16, 16), mask=("add", (2, 2, 10, 10)),
                                    causal=True, key_lengths=[10, 4]),
    "local1d_causal": dict(shape=(2, 2, 2, 45, 45, 16, 16), pattern=Local1d(8)),
    "local1d_decode": dict(shape=(1, 2, 2, 3, 45, 16, 16), pattern=Local1d(8)),
    "local1d_noncausal": dict(shape=(1, 2, 1, 37, 37, 8, 8), pattern=Local1d(6, causal=False, filter_width=3)),
    "local2d_causal": dict(shape=(1, 2, 2, 63, 63, 16, 16), pattern=Local2d(7, 9, (2, 4), (1, 2))),
    "local2d_noncausal": dict(shape=(2, 1, 1, 63, 63, 16, 16), pattern=Local2d(7, 9, 3, 2, causal=False)),
    "local2d_lengths_mask": dict(shape=(2, 2, 1, 48, 48, 16, 16), pattern=Local2d(6, 8, (2, 4), (2, 2)),
                                 key_lengths=[48, 30], mask=("bool", (48, 48))),
    "scale": dict(shape=(1, 2, 2, 9, 9, 16, 16), scale=0.3),
    "empty_queries": dict(shape=(2, 2, 2, 0, 5, 16, 16)),
    "no_keys": dict(shape=(2, 2, 2, 3, 0, 16, 16)),
    "head_dim_256": dict(shape=(1, 1, 1, 5, 7, 256, 256)),
}


def _attention_inputs(name, dtype=np.float32):
    c = ATTENTION_CASES[name]
    B, H, Hkv, Nq, Nk, D, Dv = c["shape"]
    rng = rng_for(name, dtype)
    q = randn(rng, (B, H, Nq, D), dtype)
    k, v = randn(rng, (B, Hkv, Nk, D), dtype), randn(rng, (B, Hkv, Nk, Dv), dtype)
    kw = {k_: c[k_] for k_ in ("causal", "pattern", "scale") if k_ in c}
    if "key_lengths" in c:
        kw["key_lengths"] = np.array(c["key_lengths"], dtype=c.get("kl_dtype", np.int64))
    if "mask" in c:
        kw["attn_mask"] = _mask(rng, *c["mask"])
    return q, k, v, kw


def _torch_kw(kw):
    return {k: tt(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_matches_torch(name, dtype):
    q, k, v, kw = _attention_inputs(name, dtype)
    out, lse = itx.attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = imgtx_fast.attention(tt(q), tt(k), tt(v), return_lse=True, **_torch_kw(kw))
    assert_same(out, ref_out)
    assert_same(lse, ref_lse)
    if out.size:  # (B, N, H, D) memory
        assert out.strides == tuple(s * out.itemsize for s in ref_out.stride())
    np.testing.assert_array_equal(itx.attention(q, k, v, **kw), out)


def test_attention_half_mask_in_query_dtype():
    q, k, v, kw = _attention_inputs("dense", np.float16)
    kw["attn_mask"] = _mask(rng_for("m16"), "add", (2, 3, 17, 17), np.float16)
    assert_same(itx.attention(q, k, v, **kw), imgtx_fast.attention(tt(q), tt(k), tt(v), **_torch_kw(kw)))


@pytest.mark.parametrize("layout", ["bnhd", "fused_qkv", "head_dim_step", "reversed_rows"])
def test_attention_strided_inputs(layout):
    rng = rng_for(layout)
    B, H, N, D = 2, 3, 19, 16
    if layout == "bnhd":  # (B, N, H, D) projections viewed as (B, H, N, D): no copy
        q, k, v = (randn(rng, (B, N, H, D)).transpose(0, 2, 1, 3) for _ in range(3))
    elif layout == "fused_qkv":  # one (B, N, 3, H, D) buffer
        qkv = randn(rng, (B, N, 3, H, D))
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    elif layout == "head_dim_step":  # D not contiguous: the torch op copies too
        q, k, v = (randn(rng, (B, H, N, 2 * D))[..., ::2] for _ in range(3))
    else:
        q, k, v = (randn(rng, (B, H, N, D))[:, :, ::-1] for _ in range(3))
    for kw in ({}, {"causal": True}, {"pattern": Local1d(4)}):
        out = itx.attention(q, k, v, **kw)
        assert_same(out, imgtx_fast.attention(tt(q), tt(k), tt(v), **kw))


# ---- diffusion --------------------------------------------------------------------------------
SCHEDULE_CONFIGS = [(4, 100, {}), (1, 2, {}), (1023, 100, {}),
                    (37, 17, dict(alpha_cum_start=0.9, alpha_cum_end=0.01, gamma_cum_start=0.0,
                                  gamma_cum_end=0.9))]


@pytest.mark.parametrize("K,T,kw", SCHEDULE_CONFIGS)
def test_schedule_table_is_bitwise_the_torch_one(K, T, kw):
    ours, ref = itx.MaskAndReplaceSchedule(K, T, **kw), tdiff.MaskAndReplaceSchedule(K, T, **kw)
    assert_same(ours.table, ref.table)
    assert repr(ours) == repr(ref)


@pytest.mark.parametrize("kw", [dict(num_classes=0), dict(num_classes=4, num_timesteps=1),
                                dict(num_classes=4, alpha_cum_start=1.5),
                                dict(num_classes=4, alpha_cum_end=0.0),
                                dict(num_classes=4, gamma_cum_end=1.0),
                                dict(num_classes=4, alpha_cum_start=0.5, gamma_cum_start=0.6),
                                dict(num_classes=4, alpha_cum_start=0.1, alpha_cum_end=0.5)])
def test_schedule_errors_match_torch(kw):
    with pytest.raises(ValueError) as ref:
        tdiff.MaskAndReplaceSchedule(**kw)
    with pytest.raises(ValueError) as ours:
        itx.MaskAndReplaceSchedule(**kw)
    assert str(ours.value) == str(ref.value)


def _diffusion_inputs(B, K, N, layout, rng, dtype=np.float32):
    if layout == "bkn":
        logp = randn(rng, (B, K, N), dtype, 3.0)
    else:  # diffusers' (B, N, K) buffer seen as (B, K, N): classes contiguous, no copy
        logp = randn(rng, (B, N, K), dtype, 3.0).transpose(0, 2, 1)
    x_t = rng.integers(0, K + 1, (B, N))
    x_t[rng.random((B, N)) < 0.4] = K  # plenty of MASK tokens
    return logp, x_t


DIFFUSION_SHAPES = [(1, 1, 1), (2, 5, 7), (3, 17, 33), (1, 257, 64), (2, 64, 1), (0, 5, 4), (2, 5, 0)]


@pytest.mark.parametrize("B,K,N", DIFFUSION_SHAPES)
@pytest.mark.parametrize("layout", ["bkn", "bnk"])
@pytest.mark.parametrize("extra", ["plain", "truncation", "guidance", "t_array", "t0"])
def test_posterior_matches_torch(B, K, N, layout, extra):
    rng = rng_for(B, K, N, layout, extra)
    T = 12
    ours_s, ref_s = itx.MaskAndReplaceSchedule(K, T), tdiff.MaskAndReplaceSchedule(K, T)
    logp, x_t = _diffusion_inputs(B, K, N, layout, rng)
    t, t_ref, kw = 5, 5, {}
    if extra == "truncation":
        kw = dict(truncation_rate=0.7)
    elif extra == "guidance":
        uncond = _diffusion_inputs(B, K, N, layout, rng)[0]
        kw = dict(guidance_scale=2.5, log_p_x0_uncond=uncond, truncation_rate=0.9)
    elif extra == "t_array":
        t = rng.integers(0, T, (B,))
        t_ref = tt(t)
    elif extra == "t0":
        t = t_ref = 0
    ref_kw = _torch_kw(kw)
    lp = itx.posterior_log_probs(logp, x_t, t, ours_s, **kw)
    assert_same(lp, tdiff.posterior_log_probs(tt(logp), tt(x_t), t_ref, ref_s, **ref_kw))
    gen = torch.Generator().manual_seed(B * 1000 + K * 10 + N)
    key = key_from(gen)
    sample = itx.posterior_sample(logp, x_t, t, ours_s, key, **kw)
    assert_same(sample, tdiff.posterior_sample(tt(logp), tt(x_t), t_ref, ref_s, gen, **ref_kw))


def test_posterior_half_logits_and_int32_tokens():
    rng = rng_for("half")
    B, K, N = 2, 33, 21
    logp, x_t = _diffusion_inputs(B, K, N, "bnk", rng, np.float16)
    x_t = x_t.astype(np.int32)
    s, rs = itx.MaskAndReplaceSchedule(K), tdiff.MaskAndReplaceSchedule(K)
    gen = torch.Generator().manual_seed(3)
    assert_same(itx.posterior_sample(logp, x_t, 40, s, key_from(gen)),
                tdiff.posterior_sample(tt(logp), tt(x_t), 40, rs, gen))


def test_torch_schedule_is_accepted():
    rng = rng_for("torch_sched")
    logp, x_t = _diffusion_inputs(2, 9, 5, "bkn", rng)
    rs = tdiff.MaskAndReplaceSchedule(9)
    assert_same(itx.posterior_log_probs(logp, x_t, 3, rs),
                tdiff.posterior_log_probs(tt(logp), tt(x_t), 3, rs))


@pytest.mark.parametrize("B,K,N", [(1, 1, 1), (2, 5, 7), (3, 200, 65), (0, 3, 3), (4, 7, 0)])
@pytest.mark.parametrize("strided", [False, True])
def test_q_sample_matches_torch(B, K, N, strided):
    rng = rng_for(B, K, N, strided)
    x0 = rng.integers(0, K, (B, 2 * N))
    x0 = x0[:, ::2] if strided else x0[:, :N]
    t = rng.integers(0, 100, (B,)) if B % 2 else 37
    s, rs = itx.MaskAndReplaceSchedule(K), tdiff.MaskAndReplaceSchedule(K)
    gen = torch.Generator().manual_seed(K * 7 + N)
    key = key_from(gen)
    assert_same(itx.q_sample(x0, t, s, key),
                tdiff.q_sample(tt(x0), tt(t) if isinstance(t, np.ndarray) else t, rs, gen))


def test_generators():
    rng = rng_for("gens")
    K = 50
    logp, x_t = _diffusion_inputs(4, K, 300, "bkn", rng)
    s = itx.MaskAndReplaceSchedule(K)

    def draw(g):
        return itx.posterior_sample(logp, x_t, 50, s, g)
    np.testing.assert_array_equal(draw(np.random.default_rng(7)), draw(np.random.default_rng(7)))
    assert not np.array_equal(draw(np.random.default_rng(7)), draw(np.random.default_rng(8)))
    np.testing.assert_array_equal(draw(np.random.RandomState(7)), draw(np.random.RandomState(7)))
    np.testing.assert_array_equal(draw(123), draw(123))
    np.random.seed(5)
    first = draw(None)
    np.random.seed(5)
    np.testing.assert_array_equal(draw(None), first)
    # a Generator gives the samples of the key it draws
    np.testing.assert_array_equal(draw(np.random.default_rng(9)),
                                  draw(int(np.random.default_rng(9).integers(0, 2**62))))
    with pytest.raises(TypeError, match="generator"):
        draw("seed")
    with pytest.raises(ValueError, match="generator"):
        draw(-1)
    with pytest.raises(TypeError, match="generator"):
        itx.q_sample(x_t.clip(0, K - 1), 3, s, torch.Generator())


# ---- inputs through the array protocols -------------------------------------------------------
class _InterfaceOnly:
    """An array known only by __array_interface__ (e.g. from another library)."""

    def __init__(self, a):
        self._a = a
        self.__array_interface__ = a.__array_interface__


def test_array_interface_and_dlpack_inputs():
    rng = rng_for("protocols")
    z, cb = randn(rng, (10, 8)), randn(rng, (6, 8))
    want = itx.codebook_lookup(z, cb, return_stats=True)
    for zz, cc in ((_InterfaceOnly(z), _InterfaceOnly(cb)), (torch.from_numpy(z), torch.from_numpy(cb))):
        got = itx.codebook_lookup(zz, cc, return_stats=True)
        for a, b in zip(got, want):
            assert isinstance(a, np.ndarray)
            np.testing.assert_array_equal(a, b)
    q = randn(rng, (1, 2, 5, 8))
    np.testing.assert_array_equal(itx.attention(torch.from_numpy(q), q, _InterfaceOnly(q)),
                                  itx.attention(q, q, q))


def test_bfloat16_through_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = rng_for("bf16")
    z32, cb32 = randn(rng, (10, 8)), randn(rng, (6, 8))
    z, cb = z32.astype(ml_dtypes.bfloat16), cb32.astype(ml_dtypes.bfloat16)
    zt = torch.from_numpy(z.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    ct = torch.from_numpy(cb.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    idx, _ = itx.codebook_lookup(z, cb)
    assert_same(idx, imgtx_fast.codebook_lookup(zt, ct)[0])


# ---- bad input: the torch ops' exception type, the argument named -----------------------------
def _apis():
    t = types.SimpleNamespace(codebook_lookup=imgtx_fast.codebook_lookup, attention=imgtx_fast.attention,
                              posterior_sample=tdiff.posterior_sample, q_sample=tdiff.q_sample,
                              sched=tdiff.MaskAndReplaceSchedule(5), arr=torch.from_numpy)
    n = types.SimpleNamespace(codebook_lookup=itx.codebook_lookup, attention=itx.attention,
                              posterior_sample=itx.posterior_sample, q_sample=itx.q_sample,
                              sched=itx.MaskAndReplaceSchedule(5), arr=lambda a: a)
    return {"torch": t, "numpy": n}


def _bad_inputs():
    f32 = np.ones((4, 8), np.float32)
    cb = np.ones((5, 8), np.float32)
    q = np.ones((2, 2, 6, 8), np.float32)
    k = np.ones((2, 1, 6, 8), np.float32)
    logp = np.zeros((2, 5, 3), np.float32)
    x_t = np.full((2, 3), 5)
    nan = logp.copy()
    nan[0, 1, 2] = np.nan

    def conv(api, x):
        return api.arr(x) if isinstance(x, np.ndarray) else x

    def C(*a, **kw):
        return lambda api: api.codebook_lookup(*[conv(api, x) for x in a], **kw)

    def A(*a, **kw):
        return lambda api: api.attention(*[conv(api, x) for x in a],
                                         **{n: conv(api, x) for n, x in kw.items()})

    def P(lp, xt, t=2, **kw):
        return lambda api: api.posterior_sample(conv(api, lp), conv(api, xt), conv(api, t), api.sched,
                                                **{n: conv(api, x) for n, x in kw.items()})

    def Q(x0, t=2, sched=None):
        return lambda api: api.q_sample(api.arr(x0), t, api.sched if sched is None else sched)

    qh = np.ones((2, 2, 6, 8), np.float32)
    return {
        # name: (call, exception, the argument its message must name)
        "cb_z_list": (lambda api: api.codebook_lookup([[1.0] * 8], api.arr(cb)), TypeError, "z"),
        "cb_z_float64": (C(f32.astype(np.float64), cb), TypeError, "z"),
        "cb_codebook_int": (C(f32, cb.astype(np.int32)), TypeError, "codebook"),
        "cb_codebook_1d": (C(f32, cb[0]), ValueError, "codebook"),
        "cb_codebook_empty": (C(f32, cb[:0]), ValueError, "codebook"),
        "cb_codebook_d0": (C(f32[:, :0], cb[:, :0]), ValueError, "D = 0"),
        "cb_z_dim": (C(f32[:, :7], cb), ValueError, "z"),
        "cb_z_scalar": (C(np.array(1.0, np.float32), cb), ValueError, "z"),
        "cb_metric": (C(f32, cb, metric="dot"), ValueError, "metric"),
        "cb_metric_list": (C(f32, cb, metric=["l2"]), ValueError, "metric"),
        "at_q_3d": (A(q[0], k, k), ValueError, "q"),
        "at_v_int": (A(q, k, k.astype(np.int64)), TypeError, "v"),
        "at_k_float64": (A(q, k.astype(np.float64), k), TypeError, "k"),
        "at_mixed_dtypes": (A(q, k.astype(np.float16), k.astype(np.float16)), TypeError, "dtype"),
        "at_batch": (A(q, k[:1], k[:1]), ValueError, "batch"),
        "at_kv_mismatch": (A(q, k, k[:, :, :5]), ValueError, "k and v"),
        "at_heads": (A(q[:, :1], qh, qh), ValueError, "heads"),
        "at_head_dim": (A(q, k[..., :4], k), ValueError, "head dims"),
        "at_head_dim_257": (A(np.ones((1, 1, 2, 257), np.float32), np.ones((1, 1, 2, 257), np.float32),
                              np.ones((1, 1, 2, 257), np.float32)), ValueError, "head dim"),
        "at_mask_shape": (A(q, k, k, attn_mask=np.ones((3, 6), bool)), ValueError, "attn_mask"),
        "at_mask_int": (A(q, k, k, attn_mask=np.ones((6, 6), np.int32)), TypeError, "attn_mask"),
        "at_lengths_range": (A(q, k, k, key_lengths=np.array([7, 3])), ValueError, "key_lengths"),
        "at_lengths_shape": (A(q, k, k, key_lengths=np.array([6, 3, 1])), ValueError, "key_lengths"),
        "at_lengths_float": (A(q, k, k, key_lengths=np.array([6.0, 3.0])), TypeError, "key_lengths"),
        "at_lengths_uint32": (A(q, k, k, key_lengths=np.array([6, 3], np.uint32)), TypeError, "key_lengths"),
        "at_lengths_list": (A(q, k, k, key_lengths=[6, 3]), TypeError, "key_lengths"),
        "at_causal_int": (A(q, k, k, causal=1), TypeError, "causal"),
        "at_causal_pattern": (A(q, k, k, causal=True, pattern=Local1d(4)), ValueError, "pattern"),
        "at_pattern_type": (A(q, k, k, pattern="local1d"), TypeError, "pattern"),
        "at_pattern_fit": (A(q, k, k, pattern=Local2d(2, 2)), ValueError, "Local2d"),
        "at_scale_str": (A(q, k, k, scale="0.5"), TypeError, "scale"),
        "ps_logp_float64": (P(logp.astype(np.float64), x_t), TypeError, "log_p_x0"),
        "ps_logp_2d": (P(logp[0], x_t), ValueError, "log_p_x0"),
        "ps_logp_classes": (P(logp[:, :4], x_t), ValueError, "num_classes"),
        "ps_x_t_float": (P(logp, x_t.astype(np.float32)), TypeError, "x_t"),
        "ps_x_t_bool": (P(logp, x_t > 0), TypeError, "x_t"),
        "ps_x_t_shape": (P(logp, x_t[:, :2]), ValueError, "x_t"),
        "ps_x_t_range": (P(logp, x_t + 1), ValueError, "x_t"),
        "ps_t_range": (P(logp, x_t, t=100), ValueError, "t must be"),
        "ps_t_float": (P(logp, x_t, t=2.0), TypeError, "t must be"),
        "ps_t_array_range": (P(logp, x_t, t=np.array([1, 100])), ValueError, "t must be"),
        "ps_t_array_shape": (P(logp, x_t, t=np.array([1, 2, 3])), ValueError, "t must be"),
        "ps_t_array_float": (P(logp, x_t, t=np.array([1.0, 2.0])), TypeError, "t must be"),
        "ps_truncation": (P(logp, x_t, truncation_rate=-0.1), ValueError, "truncation_rate"),
        "ps_guidance_alone": (P(logp, x_t, guidance_scale=2.0), ValueError, "guidance_scale"),
        "ps_uncond_shape": (P(logp, x_t, guidance_scale=2.0, log_p_x0_uncond=logp[:1]), ValueError,
                            "log_p_x0_uncond"),
        "ps_nan": (P(nan, x_t), ValueError, "log_p_x0"),
        "ps_generator": (P(logp, x_t, generator="seed"), TypeError, "generator"),
        "ps_sched": (lambda api: api.posterior_sample(api.arr(logp), api.arr(x_t), 2, object()),
                     TypeError, "sched"),
        "qs_x0_1d": (Q(x_t[0]), ValueError, "x0"),
        "qs_x0_float": (Q(x_t.astype(np.float32)), TypeError, "x0"),
        "qs_x0_range": (Q(x_t), ValueError, "x0"),
        "qs_t": (Q(x_t - 1, t=-1), ValueError, "t must be"),
        "qs_sched": (Q(x_t - 1, sched="linear"), TypeError, "sched"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_same_error_as_torch(case):
    call, exc, word = _bad_inputs()[case]
    apis = _apis()
    with pytest.raises(exc) as ref:
        call(apis["torch"])
    with pytest.raises(exc) as ours:
        call(apis["numpy"])
    assert type(ours.value) is type(ref.value)
    assert word in str(ref.value) and word in str(ours.value), (str(ref.value), str(ours.value))
    op = str(ref.value).split(":")[0]
    assert str(ours.value).startswith(op + ":"), (str(ref.value), str(ours.value))


def test_non_array_inputs_name_the_argument():
    q = np.ones((1, 1, 2, 4), np.float32)
    with pytest.raises(TypeError, match=r"attention: k must be a numpy.ndarray"):
        itx.attention(q, "k", q)
    with pytest.raises(TypeError, match=r"codebook_lookup: codebook must be a numpy.ndarray"):
        itx.codebook_lookup(q[0, 0], None)


def test_threads_setting():
    with pytest.raises(ValueError, match="set_num_threads"):
        itx.set_num_threads(0)
    itx.set_num_threads(1)
    assert itx.get_num_threads() == 1
    q, k, v, kw = _attention_inputs("local2d_causal")
    assert_same(itx.attention(q, k, v, **kw), imgtx_fast.attention(tt(q), tt(k), tt(v), **_torch_kw(kw)))
