"""FastVQDiffusionScheduler against what diffusers' own scheduler tests (SchedulerCommonTest and
its VQ-Diffusion subclass) expect of a scheduler, and against the stock VQDiffusionScheduler:
config files interchangeable both ways, `compatibles`, identical outputs for equal seeds
after a save/load, return_dict equivalence, and set_timesteps/step over the whole range of
num_vec_classes, num_inference_steps and timesteps (distribution-level where the two sample
differently: ours draws from Philox, diffusers from torch.rand + Gumbel)."""
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import VQDiffusionScheduler  # noqa: E402

from diffusion_helpers import chi_square_pvalue  # noqa: E402
from imgtx_fast.diffusion import posterior_log_probs  # noqa: E402
from imgtx_fast.integrations import diffusers as integration  # noqa: E402
from imgtx_fast.integrations.diffusers import FastVQDiffusionScheduler  # noqa: E402

CONFIGS = [
    dict(num_vec_classes=4097, num_train_timesteps=100),  # diffusers' test config
    dict(num_vec_classes=2, num_train_timesteps=2),        # one real class, two steps
    dict(num_vec_classes=5, num_train_timesteps=1000),
    dict(num_vec_classes=9, num_train_timesteps=7, alpha_cum_start=0.95, alpha_cum_end=0.3,
         gamma_cum_start=0.01, gamma_cum_end=0.5),
]


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _dummy_model_output(num_vec_classes: int, sample: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """diffusers' dummy VQ-Diffusion model: log_softmax of uniform logits, (B, K, N) float32."""
    g = torch.Generator().manual_seed(seed)
    B, N = sample.shape
    return torch.rand((B, num_vec_classes - 1, N), generator=g).double().log_softmax(1).float()


def _dummy_sample(num_vec_classes: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, num_vec_classes, (4, 64), generator=torch.Generator().manual_seed(seed))


# ---- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['num_vec_classes']}x{c['num_train_timesteps']}")
def test_config_files_are_interchangeable_with_the_stock_class(config, tmp_path):
    ours = FastVQDiffusionScheduler(**config)
    ours.save_config(tmp_path / "ours")
    loaded = [VQDiffusionScheduler.from_pretrained(tmp_path / "ours"),
              VQDiffusionScheduler.from_config(VQDiffusionScheduler.load_config(tmp_path / "ours"))]
    for stock in loaded:
        assert type(stock) is VQDiffusionScheduler and _public(stock.config) == _public(ours.config)
    stock = VQDiffusionScheduler(**config)
    stock.save_config(tmp_path / "stock")
    loaded = [FastVQDiffusionScheduler.from_pretrained(tmp_path / "stock"),
              FastVQDiffusionScheduler.from_config(FastVQDiffusionScheduler.load_config(tmp_path / "stock")),
              FastVQDiffusionScheduler.from_config(stock.config)]
    for fast in loaded:
        assert type(fast) is FastVQDiffusionScheduler and _public(fast.config) == _public(stock.config)
        torch.testing.assert_close(fast._imgtx_schedule.table, loaded[0]._imgtx_schedule.table,
                                   rtol=0, atol=0)
    # a positional num_vec_classes (recorded by diffusers as a "default") survives too
    positional = FastVQDiffusionScheduler(config["num_vec_classes"], config["num_train_timesteps"])
    positional.save_config(tmp_path / "positional")
    back = VQDiffusionScheduler.from_pretrained(tmp_path / "positional")
    assert back.config.num_vec_classes == config["num_vec_classes"]


def test_save_pretrained_round_trip_keeps_the_config():
    """SchedulerCommonTest.test_from_pretrained: the reloaded config is the saved one less
    `_use_default_values`."""
    import tempfile

    for cls in (FastVQDiffusionScheduler, VQDiffusionScheduler):
        scheduler = cls(**CONFIGS[0])
        with tempfile.TemporaryDirectory() as d:
            scheduler.save_pretrained(d)
            new = cls.from_pretrained(d)
        config = dict(scheduler.config)
        del config["_use_default_values"]
        assert config == new.config, cls.__name__


def test_compatibles_list_the_stock_scheduler_and_ours():
    """SchedulerCommonTest.test_compatibles, plus the classes themselves."""
    scheduler = FastVQDiffusionScheduler(**CONFIGS[0])
    assert scheduler.compatibles == [VQDiffusionScheduler, FastVQDiffusionScheduler]
    assert FastVQDiffusionScheduler._get_compatibles() == scheduler.compatibles
    assert VQDiffusionScheduler in VQDiffusionScheduler(**CONFIGS[0]).compatibles
    for cls in scheduler.compatibles:
        other = cls.from_config(scheduler.config)
        assert type(other) is cls
        back = FastVQDiffusionScheduler.from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == \
            {k: v for k, v in scheduler.config.items() if k in back.config}
        assert _public(back.config) == _public(scheduler.config)


# ---- outputs after a save/load --------------------------------------------------------------
CHECKS = ([dict(num_train_timesteps=T) for T in (2, 5, 100, 1000)]
          + [dict(num_vec_classes=n) for n in (5, 100, 1000, 4000)]
          + [dict(time_step=t) for t in (0, 50, 99)]
          + [dict(time_step=t, num_inference_steps=n) for t, n in ((0, 1), (3, 10), (49, 50))])


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_outputs_identical_for_equal_seeds_after_save_load(check, tmp_path):
    """check_over_configs / check_over_forward of SchedulerCommonTest: torch.manual_seed(0)
    before each step (the default generator), the reloaded scheduler gives the same sample;
    also through the stock class's loader and back."""
    check = dict(check)
    time_step = check.pop("time_step", 0)
    steps = check.pop("num_inference_steps", None)
    config = dict(dict(num_vec_classes=4097, num_train_timesteps=100), **check)
    scheduler = FastVQDiffusionScheduler(**config)
    sample = _dummy_sample(config["num_vec_classes"])
    residual = _dummy_model_output(config["num_vec_classes"], sample)
    scheduler.save_config(tmp_path)
    reloaded = [FastVQDiffusionScheduler.from_pretrained(tmp_path),
                FastVQDiffusionScheduler.from_config(VQDiffusionScheduler.from_pretrained(tmp_path).config)]
    outputs = []
    for s in [scheduler] + reloaded:
        if steps is not None:
            s.set_timesteps(steps)
        outputs.append(s.step(residual, time_step, sample, generator=torch.manual_seed(0)).prev_sample)
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])
    assert outputs[0].shape == sample.shape
    assert int(outputs[0].min()) >= 0 and int(outputs[0].max()) < config["num_vec_classes"]


def test_step_shape_and_tuple_output_equivalence():
    """test_step_shape and test_scheduler_outputs_equivalence."""
    scheduler = FastVQDiffusionScheduler(**CONFIGS[0])
    sample = _dummy_sample(4097)
    residual = _dummy_model_output(4097, sample)
    scheduler.set_timesteps(50)
    out0 = scheduler.step(residual, 0, sample, generator=torch.manual_seed(0))
    out1 = scheduler.step(residual, 1, sample)
    assert out0.prev_sample.shape == out1.prev_sample.shape == sample.shape
    (as_tuple,) = scheduler.step(residual, 0, sample, generator=torch.manual_seed(0), return_dict=False)
    assert torch.equal(as_tuple, out0.prev_sample)


# ---- set_timesteps / step over the whole range ----------------------------------------------
def _stock_probs(stock, log_p: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """diffusers' p(x_{t-1} | x_t) (B, K+1, N): q_posterior normalised; at t = 0 its step
    samples log p(x0 | x_t) itself (MASK impossible)."""
    if t == 0:
        B, K, N = log_p.shape
        return torch.cat([log_p.double().softmax(1), torch.zeros(B, 1, N, dtype=torch.float64)], 1)
    return stock.q_posterior(log_p, x_t, torch.tensor(t)).double().softmax(1)


RANGE = [(2, 5), (3, 6), (9, 12), (300, 30), (4097, 100)]  # (num_vec_classes, num_train_timesteps)


@pytest.mark.parametrize("nvc,T", RANGE, ids=lambda v: str(v))
def test_every_timestep_and_step_count_matches_stock(nvc, T):
    """set_timesteps(n) for every n in 1..T gives diffusers' timesteps (n-1 .. 0); at every
    timestep of [0, T) step's distribution is diffusers' (total variation < 1e-5 against the
    stock q_posterior, float32 log tables there); a whole n-step chain runs from all-MASK."""
    stock = VQDiffusionScheduler(num_vec_classes=nvc, num_train_timesteps=T)
    fast = FastVQDiffusionScheduler.from_config(stock.config)
    for n in range(1, T + 1):
        stock.set_timesteps(n)
        fast.set_timesteps(n)
        assert torch.equal(fast.timesteps, stock.timesteps), n
    g = torch.Generator().manual_seed(nvc + T)
    K, B, N = nvc - 1, 2, 16
    sched = fast._imgtx_schedule
    for t in range(T):
        log_p = (torch.randn(B, K, N, generator=g) * 2).log_softmax(1)
        x_t = torch.randint(0, nvc, (B, N), generator=g)
        ours = posterior_log_probs(log_p, x_t, t, sched).double().exp()
        theirs = _stock_probs(stock, log_p, x_t, t)
        tv = float((ours - theirs).abs().sum(1).max()) / 2
        assert tv < 1e-5, (t, tv)
    for n in sorted({1, 2, T // 2, T}):
        fast.set_timesteps(n)
        x = torch.full((B, N), K)
        for t in fast.timesteps:
            log_p = (torch.randn(B, K, N, generator=g) * 2).log_softmax(1)
            x = fast.step(log_p, t, x, generator=g).prev_sample
            assert x.shape == (B, N) and int(x.min()) >= 0 and int(x.max()) <= K
        assert int(x.max()) < K  # the chain ends on x0: no MASK left


@pytest.mark.parametrize("t", [0, 1, 4])
def test_single_class_sampling_matches_stock(t):
    """num_vec_classes = 2 (K = 1): the sample frequencies of ours and of the stock step both
    follow the exact posterior (chi-square)."""
    stock = VQDiffusionScheduler(num_vec_classes=2, num_train_timesteps=5, alpha_cum_end=0.3,
                                 gamma_cum_end=0.5)
    fast = FastVQDiffusionScheduler.from_config(stock.config)
    draws = 20_000
    log_p = torch.zeros(1, 1, draws)
    for x_value in (0, 1):
        x_t = torch.full((1, draws), x_value)
        probs = _stock_probs(stock, log_p[..., :1], x_t[:, :1], t).view(-1)
        for s in (stock, fast):
            out = s.step(log_p, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
            counts = torch.bincount(out.view(-1), minlength=2)
            assert int(counts[probs == 0].sum()) == 0
            assert chi_square_pvalue(counts, probs) > 1e-4, (type(s).__name__, x_value)


# ---- devices the kernels do not run on -------------------------------------------------------
def test_other_devices_fall_back_to_the_stock_computation(monkeypatch):
    """Where the kernels cannot read the tensors (devices other than CPU and CUDA) the stock
    step runs: the same sample as VQDiffusionScheduler for the same generator seed."""
    stock = VQDiffusionScheduler(num_vec_classes=8, num_train_timesteps=10)
    fast = FastVQDiffusionScheduler.from_config(stock.config)
    monkeypatch.setattr(integration, "_kernels_run_on", lambda x: False)
    g = torch.Generator().manual_seed(0)
    log_p = torch.randn(2, 7, 30, generator=g).log_softmax(1)
    uncond = torch.randn(2, 7, 30, generator=g).log_softmax(1)
    x_t = torch.randint(0, 8, (2, 30), generator=g)
    for t in (0, 5):
        want = stock.step(log_p, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
        got = fast.step(log_p, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
        assert torch.equal(got, want)
        # step_guided: the pipeline's guidance, renormalisation, truncation and clamp first
        guided = uncond + 3.0 * (log_p - uncond)
        guided = guided - guided.logsumexp(1, keepdim=True)
        if integration._VQDiffusionPipeline is None:  # its truncate needs transformers
            continue
        truncated = integration._VQDiffusionPipeline.truncate(None, guided, 0.6).clamp(-70)
        want = stock.step(truncated, t, x_t, generator=torch.Generator().manual_seed(2)).prev_sample
        got = fast.step_guided(log_p, uncond, t, x_t, guidance_scale=3.0, truncation_rate=0.6,
                               generator=torch.Generator().manual_seed(2)).prev_sample
        assert torch.equal(got, want)
