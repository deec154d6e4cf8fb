"""Train the demo's VQ-Diffusion transformer on the built-in digits, data-parallel:

    torchrun --nproc_per_node=2 scripts/train_ddp.py --steps 50 --out ckpt.pt
    python scripts/train_ddp.py --steps 50 --out ckpt.pt          # the same, one process

The digits are tokenised with the VQ-VAE of the demo checkpoint (imgtx_fast/checkpoints/
digits_demo.pt unless --checkpoint); the transformer has the demo's configuration and is
trained from scratch (or from the checkpoint's weights with --finetune) with the demo's
recipe, each rank on its shard of every global batch (gloo on CPU, NCCL on CUDA). Rank 0
prints the loss averaged over ranks and writes a VQDiffusionTransformer checkpoint
(`VQDiffusionTransformer.load(path)` reads it).
"""
import argparse
import os
import sys
import time

import torch

from imgtx_fast.demos import vq_diffusion as demo
from imgtx_fast import distributed as D
from imgtx_fast.models.vq_diffusion import VQDiffusionTransformer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="ckpt.pt", help="where rank 0 writes the trained transformer")
    parser.add_argument("--checkpoint", default=None,
                        help="demo checkpoint with the VQ-VAE tokenizer (default: the shipped one)")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch, split over the ranks (default: the demo's, 64)")
    parser.add_argument("--lr", type=float, default=None, help="default: the demo's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune", action="store_true",
                        help="start from the checkpoint's transformer instead of from scratch")
    parser.add_argument("--uniform-t", action="store_true", help="uniform t instead of importance sampling")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--backend", default=None, help="process group backend (default: gloo on CPU)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: torch's, 1 under torchrun)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    ctx = D.init_distributed(backend=args.backend, device=args.device)
    try:
        log = print if ctx.is_main else (lambda *a, **k: None)
        ckpt = args.checkpoint or demo.default_checkpoint()
        models = demo.load_checkpoint(ckpt)
        cfg = models.config
        batch = args.batch or cfg.diffusion_batch
        if batch % ctx.world_size:
            raise SystemExit(f"--batch {batch} must be divisible by the world size {ctx.world_size}")
        xtr, ytr, _, _, classes, desc = demo.load_data(None, cfg.image_size, seed=0)
        # every rank tokenises the whole (small) training set: the same tokens everywhere
        with torch.no_grad():
            tokens = torch.cat([models.vqvae.encode(xtr[i:i + 512]) for i in range(0, len(xtr), 512)])
        if args.finetune:
            model = models.diffusion
        else:
            torch.manual_seed(args.seed + 1)  # rank 0's initialisation is broadcast by DDP
            model = VQDiffusionTransformer(cfg.diffusion_config(len(classes)))
        nparams = sum(p.numel() for p in model.parameters())
        log(f"{desc}: {len(tokens)} token grids {tuple(tokens.shape[1:])} of {cfg.vq_num_codes} codes; "
            f"{ctx.world_size} process(es), backend {ctx.backend or 'none'}, device {ctx.device}, "
            f"{torch.get_num_threads()} thread(s) each; transformer {nparams:,} parameters; "
            f"global batch {batch} ({batch // ctx.world_size} per rank), {args.steps} steps")
        t0 = time.perf_counter()
        losses = D.train_diffusion_ddp(model, tokens, ytr, ctx, steps=args.steps, global_batch=batch,
                                       lr=args.lr or cfg.diffusion_lr, seed=args.seed,
                                       importance_sampling=not args.uniform_t,
                                       log_every=max(1, args.log_every), log=log)
        dt = time.perf_counter() - t0
        D.save_on_rank0(model, args.out, ctx)
        k = min(10, len(losses))
        log(f"trained {args.steps} steps in {dt:.1f} s ({dt / args.steps * 1000:.0f} ms/step); "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f} (mean of last {k}: {sum(losses[-k:]) / k:.4f})")
        log(f"rank 0 wrote {os.path.abspath(args.out)}")
    finally:
        D.teardown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
