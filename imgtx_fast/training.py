"""The training loop the demos share: AdamW, linear warmup + cosine decay, gradient clipping,
a progress bar, a seeded generator for the batches.

    losses = fit(model, lambda g: model.loss(*draw_batch(g)), steps=800, lr=2e-3, desc="model")
"""
import math
from typing import Callable, List, Optional

import torch
import torch.nn as nn

__all__ = ["fit", "progress_bar", "warmup_cosine"]


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "step"):
    """A tqdm bar, or None when disabled or tqdm is missing (callers check for None)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit)


def warmup_cosine(opt, steps: int, warmup: int = 0):
    """Linear warmup over `warmup` steps, then cosine decay to 10% of the rate at `steps`."""
    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def fit(model: nn.Module, batch_loss: Callable[[torch.Generator], torch.Tensor], steps: int, *,
        lr: float, seed: int = 0, desc: str = "training", progress: bool = True,
        weight_decay: float = 0.01, betas=(0.9, 0.99), warmup: Optional[int] = None, clip: float = 1.0,
        postfix: Callable[[float], str] = lambda loss: f"loss={loss:.4f}") -> List[float]:
    """Train `model` for `steps` steps on batch_loss(generator) (the generator, seeded with
    `seed`, drives the batches). Warmup defaults to min(100, steps // 10). The bar shows
    postfix(mean of the last 50 losses). Returns the loss per step; leaves the model in eval
    mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    sched = warmup_cosine(opt, steps, warmup=min(100, steps // 10) if warmup is None else warmup)
    bar = progress_bar(steps, desc, progress)
    losses: List[float] = []
    model.train()
    try:
        for step in range(steps):
            loss = batch_loss(g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                if step % 20 == 0 or step == steps - 1:
                    recent = losses[-50:]
                    bar.set_postfix_str(postfix(sum(recent) / len(recent)), refresh=False)
    finally:
        if bar is not None:
            bar.close()
        model.eval()
    return losses
