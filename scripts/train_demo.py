"""Train the demo's three models (VQ-VAE, VQ-Diffusion transformer, classifier) on the built-in
digits with a fixed seed and write the checkpoint `python -m imgtx_fast demo` loads:

    python scripts/train_demo.py                       # -> imgtx_fast/checkpoints/digits_demo.pt
    python scripts/train_demo.py --out /tmp/demo.pt --seed 1

Prints the classifier's accuracy on the real test digits and the accuracy of the generated
samples (the classifier's label against the requested class), plus the rest of the demo's
report. Same seed, same machine and thread count -> the same checkpoint (float reductions in
another order, e.g. with another thread count, can change the last bits).
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

from imgtx_fast.demos import vq_diffusion as demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=demo.default_checkpoint(), help="checkpoint path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads (default 1: reproducible, and fastest on a shared 2-core machine)")
    parser.add_argument("--vq-steps", type=int, default=None)
    parser.add_argument("--diffusion-steps", type=int, default=None)
    parser.add_argument("--classifier-steps", type=int, default=None)
    parser.add_argument("--grid", default=None, help="folder for the sample grid PNG (default: none)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-backend timing")
    parser.add_argument("--full-precision", action="store_true", help="store float32 weights (default float16)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    over = {k: v for k, v in (("vq_steps", args.vq_steps), ("diffusion_steps", args.diffusion_steps),
                              ("classifier_steps", args.classifier_steps)) if v is not None}
    cfg = dataclasses.replace(demo.DemoConfig(), seed=args.seed, **over)
    xtr, ytr, xte, yte, classes, desc = demo.load_data(None, cfg.image_size, seed=0)
    print(f"{desc}: {len(xtr)} train / {len(xte)} test images, {cfg.image_size}x{cfg.image_size}, "
          f"seed {cfg.seed}, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    models = demo.train_models(cfg, xtr, ytr, classes, progress=not args.quiet)
    models.info["data"] = desc
    models.info["threads"] = torch.get_num_threads()
    print(f"trained in {time.perf_counter() - t:.0f} s "
          f"(VQ-VAE {models.info['vqvae_train_s']:.0f} s, diffusion {models.info['diffusion_train_s']:.0f} s, "
          f"classifier {models.info['classifier_train_s']:.0f} s)")
    # evaluate the weights as stored (float16 unless --full-precision): what the demo will load
    demo.save_checkpoint(models, args.out, half=not args.full_precision)
    models = demo.load_checkpoint(args.out)
    res = demo.evaluate(models, xte, yte, out=args.grid, seed=args.seed, progress=not args.quiet,
                        reference=not args.no_reference)
    models.info.update({"classifier_test_acc": res["classifier_test_acc"], "sample_acc": res["sample_acc"],
                        "recon_l1": res["recon_l1"]})
    demo.save_checkpoint(models, args.out, half=not args.full_precision)  # lossless: already float16 values
    print(demo.format_report(res, models))
    print(f"classifier accuracy on the real test digits: {res['classifier_test_acc'] * 100:.1f}%")
    print(f"generated-sample accuracy: {res['sample_acc'] * 100:.1f}% of {res['samples']} samples "
          f"(target >= 80%)")
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
