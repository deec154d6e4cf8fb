"""codebook_lookup against its float64 reference: exactness, outputs, layouts, dtypes, errors."""
import threading

import pytest
import torch

from imgtx_fast import _C, backend, codebook_lookup
from imgtx_fast.reference.codebook import codebook_lookup as reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def float64_distances(z, codebook, metric):
    z = z.reshape(-1, codebook.shape[1]).double()
    c = codebook.double()
    if metric == "cosine":
        return -(z @ torch.nn.functional.normalize(c, dim=1, eps=1e-12).T)
    return torch.cdist(z, c) ** 2


def assert_exact_argmin(z, codebook, indices, metric, rel=1e-6):
    """The chosen code is the float64 argmin, except on ties within `rel`."""
    dist = float64_distances(z, codebook, metric)
    got = dist.gather(1, indices.reshape(-1, 1)).squeeze(1)
    best = dist.min(1).values
    slack = rel * best.abs().clamp_min(1e-30) + (1e-12 if metric == "cosine" else 0.0)
    bad = got > best + slack
    assert not bad.any(), f"{int(bad.sum())} rows are not the argmin, e.g. row {int(bad.nonzero()[0])}"


def check_outputs(z, codebook, metric="l2"):
    out = codebook_lookup(z, codebook, metric=metric, return_stats=True)
    ref = reference(z, codebook, metric)
    assert out.indices.shape == z.shape[:-1] and out.indices.dtype == torch.int64
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    assert_exact_argmin(z, codebook, out.indices, metric)
    # Where the index matches the reference, every other output must match it too.
    same = out.indices == ref[0]
    assert same.float().mean() > 0.999
    torch.testing.assert_close(out.quantized[same], ref[1][same], rtol=0, atol=0)
    torch.testing.assert_close(out.sqdist[same], ref[2][same], rtol=1e-5, atol=1e-6)
    assert torch.equal(out.counts, torch.bincount(out.indices.reshape(-1), minlength=codebook.shape[0]))
    return out


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize(
    "n,k,d",
    [(1, 1, 1), (1, 7, 3), (5, 16, 16), (6, 17, 5), (37, 100, 31), (97, 333, 64), (200, 1000, 130),
     (300, 129, 257)],
)
def test_matches_float64_reference(cpu_isa, n, k, d, metric):
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + d)
    z = torch.randn(n, d, generator=g)
    c = torch.randn(k, d, generator=g)
    check_outputs(z, c, metric)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cb_dtype", DTYPES)
def test_dtypes(cpu_isa, dtype, cb_dtype):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 41, 24, generator=g).to(dtype)
    c = torch.randn(70, 24, generator=g).to(cb_dtype)
    out = check_outputs(z, c)
    assert out.quantized.dtype == dtype


def test_trained_codebook_regime_is_exact(cpu_isa):
    """Latents sitting close to large codes: |c|^2 - 2 z.c cancels badly in fp32, so a plain
    fp32 GEMM-form argmin picks wrong codes; the certified kernel must not."""
    g = torch.Generator().manual_seed(3)
    c = 100.0 + 0.05 * torch.randn(512, 32, generator=g)  # large common offset, close codes
    z = c[torch.randint(0, 512, (2000,), generator=g)] + 0.03 * torch.randn(2000, 32, generator=g)
    fp32_formula = ((z * z).sum(1, keepdim=True) - 2 * z @ c.T + (c * c).sum(1)).argmin(1)
    exact = float64_distances(z, c, "l2").argmin(1)
    assert (fp32_formula != exact).any(), "test data no longer stresses fp32 cancellation"
    check_outputs(z, c)


def test_ties_go_to_lowest_index(cpu_isa):
    c = torch.randn(40, 8)
    c = torch.cat([c, c, c])  # every code appears three times
    z = c[torch.randint(0, 40, (300,))] + 0.01 * torch.randn(300, 8)
    out = codebook_lookup(z, c)[0]
    assert (out < 40).all()
    assert torch.equal(out, reference(z, c)[0])


def test_leading_shapes_and_strides(cpu_isa):
    g = torch.Generator().manual_seed(11)
    c = torch.randn(50, 12, generator=g)
    x = torch.randn(2, 12, 5, 7, generator=g)
    views = {
        "bchw->bhwc": x.permute(0, 2, 3, 1),       # two-level rows, strided dim
        "column slice": torch.randn(30, 36, generator=g)[:, 12:24],
        "transposed": torch.randn(12, 30, generator=g).T,
        "3 levels": torch.randn(4, 3, 5, 12, generator=g)[:, :, ::2],  # needs a copy
        "1-D": torch.randn(12, generator=g),
        "expanded": torch.randn(1, 12, generator=g).expand(9, 12),
        "broadcast along dim": torch.randn(7, 1, generator=g).expand(7, 12),  # stride 0
    }
    for name, z in views.items():
        out = codebook_lookup(z, c, return_stats=True)
        ref = reference(z.contiguous(), c)
        assert torch.equal(out.indices, ref[0]), name
        assert torch.equal(out.quantized, ref[1]), name


def test_empty_input():
    c = torch.randn(10, 4)
    idx, q = codebook_lookup(torch.randn(0, 4), c)
    assert idx.shape == (0,) and q.shape == (0, 4)
    idx, q = codebook_lookup(torch.randn(3, 0, 4), c)
    assert idx.shape == (3, 0)


def test_non_finite_values_documented(cpu_isa):
    c = torch.randn(20, 6)
    c[3, 2] = float("nan")
    c[5, 0] = float("inf")
    z = torch.randn(10, 6)
    z[0, 1] = float("nan")
    z[1, 4] = float("-inf")
    z[2] = c[3].nan_to_num(0.0)  # nearest would be the NaN code: it must never be picked
    z[3] = c[5].nan_to_num(0.0, posinf=0.0)
    out = codebook_lookup(z, c, return_stats=True)
    assert out.indices[0] == 0 and out.indices[1] == 0  # rows with NaN/Inf get index 0
    assert not ({3, 5} & set(out.indices.tolist()))
    assert torch.equal(out.indices, reference(z, c)[0])
    all_bad = torch.full((4, 6), float("nan"))
    assert codebook_lookup(z, all_bad)[0].eq(0).all()


@pytest.mark.parametrize(
    "z,cb,exc,words",
    [
        (torch.randn(4, 8).int(), torch.randn(5, 8), TypeError, "z must be float32"),
        (torch.randn(4, 8), torch.randn(5, 8).bool(), TypeError, "codebook must be float32"),
        (torch.randn(4, 8).double(), torch.randn(5, 8), TypeError, "z must be float32"),
        (torch.randn(4, 8), torch.randn(5, 7), ValueError, "D = 7"),
        (torch.randn(4, 8), torch.randn(40), ValueError, "codebook must be 2-D"),
        (torch.randn(4, 8), torch.randn(0, 8), ValueError, "K = 0"),
        (torch.tensor(1.0), torch.randn(5, 1), ValueError, "z must have shape"),
        ([1.0, 2.0], torch.randn(5, 2), TypeError, "z must be a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(z, cb, exc, words):
    with pytest.raises(exc, match=words):
        codebook_lookup(z, cb)
    if isinstance(z, torch.Tensor):  # a non-tensor is rejected by torch's dispatcher itself
        with pytest.raises(exc, match=words):
            torch.ops.imgtx.codebook_lookup(z, cb, "l2")


def test_bad_metric_and_device():
    with pytest.raises(ValueError, match="metric"):
        codebook_lookup(torch.randn(2, 3), torch.randn(4, 3), metric="l1")
    with pytest.raises(ValueError, match="device"):
        codebook_lookup(torch.randn(2, 3), torch.randn(4, 3, device="meta"))


def test_too_many_codes_is_rejected_without_allocating():
    huge = torch.zeros(1, 2).expand(2**31, 2)  # stride 0: no memory
    with pytest.raises(ValueError, match="2\\^31"):
        codebook_lookup(torch.randn(3, 2), huge)


def test_threads_setting_is_respected_and_results_identical(cpu_isa):
    z, c = torch.randn(700, 48), torch.randn(900, 48)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(codebook_lookup(z, c, return_stats=True))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


def test_concurrent_calls_from_python_threads():
    g = torch.Generator().manual_seed(5)
    jobs = [(torch.randn(400, 32, generator=g), torch.randn(300, 32, generator=g)) for _ in range(6)]
    expected = [reference(z, c)[0] for z, c in jobs]
    got = [None] * len(jobs)

    def work(i):
        for _ in range(3):
            got[i] = codebook_lookup(*jobs[i])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g_ in zip(expected, got):
        assert torch.equal(e, g_)


def test_reference_backend_switch():
    z, c = torch.randn(50, 16), torch.randn(64, 16)
    fast = codebook_lookup(z, c, return_stats=True)
    with backend("reference"):
        ref = codebook_lookup(z, c, return_stats=True)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b)


def test_many_shapes_hypothesis(cpu_isa):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(n=st.integers(1, 70), k=st.integers(1, 90), d=st.integers(1, 40),
                      seed=st.integers(0, 2**31), cosine=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 1e3]))
    def run(n, k, d, seed, cosine, scale):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, d, generator=g) * scale
        c = torch.randn(k, d, generator=g) * scale
        check_outputs(z, c, "cosine" if cosine else "l2")

    run()


def test_uncertified_rows_are_rechecked_exactly(cpu_isa):
    """Near-ties the fp32 pass cannot separate go through the float64 candidate re-check, and
    rows whose scores could overflow fp32 through the full float64 re-search; both exact."""
    g = torch.Generator().manual_seed(9)
    c = torch.randn(300, 16, generator=g)
    z = (c[:200] + c[100:300]) / 2 + 1e-7 * torch.randn(200, 16, generator=g)  # midpoints
    _C.reset_codebook_counters()
    check_outputs(z, c)
    counters = _C.codebook_counters()
    assert counters["rows_rechecked"] > 0, counters
    assert counters["rows_full_search"] == 0, counters

    big = torch.randn(40, 8, generator=g) * 1e18  # |c|^2 ~ 1e37: fp32 scores may overflow
    zb = big[:30] + 1e16 * torch.randn(30, 8, generator=g)
    _C.reset_codebook_counters()
    check_outputs(zb, big)
    assert _C.codebook_counters()["rows_full_search"] == 30


def test_tiny_values_are_exact(cpu_isa):
    """Subnormal-range scores: the error bound's absolute term keeps certification honest."""
    g = torch.Generator().manual_seed(10)
    c = torch.randn(64, 8, generator=g) * 1e-21
    z = c[torch.randint(0, 64, (100,), generator=g)] + 1e-22 * torch.randn(100, 8, generator=g)
    check_outputs(z, c)
