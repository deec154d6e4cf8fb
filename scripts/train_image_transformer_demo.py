"""Train the Image Transformer demo model on the built-in digits with a fixed seed and write the
checkpoint `python -m imgtx_fast demo --model image-transformer` loads:

    python scripts/train_image_transformer_demo.py          # -> imgtx_fast/checkpoints/image_transformer_demo.pt
    python scripts/train_image_transformer_demo.py --steps 2000 --out /tmp/it.pt

Then prints the demo's report (held-out bits/dim, sample accuracy, fast-vs-reference sampling).
Same seed, machine and thread count -> the same checkpoint.
"""
import argparse
import sys

from imgtx_fast.demos import image_transformer as demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=demo.default_checkpoint(), help="checkpoint path")
    parser.add_argument("--steps", type=int, default=800, help="training steps (batch 32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default="imgtx_fast_demo", help="folder for the sample grid")
    args = parser.parse_args(argv)
    return demo.main(["--train", "--checkpoint", args.out, "--train-steps", str(args.steps),
                      "--seed", str(args.seed), "--threads", str(args.threads), "--out", args.grid])


if __name__ == "__main__":
    sys.exit(main())
