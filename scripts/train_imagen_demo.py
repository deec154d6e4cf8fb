"""Train the Imagen-style demo's models (base stage, 2x super-resolution stage, classifier; the
text encoder is a frozen random T5 built from the seed) on the built-in digits and write the
checkpoint `python -m imgtx_fast demo --model imagen` loads:

    nice python scripts/train_imagen_demo.py          # -> imgtx_fast/checkpoints/imagen_demo.pt
    python scripts/train_imagen_demo.py --out /tmp/imagen.pt --seed 1 --base-steps 200

Then evaluates the stored (float16) weights as the demo does and prints its report: classifier
accuracy of the cascade's samples against the prompted digit, fast vs reference time. Same seed,
same machine and thread count -> the same checkpoint.
"""
import argparse
import dataclasses
import os
import sys
import time

import torch

from imgtx_fast.demos import imagen as demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=demo.default_checkpoint(), help="checkpoint path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads (default 1: reproducible, and fastest on a shared 2-core machine)")
    parser.add_argument("--base-steps", type=int, default=None)
    parser.add_argument("--sr-steps", type=int, default=None)
    parser.add_argument("--classifier-steps", type=int, default=None)
    parser.add_argument("--grid", default=None, help="folder for the sample grid PNGs (default: none)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-backend timing")
    parser.add_argument("--full-precision", action="store_true", help="store float32 weights (default float16)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    over = {k: getattr(args, k) for k in ("base_steps", "sr_steps", "classifier_steps") if getattr(args, k) is not None}
    cfg = dataclasses.replace(demo.ImagenDemoConfig(), seed=args.seed, **over)
    print(f"built-in digits, base {cfg.low_size}x{cfg.low_size} -> SR {cfg.high_size}x{cfg.high_size}, "
          f"seed {cfg.seed}, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    models = demo.train_models(cfg, progress=not args.quiet)
    models.info["threads"] = torch.get_num_threads()
    print(f"trained in {time.perf_counter() - t:.0f} s (base {models.info['base_train_s']:.0f} s, "
          f"SR {models.info['sr_train_s']:.0f} s, classifier {models.info['classifier_train_s']:.0f} s); "
          f"final losses base {models.info['base_loss']:.4f}, SR {models.info['sr_loss']:.4f}")
    # evaluate the weights as stored (float16 unless --full-precision): what the demo will load
    demo.save_checkpoint(models, args.out, half=not args.full_precision)
    models = demo.load_checkpoint(args.out)
    res = demo.evaluate(models, out=args.grid, seed=args.seed, reference=not args.no_reference)
    models.info.update({"classifier_test_acc": res["classifier_test_acc"], "sample_acc": res["sample_acc"]})
    demo.save_checkpoint(models, args.out, half=not args.full_precision)  # lossless: already float16 values
    print(demo.format_report(res, models))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
