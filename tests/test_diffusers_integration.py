"""imgtx_fast.integrations.diffusers: the fused VQ-Diffusion scheduler and pipeline against
diffusers' own VQDiffusionScheduler / VQDiffusionPipeline.

Sampling is checked by distribution (chi-square against the exact posterior, float64), not by
bits: our kernel draws from Philox, diffusers from torch.rand + Gumbel. The pipeline tests
build a tiny VQ-Diffusion pipeline in memory (no download); they need `transformers` too.
"""
import json
import os
import subprocess
import tempfile
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import VQDiffusionScheduler  # noqa: E402
from diffusers.schedulers.scheduling_vq_diffusion import VQDiffusionSchedulerOutput  # noqa: E402

from imgtx_fast.integrations.diffusers import (  # noqa: E402
    FastVQDiffusionScheduler,
    fast_pipeline,
    use_fast_scheduler,
)

K = 7                      # real classes; MASK = K
N = 200_000                # tokens per sampling call (one distribution broadcast by expand)
P_MIN = 1e-4               # smallest p-value accepted per test (the seeds are fixed)

SCHEDULES = {
    # diffusers' defaults: nearly absorbing-mask (B_t ~ 1e-6 / K)
    "default": (dict(num_train_timesteps=100), (0, 1, 50, 99)),
    # a short schedule with a large "replace" part, so every class of the posterior matters
    "wide": (dict(num_train_timesteps=10, alpha_cum_end=0.3, gamma_cum_end=0.5), (0, 1, 5, 9)),
}


def make_stock(name):
    return VQDiffusionScheduler(num_vec_classes=K + 1, **SCHEDULES[name][0])


def schedule_timesteps():
    return [(name, t) for name, (_, ts) in SCHEDULES.items() for t in ts]


# ------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------
def chi2_sf(stat: float, df: int) -> float:
    try:
        from scipy.stats import chi2
        return float(chi2.sf(stat, df))
    except ImportError:  # the regularised upper incomplete gamma is the chi-square tail
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))


def poisson_at_least(k: int, lam: float) -> float:
    """P(X >= k) for X ~ Poisson(lam), k >= 1."""
    return float(torch.special.gammainc(torch.tensor(float(k), dtype=torch.float64),
                                        torch.tensor(lam, dtype=torch.float64)))


def check_counts(counts, probs, what: str) -> None:
    """counts (K+1,) of samples against probabilities (K+1,) (float64, any scale).

    Impossible classes (probability exactly 0) must never be drawn. Cells with expected count
    < 5 are pooled; a pooled cell still under 5 is checked alone with an exact Poisson tail (so
    mass leaking onto nearly impossible classes is caught) and then merged into the largest
    cell for the chi-square test over the rest.
    """
    counts = counts.to(torch.float64)
    probs = probs.to(torch.float64)
    n = float(counts.sum())
    assert torch.isfinite(probs).all() and float(probs.sum()) > 0, what
    impossible = probs == 0
    assert counts[impossible].sum() == 0, \
        f"{what}: drew impossible classes {impossible.nonzero().flatten().tolist()}: {counts.tolist()}"
    expected = n * probs / probs.sum()
    small = (expected < 5) & ~impossible
    big = ~small & ~impossible
    obs_cells, exp_cells = list(counts[big]), list(expected[big])
    if small.any():
        o, e = float(counts[small].sum()), float(expected[small].sum())
        if e >= 5:
            obs_cells.append(o)
            exp_cells.append(e)
        else:
            if o > 0:
                p = poisson_at_least(int(o), e)
                assert p > P_MIN, (f"{what}: {o:.0f} draws on classes with {e:.3g} expected "
                                   f"(P = {p:.2e}); counts {counts.tolist()}, expected {expected.tolist()}")
            i = int(torch.stack(exp_cells).argmax())
            obs_cells[i] = obs_cells[i] + o
            exp_cells[i] = exp_cells[i] + e
    obs, exp = torch.tensor([float(v) for v in obs_cells]), torch.tensor([float(v) for v in exp_cells])
    df = len(obs) - 1
    if df == 0:
        return
    stat = float(((obs - exp) ** 2 / exp).sum())
    p = chi2_sf(stat, df)
    assert p > P_MIN, (f"{what}: chi2 = {stat:.1f} with {df} dof, p = {p:.2e}; "
                       f"counts {counts.tolist()}, expected {[round(v, 1) for v in expected.tolist()]}")


# ------------------------------------------------------------------------------------------
# inputs and reference distributions
# ------------------------------------------------------------------------------------------
def fixed_log_p(seed: int, spread: float = 1.5) -> torch.Tensor:
    """(K,) float64 normalised log-probabilities with distinct values."""
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64) * spread, dim=0)


def broadcast(log_p: torch.Tensor, layout: str = "bkn") -> torch.Tensor:
    """One token's (K,) distribution as a (1, K, N) float32 view without a copy: stride 0
    over tokens, either class-strided ("bkn") or a permuted (1, N, K) view ("bnk")."""
    v = log_p.float()
    if layout == "bkn":
        return v.view(1, K, 1).expand(1, K, N)
    return v.view(1, 1, K).expand(1, N, K).permute(0, 2, 1)


def x_t_groups(log_p: torch.Tensor):
    """x_t: half MASK, a quarter the most likely class, a quarter the least likely one.
    Returns x_t (1, N) and the group values."""
    top, low = int(log_p.argmax()), int(log_p.argmin())
    x = torch.full((1, N), K, dtype=torch.int64)
    x[:, N // 2: 3 * N // 4] = top
    x[:, 3 * N // 4:] = low
    return x, (K, top, low)


def reference_probs(stock: VQDiffusionScheduler, log_p: torch.Tensor, values, t: int) -> torch.Tensor:
    """(K+1, G) float64: the exact distribution of diffusers' step for a token whose x_t is
    each of `values`, given (K,) log p(x0 | x_t) (already guided / truncated / clamped)."""
    G = len(values)
    lp = log_p.to(torch.float64).view(1, K, 1).expand(1, K, G)
    if t == 0:  # diffusers samples model_output itself at t = 0 (never MASK)
        logits = torch.cat([lp, torch.full((1, 1, G), -torch.inf, dtype=torch.float64)], dim=1)
    else:
        x = torch.tensor([values], dtype=torch.int64)
        logits = stock.q_posterior(lp, x, t).to(torch.float64)
    return torch.softmax(logits[0], dim=0)


def counts_by_x_t(samples: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """(K+1, K+1): row v counts the samples of the tokens whose x_t is v (one pass)."""
    assert samples.shape == x_t.shape and samples.dtype == torch.int64
    assert 0 <= int(samples.min()) and int(samples.max()) <= K
    return torch.bincount((x_t * (K + 1) + samples).flatten(), minlength=(K + 1) ** 2).view(K + 1, K + 1)


def truncate(log_p_x_0: torch.Tensor, truncation_rate: float) -> torch.Tensor:
    """VQDiffusionPipeline.truncate, copied so this reference needs no transformers."""
    sorted_log_p_x_0, indices = torch.sort(log_p_x_0, 1, descending=True)
    sorted_p_x_0 = torch.exp(sorted_log_p_x_0)
    keep_mask = sorted_p_x_0.cumsum(dim=1) < truncation_rate
    all_true = torch.full_like(keep_mask[:, 0:1, :], True)
    keep_mask = torch.cat((all_true, keep_mask), dim=1)
    keep_mask = keep_mask[:, :-1, :]
    keep_mask = keep_mask.gather(1, indices.argsort(1))
    rv = log_p_x_0.clone()
    rv[~keep_mask] = -torch.inf
    return rv


def pipeline_sequence(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale, truncation_rate):
    """The per-step sequence of VQDiffusionPipeline.__call__ before scheduler.step, in float64:
    guidance, renormalisation, truncate, clamp(-70). (K,) in, (K,) out."""
    out = cond.to(torch.float64).view(1, K, 1)
    if guidance_scale is not None and guidance_scale > 1.0:
        u = uncond.to(torch.float64).view(1, K, 1)
        out = u + guidance_scale * (out - u)
        out = out - torch.logsumexp(out, dim=1, keepdim=True)
    out = truncate(out, truncation_rate)
    return out.clamp(-70).view(K)


def mid_truncation_rate(log_p: torch.Tensor, keep: int) -> float:
    """A rate halfway between two cumulative sums, so that exactly `keep` classes stay and no
    float rounding can change the set."""
    cs = torch.exp(log_p - torch.logsumexp(log_p, 0)).sort(descending=True).values.cumsum(0)
    return float(cs[keep - 2] + cs[keep - 1]) / 2


# ------------------------------------------------------------------------------------------
# scheduler
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_matches_diffusers_tables(name):
    stock = make_stock(name)
    fast = FastVQDiffusionScheduler.from_config(stock.config)
    sched = fast._imgtx_schedule
    T = stock.config.num_train_timesteps
    assert (sched.num_classes, sched.num_timesteps) == (K, T)
    for ours, theirs in ((sched.A, stock.log_cumprod_at), (sched.B, stock.log_cumprod_bt),
                         (sched.C, stock.log_cumprod_ct)):
        torch.testing.assert_close(ours, theirs[:T].double().exp(), rtol=1e-5, atol=0)
    # one-step (a, b, c) are columns 0..2 of the kernels' table
    for col, theirs in enumerate((stock.log_at, stock.log_bt, stock.log_ct)):
        torch.testing.assert_close(sched.table[1:, col], theirs[1:T].double().exp(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name,t", schedule_timesteps())
def test_step_distribution_matches_stock(name, t):
    stock = make_stock(name)
    fast = FastVQDiffusionScheduler.from_config(stock.config)
    log_p = fixed_log_p(seed=10 + t)
    x_t, values = x_t_groups(log_p)
    model_output = broadcast(log_p)
    ref = reference_probs(stock, log_p, values, t)

    g = torch.Generator().manual_seed(1000 + t)
    ours = fast.step(model_output, torch.tensor(t), x_t, generator=g)
    assert isinstance(ours, VQDiffusionSchedulerOutput)
    ours = ours.prev_sample
    assert ours.shape == (1, N) and ours.dtype == torch.int64
    theirs = stock.step(model_output, torch.tensor(t), x_t,
                        generator=torch.Generator().manual_seed(2000 + t)).prev_sample
    ours, theirs = counts_by_x_t(ours, x_t), counts_by_x_t(theirs, x_t)
    for i, v in enumerate(values):
        check_counts(theirs[v], ref[:, i], f"stock step, {name} t={t} x_t={v}")
        check_counts(ours[v], ref[:, i], f"fast step, {name} t={t} x_t={v}")


# (guidance_scale, truncation: None = no truncation (rate 1), else number of classes kept, layout)
GUIDED_CASES = [(3.0, 3, "bnk"), (None, 4, "bkn"), (1.0, None, "bnk"), (2.5, None, "bkn")]


@pytest.mark.parametrize("name,t", schedule_timesteps())
def test_step_guided_matches_pipeline_sequence(name, t):
    stock = make_stock(name)
    fast = FastVQDiffusionScheduler.from_config(stock.config)
    cond, uncond = fixed_log_p(seed=20 + t), fixed_log_p(seed=30 + t, spread=0.7)
    for case, (scale, keep, layout) in enumerate(GUIDED_CASES):
        guided = pipeline_sequence(cond, uncond, scale, 1.0)  # the distribution truncation sees
        rate = 1.0 if keep is None else mid_truncation_rate(guided, keep)
        log_p = pipeline_sequence(cond, uncond, scale, rate)
        if keep is not None:
            assert int(torch.isfinite(truncate(guided.view(1, K, 1), rate)).sum()) == keep
        x_t, values = x_t_groups(log_p)
        ref = reference_probs(stock, log_p, values, t)
        g = torch.Generator().manual_seed(3000 + 10 * t + case)
        out = fast.step_guided(broadcast(cond, layout), broadcast(uncond, layout), t, x_t,
                               guidance_scale=scale, truncation_rate=rate, generator=g)
        assert isinstance(out, VQDiffusionSchedulerOutput)
        counts = counts_by_x_t(out.prev_sample, x_t)
        for i, v in enumerate(values):
            check_counts(counts[v], ref[:, i],
                         f"step_guided(s={scale}, r={rate:.4f}), {name} t={t} x_t={v}")


def test_step_guided_without_uncond():
    fast = FastVQDiffusionScheduler(num_vec_classes=K + 1)
    x = torch.full((2, 16), K)
    lp = torch.log_softmax(torch.randn(2, K, 16), dim=1)
    for s in (None, 0.5, 1.0):
        (out,) = fast.step_guided(lp, None, 3, x, guidance_scale=s, return_dict=False,
                                  generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 16)
    with pytest.raises(ValueError, match="model_output_uncond"):
        fast.step_guided(lp, None, 3, x, guidance_scale=2.0)
    # a rate >= 1 keeps every class (the pipeline accepts any such rate)
    ref = fast.step(lp, 3, x, generator=torch.Generator().manual_seed(0)).prev_sample
    for r in (1.0, 1.5, None):
        out = fast.step_guided(lp, None, 3, x, guidance_scale=None, truncation_rate=r,
                               generator=torch.Generator().manual_seed(0)).prev_sample
        assert torch.equal(out, ref)
    # a rate <= 0 (NaN too) keeps only the most likely class, as diffusers' truncate: at t = 0
    # the sample is then the argmax, whatever the seed
    top = fast.step_guided(lp, None, 0, x, guidance_scale=None, truncation_rate=0.0,
                           generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(top, lp.argmax(1))
    zero = fast.step_guided(lp, None, 3, x, guidance_scale=None, truncation_rate=0.0,
                            generator=torch.Generator().manual_seed(1)).prev_sample
    for r in (-0.5, float("nan")):
        out = fast.step_guided(lp, None, 3, x, guidance_scale=None, truncation_rate=r,
                               generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.equal(out, zero), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_truncation_rate_keeps_diffusers_top_class(dtype):
    """truncation_rate = 0 through the whole pipeline sequence: guidance, renormalisation,
    diffusers' own truncate (which keeps only its first sorted class), clamp, step at t = 0 is
    deterministic, so fast and stock samples are equal token for token. The logits sit on a
    coarse grid, so fp16/bf16 (and float32) ties are everywhere: both keep the lowest index."""
    from imgtx_fast.integrations.diffusers import _VQDiffusionPipeline as pipeline

    if pipeline is None:
        pytest.skip("diffusers' VQDiffusionPipeline needs transformers")
    stock = make_stock("wide")
    fast = FastVQDiffusionScheduler.from_config(stock.config)
    g = torch.Generator().manual_seed(8)
    cond = (torch.randint(-3, 2, (2, K, 300), generator=g).float() * 0.5).to(dtype)
    uncond = (torch.randint(-3, 2, (2, K, 300), generator=g).float() * 0.5).to(dtype)
    x = torch.full((2, 300), K)
    for scale in (None, 2.0):
        guided = cond if scale is None else uncond + scale * (cond - uncond)
        guided = guided - torch.logsumexp(guided, dim=1, keepdim=True)
        want = stock.step(pipeline.truncate(None, guided, 0.0).clamp(-70), 0, x,
                          generator=torch.Generator().manual_seed(0)).prev_sample
        got = fast.step_guided(cond, uncond, 0, x, guidance_scale=scale, truncation_rate=0.0,
                               generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.equal(got, want), scale
        assert bool((guided == guided.amax(1, keepdim=True)).sum(1).gt(1).any())  # ties present


def test_step_determinism_and_timestep_types():
    fast = FastVQDiffusionScheduler(num_vec_classes=K + 1)
    g = torch.Generator().manual_seed(5)
    lp = torch.log_softmax(torch.randn(3, K, 257, generator=g), dim=1)
    x = torch.randint(0, K + 1, (3, 257), generator=g)

    def run(t, seed, **kw):
        return fast.step(lp, t, x, generator=torch.Generator().manual_seed(seed), **kw)

    a = run(40, 0).prev_sample
    assert a.shape == (3, 257) and a.dtype == torch.int64
    assert 0 <= int(a.min()) and int(a.max()) <= K
    for t in (torch.tensor(40), np.int64(40), torch.tensor(40, dtype=torch.int32)):
        assert torch.equal(run(t, 0).prev_sample, a)
    (b,) = run(40, 0, return_dict=False)
    assert torch.equal(a, b)
    # float64 log-probs (which diffusers' step takes) are read as float32
    assert torch.equal(fast.step(lp.double(), 40, x, generator=torch.Generator().manual_seed(0)).prev_sample, a)
    assert not torch.equal(run(40, 1).prev_sample, a)
    # a one-element list (what the pipeline may pass) is the generator itself
    assert torch.equal(fast.step(lp, 40, x, generator=[torch.Generator().manual_seed(0)]).prev_sample, a)
    # no generator: torch's default generator, so torch.manual_seed reproduces
    torch.manual_seed(123)
    c = fast.step(lp, 40, x).prev_sample
    torch.manual_seed(123)
    assert torch.equal(fast.step(lp, 40, x).prev_sample, c)
    # t = 0 samples log p(x0 | x_t) itself: never MASK
    z = run(0, 0).prev_sample
    assert int(z.max()) < K
    # step_guided with no guidance / truncation is step
    same = fast.step_guided(lp, None, 40, x, guidance_scale=None,
                            generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.equal(same, a)


def test_config_round_trip(tmp_path):
    # positional num_vec_classes: diffusers itself records it under `_use_default_values`
    # (its own from_config of this config fails); ours must still take it
    for stock in (VQDiffusionScheduler(K + 1, 10), make_stock("wide")):
        fast = FastVQDiffusionScheduler.from_config(stock.config)
        assert isinstance(fast, VQDiffusionScheduler)
        for k in ("num_vec_classes", "num_train_timesteps", "alpha_cum_start", "alpha_cum_end",
                  "gamma_cum_start", "gamma_cum_end"):
            assert fast.config[k] == stock.config[k], k
    assert fast._imgtx_schedule.num_timesteps == 10
    fast.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "FastVQDiffusionScheduler"
    loaded = FastVQDiffusionScheduler.from_pretrained(tmp_path)
    back = VQDiffusionScheduler.from_pretrained(tmp_path)  # still loads as the stock one
    for sch in (loaded, back):
        assert {k: v for k, v in sch.config.items() if not k.startswith("_")} == \
               {k: v for k, v in fast.config.items() if not k.startswith("_")}
    torch.testing.assert_close(loaded._imgtx_schedule.table, fast._imgtx_schedule.table)

    # saved as a pipeline component, it is found again by diffusers' pipeline loader
    from diffusers import DiffusionPipeline

    class SchedulerOnly(DiffusionPipeline):
        def __init__(self, scheduler):
            super().__init__()
            self.register_modules(scheduler=scheduler)

    SchedulerOnly(fast).save_pretrained(tmp_path / "pipe")
    reloaded = SchedulerOnly.from_pretrained(tmp_path / "pipe").scheduler
    assert type(reloaded) is FastVQDiffusionScheduler
    assert reloaded.config.num_train_timesteps == 10


def test_optional_imports():
    """import imgtx_fast(.integrations) imports no diffusers; missing diffusers gives a clear
    ImportError; missing transformers leaves the scheduler usable."""
    code = r"""
import sys
import imgtx_fast, imgtx_fast.integrations
assert "diffusers" not in sys.modules
sys.modules["diffusers"] = None
try:
    import imgtx_fast.integrations.diffusers
except ImportError as e:
    assert "pip install imgtx_fast[diffusers]" in str(e), e
else:
    raise AssertionError("no ImportError without diffusers")
del sys.modules["diffusers"]
sys.modules["transformers"] = None
from imgtx_fast.integrations.diffusers import FastVQDiffusionScheduler, fast_pipeline
FastVQDiffusionScheduler(num_vec_classes=5)
try:
    from imgtx_fast.integrations.diffusers import FastVQDiffusionPipeline
except ImportError as e:
    assert "transformers" in str(e), e
else:
    raise AssertionError("FastVQDiffusionPipeline without transformers")
print("ok")
"""
    env = dict(os.environ)
    # cwd outside the checkout: a source tree (no compiled _C) must not shadow the install
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env, cwd=tempfile.gettempdir())
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


# ------------------------------------------------------------------------------------------
# tiny pipeline (needs transformers)
# ------------------------------------------------------------------------------------------
TINY_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>",
              "t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>",
              "<|startoftext|>", "<|endoftext|>"]
MAX_LEN = 8          # tokenizer.model_max_length
SIDE = 4             # latent side: N = 16 latent pixels
PK = 15              # codebook size of the tiny pipeline


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    pytest.importorskip("transformers")
    from diffusers import Transformer2DModel, VQModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    try:
        from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
            LearnedClassifierFreeSamplingEmbeddings, VQDiffusionPipeline)
    except ImportError:
        from diffusers.pipelines.vq_diffusion.pipeline_vq_diffusion import (
            LearnedClassifierFreeSamplingEmbeddings, VQDiffusionPipeline)

    tok_dir = tmp_path_factory.mktemp("tiny_clip_tokenizer")
    (tok_dir / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(TINY_VOCAB)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_LEN)

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(TINY_VOCAB), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_LEN, bos_token_id=21, eos_token_id=22,
        pad_token_id=22))
    vqvae = VQModel(block_out_channels=(32,), in_channels=3, out_channels=3, layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                    latent_channels=4, num_vq_embeddings=PK, vq_embed_dim=4)
    transformer = Transformer2DModel(
        num_vector_embeds=PK + 1, sample_size=SIDE, num_attention_heads=2, attention_head_dim=16,
        num_layers=1, cross_attention_dim=32, attention_bias=True, norm_type="ada_norm",
        num_embeds_ada_norm=10, norm_num_groups=32, activation_fn="geglu-approximate")
    scheduler = VQDiffusionScheduler(num_vec_classes=PK + 1, num_train_timesteps=10)
    embeddings = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=32, length=MAX_LEN)
    with torch.no_grad():
        embeddings.embeddings.normal_()
    pipe = VQDiffusionPipeline(vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer,
                               transformer=transformer, scheduler=scheduler,
                               learned_classifier_free_sampling_embeddings=embeddings)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_images(images, n):
    assert isinstance(images, np.ndarray) and images.shape == (n, SIDE, SIDE, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_stock_pipeline_with_fast_scheduler(tiny_pipe):
    stock_scheduler = tiny_pipe.scheduler
    try:
        use_fast_scheduler(tiny_pipe)
        assert isinstance(tiny_pipe.scheduler, FastVQDiffusionScheduler)
        seen = []
        out = tiny_pipe("low", num_inference_steps=4, guidance_scale=3.0, output_type="np",
                        generator=torch.Generator().manual_seed(0),
                        callback=lambda i, t, s: seen.append(s.clone()))
        _check_images(out.images, 1)
        assert len(seen) == 4 and int(seen[-1].max()) < PK  # x0 has no MASK left
        tiny_pipe.scheduler = FastVQDiffusionScheduler.from_config(stock_scheduler.config)
        (images,) = tiny_pipe(["low", "newer"], num_inference_steps=3, guidance_scale=1.0,
                              output_type="np", return_dict=False)
        _check_images(images, 2)
    finally:
        tiny_pipe.scheduler = stock_scheduler


def test_fast_pipeline(tiny_pipe):
    from imgtx_fast.integrations.diffusers import FastVQDiffusionPipeline

    fast = fast_pipeline(tiny_pipe)
    assert isinstance(fast, FastVQDiffusionPipeline)
    assert isinstance(fast.scheduler, FastVQDiffusionScheduler)
    assert not isinstance(tiny_pipe.scheduler, FastVQDiffusionScheduler)  # the original is untouched
    assert fast.transformer is tiny_pipe.transformer

    def run(**kw):
        seen = []
        out = fast("low newer", num_inference_steps=5, output_type="np",
                   callback=lambda i, t, s: seen.append(s.clone()), **kw)
        return out, seen

    out, seen = run(guidance_scale=4.0, truncation_rate=0.7, generator=torch.Generator().manual_seed(1))
    _check_images(out.images, 1)
    assert len(seen) == 5 and all(s.shape == (1, SIDE * SIDE) for s in seen)
    assert int(seen[-1].max()) < PK
    out2, seen2 = run(guidance_scale=4.0, truncation_rate=0.7, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(seen, seen2))  # same seed, same chain
    np.testing.assert_array_equal(out.images, out2.images)

    # no guidance, truncation, several images per prompt, tuple output, user latents
    latents = torch.full((2, SIDE * SIDE), PK)
    latents[:, :5] = 3
    (images,) = fast(["low"], num_inference_steps=3, guidance_scale=1.0, truncation_rate=0.9,
                     num_images_per_prompt=2, latents=latents, output_type="np", return_dict=False)
    _check_images(images, 2)
    with pytest.raises(ValueError, match="latents"):
        fast("low", num_inference_steps=2, latents=torch.full((1, 3), PK), output_type="np")

    # a plain scheduler handed to the constructor, or swapped in later, is converted
    components = dict(tiny_pipe.components)
    assert type(components["scheduler"]) is VQDiffusionScheduler
    direct = FastVQDiffusionPipeline(**components)
    assert isinstance(direct.scheduler, FastVQDiffusionScheduler)
    direct.set_progress_bar_config(disable=True)
    direct.scheduler = VQDiffusionScheduler.from_config(tiny_pipe.scheduler.config)
    out = direct("low", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    _check_images(out.images, 1)
    assert isinstance(direct.scheduler, FastVQDiffusionScheduler)


def test_fast_pipeline_zero_truncation_rate_matches_stock(tiny_pipe):
    """truncation_rate = 0 (diffusers accepts it: keep the most likely class): with one
    inference step the only step is t = 0, which then samples the argmax, so the fast and the
    stock pipeline give the same tokens and images for any seed; negative rates act as 0."""
    fast = fast_pipeline(tiny_pipe)
    runs = {}
    for name, pipe, rate, seed in (("stock", tiny_pipe, 0.0, 0), ("fast", fast, 0.0, 1),
                                   ("negative", fast, -0.3, 2)):
        seen = []
        out = pipe("low newer", num_inference_steps=1, guidance_scale=4.0, truncation_rate=rate,
                   output_type="np", generator=torch.Generator().manual_seed(seed),
                   callback=lambda i, t, s: seen.append(s.clone()))
        _check_images(out.images, 1)
        runs[name] = (seen[-1], out.images)
    for name in ("fast", "negative"):
        assert torch.equal(runs[name][0], runs["stock"][0]), name
        np.testing.assert_allclose(runs[name][1], runs["stock"][1], atol=1e-6)
    out = fast("low", num_inference_steps=4, guidance_scale=4.0, truncation_rate=0.0,
               output_type="np", generator=torch.Generator().manual_seed(3))
    _check_images(out.images, 1)
