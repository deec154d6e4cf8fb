"""Data-parallel training of the VQ-Diffusion transformer with DistributedDataParallel.

Launch with torchrun (gloo on CPU, NCCL on CUDA)::

    torchrun --nproc_per_node=2 scripts/train_ddp.py --steps 50 --out ckpt.pt

and the same code runs as a single process when not launched by torchrun (no process group,
no DDP wrapper). The pieces:

- `init_distributed()` / `teardown()`: the process group from torchrun's environment
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or a single-process context.
- `shard_indices()`: each step draws one *global* batch of indices from a generator seeded
  the same on every rank and gives rank r the r-th contiguous slice, so the ranks' batches
  concatenated are exactly the batch a single process with that seed would draw.
- `DistributedTimestepSampler`: VQ-Diffusion's importance sampler whose update gathers every
  rank's (t, L_t) first, so all ranks keep the same statistics and sample from the same p(t).
- `train_diffusion_ddp()`: the demo's training recipe (AdamW, warmup + cosine, clipping at 1)
  with `training_loss(..., network=ddp_model)`, so DDP averages the gradients over ranks;
  returns the loss per step averaged over ranks.
- `all_reduce_mean()`, `save_on_rank0()`.

Checkpoints: `train_diffusion_ddp(checkpoint_path=..., checkpoint_every=n)` writes (rank 0,
atomically) everything the next step depends on: the step count, model, AdamW and learning-rate
schedule states, the importance sampler's statistics, the data generator and every rank's noise
generator, and the losses so far. `resume_from=` continues such a run: its losses, parameters
and sampled timesteps are those of the uninterrupted run, bit for bit. `stop_at=` ends a run
early (the schedule still spans `steps`), e.g. to split it across jobs.

Randomness per rank: the data order comes from the shared seed; t, the forward noise and the
condition dropout come from a generator seeded with (seed, rank), so ranks draw independent
noise. DDP broadcasts rank 0's parameters when it wraps the model, so every rank starts from
rank 0's initialisation whatever its own seed.
"""
import datetime
import gc
import os
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .diffusion import TimestepSampler
from .models.vq_diffusion import VQDiffusionTransformer

__all__ = ["DistContext", "init_distributed", "teardown", "launched_by_torchrun", "shard_indices",
           "all_reduce_mean", "wrap_ddp", "DistributedTimestepSampler", "train_diffusion_ddp",
           "save_on_rank0", "barrier", "noise_seed"]


@dataclass
class DistContext:
    """Where this process stands: rank / world_size / local_rank, the device it trains on, and
    whether `init_distributed` created the process group (then `teardown` destroys it)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment holds torchrun's variables with more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(backend: Optional[str] = None, device: Optional[str] = None,
                     timeout_s: float = 300.0) -> DistContext:
    """Join the process group torchrun describes, or return a single-process context.

    backend: None picks "nccl" when training on CUDA, else "gloo". device: None picks
    cuda:LOCAL_RANK when CUDA is available and the backend is not gloo, else cpu.
    An already initialised process group is reused (and left alone by `teardown`).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        use_cuda = torch.cuda.is_available() and backend != "gloo"
        device = f"cuda:{local_rank}" if use_cuda else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not launched_by_torchrun():
        if dist.is_available() and dist.is_initialized():
            return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev,
                               dist.get_backend(), owns_group=False)
        return DistContext(0, 1, 0, dev, None, owns_group=False)
    if not dist.is_available():
        raise RuntimeError("init_distributed: launched by torchrun but torch.distributed is unavailable")
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise RuntimeError("init_distributed: the gloo backend is not available in this torch build")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev,
                       dist.get_backend(), owns_group=owns)


def teardown(ctx: DistContext) -> None:
    """Destroy the process group if `init_distributed` created it."""
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        # DDP wrappers sit in reference cycles: collected only at interpreter exit, after the
        # group is gone, they abort the process there ("terminate called without an active
        # exception", seen after several train_diffusion_ddp calls). Free them while it exists.
        gc.collect()
        dist.destroy_process_group()
        ctx.owns_group = False


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def noise_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s generator for t, forward noise and condition dropout."""
    return seed * 1_000_003 + 7919 * (rank + 1)


def shard_indices(g: torch.Generator, n: int, global_batch: int, rank: int, world_size: int) -> Tensor:
    """This rank's slice of one global batch of `global_batch` indices in [0, n) drawn (with
    replacement, as the demo's trainer) from `g`, which must be seeded alike on every rank."""
    if global_batch % world_size:
        raise ValueError(f"shard_indices: global batch {global_batch} is not divisible by the "
                         f"world size {world_size}")
    idx = torch.randint(0, n, (global_batch,), generator=g)
    return idx.view(world_size, -1)[rank]


def all_reduce_mean(value, ctx: DistContext) -> float:
    """The mean over ranks of a float or a scalar tensor (itself when single-process)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone()
    if ctx.distributed:
        if ctx.backend == "nccl":
            t = t.to(ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        t = t / ctx.world_size
    return float(t.item())


def wrap_ddp(model: torch.nn.Module, ctx: DistContext):
    """`model` on ctx.device, wrapped in DistributedDataParallel when distributed (the wrapper
    broadcasts rank 0's parameters and buffers); the bare model otherwise."""
    model = model.to(ctx.device)
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


class DistributedTimestepSampler(TimestepSampler):
    """TimestepSampler whose `update` all-gathers every rank's (t, per-sample loss) first, so
    the ranks keep identical statistics. Every rank must call update with the same batch size
    (training_loss does, once per step). Single-process: a plain TimestepSampler."""

    def __init__(self, num_timesteps: int, ctx: DistContext, device="cpu"):
        super().__init__(num_timesteps, device=device)
        self.ctx = ctx

    def update(self, t: Tensor, per_sample_loss: Tensor) -> None:
        if self.ctx.distributed:
            comm = self.ctx.device if self.ctx.backend == "nccl" else torch.device("cpu")
            t = t.detach().to(comm, torch.int64).contiguous()
            loss = per_sample_loss.detach().to(comm, torch.float64).contiguous()
            ts = [torch.empty_like(t) for _ in range(self.ctx.world_size)]
            ls = [torch.empty_like(loss) for _ in range(self.ctx.world_size)]
            dist.all_gather(ts, t)
            dist.all_gather(ls, loss)
            t, per_sample_loss = torch.cat(ts), torch.cat(ls)
        super().update(t, per_sample_loss)


def _all_rng_states(g: torch.Generator, ctx: DistContext) -> List[Tensor]:
    """Every rank's state of its generator `g`, in rank order (a collective: all ranks call)."""
    state = g.get_state()
    if not ctx.distributed:
        return [state]
    states: List[Optional[Tensor]] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


# The arguments a resumed run must share with the run that wrote the checkpoint.
_RUN_KEYS = ("steps", "global_batch", "lr", "seed", "importance_sampling", "warmup", "world_size")


def _save_training_state(path: str, ctx: DistContext, run: dict, step: int, model, opt, lr_sched,
                         sampler, data_g: torch.Generator, noise_g: torch.Generator,
                         losses: List[float]) -> None:
    noise = _all_rng_states(noise_g, ctx)
    if ctx.is_main:
        state = {"run": run, "step": step, "model": getattr(model, "module", model).state_dict(),
                 "optimizer": opt.state_dict(), "lr_schedule": lr_sched.state_dict(),
                 "sampler": None if sampler is None else sampler.state_dict(),
                 "data_rng": data_g.get_state(), "noise_rng": noise, "losses": list(losses)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash while writing leaves the previous checkpoint intact
    barrier(ctx)


def _load_training_state(path: str, ctx: DistContext, run: dict) -> dict:
    op = "train_diffusion_ddp"
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "run" not in state:
        raise ValueError(f"{op}: {path} is not a training checkpoint of train_diffusion_ddp")
    differ = {k: (state["run"].get(k), run[k]) for k in _RUN_KEYS if state["run"].get(k) != run[k]}
    if differ:
        raise ValueError(f"{op}: resume_from={path} was written by a run with other arguments "
                         f"(checkpoint, now): {differ}")
    return state


def train_diffusion_ddp(model: VQDiffusionTransformer, tokens: Tensor, labels: Tensor, ctx: DistContext,
                        steps: int = 800, global_batch: int = 64, lr: float = 1e-3, seed: int = 0,
                        importance_sampling: bool = True, warmup: Optional[int] = None,
                        log_every: int = 0, log: Callable[[str], None] = print, *,
                        checkpoint_path: Optional[str] = None, checkpoint_every: int = 0,
                        resume_from: Optional[str] = None, stop_at: Optional[int] = None) -> List[float]:
    """Train `model` data-parallel: each rank computes the loss on its shard of every global
    batch through the DDP wrapper (which averages the gradients), then the demo's optimiser
    recipe (AdamW, warmup + cosine, clip at 1; imgtx_fast.training) steps identically everywhere.

    tokens (n, h, w) / labels (n,) must be the same full data set on every rank.
    Returns the loss per step, averaged over ranks (the loss of the global batch). `log` is
    called on rank 0 only, every `log_every` steps (0: never). The model is left in eval mode
    and unwrapped (the DDP wrapper shares its parameters).

    checkpoint_path / checkpoint_every: write the full training state there every that many
    steps (0: only when the run ends or stops). resume_from: a checkpoint of a run with the
    same arguments and world size; training continues after its last step, and the returned
    losses include the earlier ones. stop_at: stop after this many steps in all.
    """
    from .training import warmup_cosine

    op = "train_diffusion_ddp"
    if len(tokens) != len(labels):
        raise ValueError(f"{op}: {len(tokens)} token grids but {len(labels)} labels")
    if checkpoint_every < 0 or (checkpoint_every and checkpoint_path is None):
        raise ValueError(f"{op}: checkpoint_every must be >= 0 and needs checkpoint_path, got "
                         f"{checkpoint_every} with checkpoint_path={checkpoint_path!r}")
    end = steps if stop_at is None else min(int(stop_at), steps)
    warmup = min(100, steps // 10) if warmup is None else warmup
    run = dict(steps=steps, global_batch=global_batch, lr=lr, seed=seed,
               importance_sampling=importance_sampling, warmup=warmup, world_size=ctx.world_size)
    state = None if resume_from is None else _load_training_state(resume_from, ctx, run)
    if state is not None:  # before wrap_ddp, which broadcasts rank 0's parameters
        model.load_state_dict(state["model"])
    data_g = torch.Generator().manual_seed(seed)
    noise_g = torch.Generator(device=ctx.device).manual_seed(noise_seed(seed, ctx.rank))
    network = wrap_ddp(model, ctx)
    sampler = (DistributedTimestepSampler(model.config.num_timesteps, ctx) if importance_sampling
               else None)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = warmup_cosine(opt, steps, warmup=warmup)
    losses: List[float] = []
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        if sampler is not None:
            sampler.load_state_dict(state["sampler"])
        data_g.set_state(state["data_rng"])
        noise_g.set_state(state["noise_rng"][ctx.rank])
        start, losses = int(state["step"]), list(state["losses"])

    def save(done: int) -> None:
        _save_training_state(checkpoint_path, ctx, run, done, model, opt, sched, sampler,
                             data_g, noise_g, losses)

    tokens, labels = tokens.to(ctx.device), labels.to(ctx.device)
    model.train()
    try:
        for step in range(start, end):
            idx = shard_indices(data_g, len(tokens), global_batch, ctx.rank, ctx.world_size).to(ctx.device)
            loss = model.training_loss(tokens[idx], labels[idx], sampler, generator=noise_g,
                                       network=network)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP: gradients averaged over ranks here
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(all_reduce_mean(loss, ctx))
            if log_every and ctx.is_main and (step % log_every == 0 or step == steps - 1):
                recent = losses[-log_every:]
                log(f"step {step + 1}/{steps}  loss {losses[-1]:.4f}  "
                    f"(mean of last {len(recent)}: {sum(recent) / len(recent):.4f})")
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < end:
                save(step + 1)
        if checkpoint_path is not None:
            save(max(end, start))
    finally:
        model.eval()
    return losses


def save_on_rank0(model: VQDiffusionTransformer, path: str, ctx: DistContext) -> bool:
    """model.save(path) on rank 0 only, then a barrier so no rank reads it early. Returns
    whether this rank wrote the file."""
    wrote = False
    if ctx.is_main:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        getattr(model, "module", model).save(path)
        wrote = True
    barrier(ctx)
    return wrote
