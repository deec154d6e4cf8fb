"""Data-parallel training (imgtx_fast.distributed): two gloo ranks launched by torchrun train a
tiny VQ-Diffusion transformer on tiny synthetic tokens for a few steps; the ranks must end with
identical parameters that moved from the initial ones, those must equal a single-process run
on the concatenated global batches (DDP's gradient averaging), the importance sampler's
statistics must agree across ranks, and only rank 0 writes the checkpoint.

This file is also the worker script torchrun runs (`python tests/test_distributed.py --worker OUT`).
"""
import os
import subprocess
import sys
import time

import pytest
import torch

from imgtx_fast import distributed as D
from imgtx_fast.models.vq_diffusion import VQDiffusionConfig, VQDiffusionTransformer

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 8
LR = 1e-2
SEED = 3
CFG = dict(num_codes=16, height=3, width=3, dim=16, depth=1, heads=2, mlp_ratio=2.0, num_classes=4,
           class_tokens=2, num_timesteps=10, cond_drop_prob=0.3)


def _data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CFG["num_codes"], (40, CFG["height"], CFG["width"]), generator=g)
    labels = torch.randint(0, CFG["num_classes"], (40,), generator=g)
    return tokens, labels


def _model(seed: int) -> VQDiffusionTransformer:
    torch.manual_seed(seed)
    return VQDiffusionTransformer(VQDiffusionConfig(**CFG))


def _worker(out: str) -> None:
    torch.set_num_threads(1)
    ctx = D.init_distributed(backend="gloo", device="cpu")
    assert ctx.world_size == WORLD and ctx.distributed, ctx
    # each rank initialises differently: DDP must broadcast rank 0's parameters
    model = _model(100 + ctx.rank)
    tokens, labels = _data()
    losses = D.train_diffusion_ddp(model, tokens, labels, ctx, steps=STEPS, global_batch=GLOBAL_BATCH,
                                   lr=LR, seed=SEED, importance_sampling=False, warmup=0)
    wrote = D.save_on_rank0(model, os.path.join(out, "ckpt.pt"), ctx)
    # the importance sampler: rank-specific updates, identical statistics afterwards
    s = D.DistributedTimestepSampler(CFG["num_timesteps"], ctx)
    g = torch.Generator().manual_seed(ctx.rank)
    for _ in range(3):
        s.update(torch.randint(0, CFG["num_timesteps"], (5,), generator=g), torch.rand(5, generator=g))
    # stopped after step 3 and resumed (each rank restores its own noise generator)
    kw = dict(steps=STEPS + 2, global_batch=GLOBAL_BATCH, lr=LR, seed=SEED, warmup=0)
    whole = _model(100)
    full = D.train_diffusion_ddp(whole, tokens, labels, ctx, **kw)
    path = os.path.join(out, "run.pt")
    D.train_diffusion_ddp(_model(100), tokens, labels, ctx, checkpoint_path=path, stop_at=3, **kw)
    again = _model(200 + ctx.rank)
    resumed = D.train_diffusion_ddp(again, tokens, labels, ctx, resume_from=path, **kw)
    same = all(torch.equal(v, again.state_dict()[k]) for k, v in whole.state_dict().items())
    torch.save({"state": model.state_dict(), "losses": losses, "wrote": wrote, "history": s.history,
                "count": s.count, "mean": D.all_reduce_mean(float(ctx.rank), ctx),
                "resume": (full, resumed, same)},
               os.path.join(out, f"rank{ctx.rank}.pt"))
    D.teardown(ctx)


def _single_process_reference():
    """The same training, one process: each step's loss is the mean of the two ranks' shard
    losses (each drawn with that rank's noise generator) = the mean over the concatenated
    global batch, so its gradient is what DDP's average must give. Also returns, per parameter,
    the entries whose gradient never exceeded 1e-6, e.g. attention's key biases, whose gradient is
    exactly zero in exact arithmetic (softmax ignores a constant added to every logit of a
    query) and rounding noise in float, which Adam scales up to lr-sized steps; those differ
    with the summation order and are compared only across ranks."""
    from imgtx_fast.training import warmup_cosine
    model = _model(100)  # rank 0's initialisation
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, labels = _data()
    data_g = torch.Generator().manual_seed(SEED)
    noise = [torch.Generator().manual_seed(D.noise_seed(SEED, r)) for r in range(WORLD)]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.99))
    sched = warmup_cosine(opt, STEPS, warmup=0)
    losses = []
    max_grad = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, len(tokens), (GLOBAL_BATCH,), generator=data_g).view(WORLD, -1)
        loss = sum(model.training_loss(tokens[i], labels[i], None, generator=g)
                   for i, g in zip(idx, noise)) / WORLD
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for k, p in model.named_parameters():
            max_grad[k] = torch.maximum(max_grad[k], p.grad.abs())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    noise_only = {k: g <= 1e-6 for k, g in max_grad.items() if bool((g <= 1e-6).any())}
    return init, model.state_dict(), losses, noise_only


def _gloo_skip_reason():
    if not torch.distributed.is_available():
        return "torch.distributed is not available in this torch build"
    if not torch.distributed.is_gloo_available():
        return "the gloo backend is not available in this torch build"
    return None


def test_shard_indices_concatenate_to_the_global_batch():
    parts = [D.shard_indices(torch.Generator().manual_seed(5), 30, 12, r, 3) for r in range(3)]
    whole = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat(parts), whole)
    with pytest.raises(ValueError, match="divisible"):
        D.shard_indices(torch.Generator(), 30, 10, 0, 3)


def test_single_process_fallback(monkeypatch, tmp_path):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = D.init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.owns_group) == (0, 1, False, False)
    model = _model(0)
    assert D.wrap_ddp(model, ctx) is model
    assert D.all_reduce_mean(torch.tensor(2.5), ctx) == 2.5
    assert D.save_on_rank0(model, str(tmp_path / "m.pt"), ctx)
    assert (tmp_path / "m.pt").is_file()
    D.teardown(ctx)


def _single_ctx(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    return D.init_distributed(device="cpu")


def test_sampler_state_dict_round_trip():
    s = D.TimestepSampler(10)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):  # past the uniform phase: every t seen more than 10 times
        s.update(torch.randint(0, 10, (8,), generator=g), torch.rand(8, generator=g))
    assert not torch.allclose(s.probs(), torch.full((10,), 0.1, dtype=torch.float64))
    state = s.state_dict()
    s2 = D.TimestepSampler(10)
    s2.load_state_dict(state)
    assert torch.equal(s2.history, s.history) and torch.equal(s2.count, s.count)
    draws = [x.sample(16, torch.Generator().manual_seed(1))[0] for x in (s, s2)]
    assert torch.equal(draws[0], draws[1])
    state["history"].zero_()  # a copy: the sampler's own statistics are not shared
    assert not torch.equal(s.history, state["history"])
    with pytest.raises(ValueError, match="state is for 10 timesteps, this sampler has 9"):
        D.TimestepSampler(9).load_state_dict(s.state_dict())
    with pytest.raises(KeyError, match="count"):
        s2.load_state_dict({"num_timesteps": 10, "history": s.history})


RESUME = dict(steps=30, global_batch=GLOBAL_BATCH, lr=LR, seed=SEED, importance_sampling=True)


def test_resumed_training_matches_an_uninterrupted_run(monkeypatch, tmp_path):
    """Stopped at step 17 with a checkpoint every 5 steps (the last at 15), a fresh process
    state resumed from it reproduces the uninterrupted run: same losses, same timesteps drawn
    (the importance sampler is past its uniform phase by then), same final parameters."""
    ctx = _single_ctx(monkeypatch)
    tokens, labels = _data()
    drawn = {}

    def record(key):
        real = D.DistributedTimestepSampler.sample

        def sample(self, batch, generator=None):
            t, pt = real(self, batch, generator)
            drawn.setdefault(key, []).append(t.clone())
            return t, pt
        monkeypatch.setattr(D.DistributedTimestepSampler, "sample", sample)

    record("full")
    full = _model(1)
    want = D.train_diffusion_ddp(full, tokens, labels, ctx, **RESUME)
    record("first")
    path = str(tmp_path / "run.pt")
    first = D.train_diffusion_ddp(_model(1), tokens, labels, ctx, checkpoint_path=path,
                                  checkpoint_every=5, stop_at=17, **RESUME)
    assert first == want[:17]
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 17 and saved["losses"] == want[:17]
    # the crash case: a run that dies in step 17 leaves the checkpoint of step 15

    def crash(msg):
        if msg.startswith("step 17/"):
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        D.train_diffusion_ddp(_model(1), tokens, labels, ctx, checkpoint_path=path,
                              checkpoint_every=5, log_every=1, log=crash, **RESUME)
    assert torch.load(path, weights_only=True)["step"] == 15
    record("resumed")
    resumed = _model(2)  # other initial weights: the checkpoint's must replace them
    got = D.train_diffusion_ddp(resumed, tokens, labels, ctx, resume_from=path, **RESUME)
    assert got == want
    assert len(drawn["resumed"]) == 15
    for a, b in zip(drawn["resumed"], drawn["full"][15:]):
        assert torch.equal(a, b)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    with pytest.raises(ValueError, match="other arguments"):
        D.train_diffusion_ddp(_model(1), tokens, labels, ctx, resume_from=path, **dict(RESUME, lr=0.5))


def test_ddp_two_ranks_match_single_process(tmp_path):
    reason = _gloo_skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--standalone",
           os.path.abspath(__file__), "--worker", str(tmp_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        out = proc.stdout[-3000:] + proc.stderr[-3000:]
        if any(s in out for s in ("Address family not supported", "Cannot assign requested address",
                                  "getaddrinfo", "Network is unreachable")):
            pytest.skip(f"gloo cannot open local sockets here: {out[-500:]}")
        pytest.fail(f"torchrun exited with {proc.returncode} after {time.perf_counter() - t0:.1f} s:\n{out}")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # DDP kept the ranks in sync (though rank 1 started from other weights)
    for k, v in ranks[0]["state"].items():
        assert torch.equal(v, ranks[1]["state"][k]), f"ranks differ in {k}"
    assert ranks[0]["losses"] == ranks[1]["losses"]  # averaged over ranks
    assert ranks[0]["mean"] == ranks[1]["mean"] == 0.5
    for r in ranks:  # a resumed run is the uninterrupted one, on every rank
        full, resumed, same = r["resume"]
        assert resumed == full and same
    # the sampler's statistics saw both ranks' updates
    assert torch.equal(ranks[0]["history"], ranks[1]["history"])
    assert torch.equal(ranks[0]["count"], ranks[1]["count"])
    assert ranks[0]["count"].sum().item() == 3 * 5 * WORLD

    init, ref_state, ref_losses, noise_only = _single_process_reference()
    changed = [k for k, v in ranks[0]["state"].items() if not torch.equal(v, init[k])]
    assert len(changed) == len(init), f"parameters that did not move: {set(init) - set(changed)}"
    # gradient averaging: the same as one process on the concatenated global batch
    n_noise = sum(int(m.sum()) for m in noise_only.values())
    assert n_noise < 0.02 * sum(v.numel() for v in init.values()), f"{n_noise} entries without gradient"
    for k, v in ranks[0]["state"].items():
        keep = ~noise_only[k] if k in noise_only else torch.ones_like(v, dtype=torch.bool)
        torch.testing.assert_close(v[keep], ref_state[k][keep], rtol=1e-4, atol=1e-5,
                                   msg=f"{k} differs from single process")
    assert ranks[0]["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)

    # only rank 0 wrote, and the checkpoint holds the trained weights
    assert (ranks[0]["wrote"], ranks[1]["wrote"]) == (True, False)
    saved = VQDiffusionTransformer.load(tmp_path / "ckpt.pt")
    for k, v in saved.state_dict().items():
        assert torch.equal(v, ranks[0]["state"][k])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
