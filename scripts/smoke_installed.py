"""Smoke test of an installed imgtx_fast (a wheel, say): one call of each op family against its
float64 reference twin, on the package installed in this Python, never a source tree.

Run it from outside the checkout (CI: `cd $(mktemp -d) && python /path/to/smoke_installed.py`):
the script's own directory, not the working directory, is then first on sys.path.
"""
import argparse
import os
import sys

import torch

import imgtx_fast
from imgtx_fast import attention, codebook_lookup
from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_log_probs, posterior_sample
from imgtx_fast.reference import attention as ref_attention
from imgtx_fast.reference import codebook as ref_codebook
from imgtx_fast.reference import diffusion as ref_diffusion


def check_installed(allow_checkout):
    """The package under test is the installed one, with its compiled core next to it."""
    here = os.path.dirname(os.path.abspath(imgtx_fast.__file__))
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    in_checkout = here.startswith(checkout + os.sep)
    assert allow_checkout or not in_checkout, f"imported the source tree {here}, not an install"
    from imgtx_fast import _C

    print(f"imgtx_fast {imgtx_fast.__version__} from {here}, _C = {os.path.basename(_C.__file__)}")


def check_attention(g):
    q, k, v = (torch.randn(2, 3, 37, 40, generator=g) for _ in range(3))
    out = attention(q, k, v, causal=True)
    ref = ref_attention.attention(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    print("attention (causal, 2x3x37x40, fp32): matches the float64 reference")


def check_codebook(g):
    codebook = torch.randn(300, 24, generator=g)
    z = torch.randn(5, 41, 24, generator=g)
    indices, quantized = codebook_lookup(z, codebook)
    expected = ref_codebook.codebook_lookup(z, codebook)[0]
    assert torch.equal(indices, expected), "indices differ from the float64 argmin"
    assert torch.equal(quantized, codebook[indices]), "quantized is not the chosen codes"
    print("codebook_lookup (205 latents x 300 codes x 24): the float64 argmin on every row")


def check_diffusion(g):
    K, T, t = 50, 100, 40
    sched = MaskAndReplaceSchedule(K, T)
    log_p = torch.randn(2, K, 33, generator=g).log_softmax(1)
    x_t = torch.where(torch.rand(2, 33, generator=g) < 0.5, K, torch.randint(0, K, (2, 33), generator=g))
    ours = posterior_log_probs(log_p, x_t, t, sched, truncation_rate=0.9)
    ref = ref_diffusion.posterior_log_probs(log_p.double(), x_t, sched.coefs(t, 2, "cpu"), truncation_rate=0.9)
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(ours), finite), "impossible classes differ from the reference"
    torch.testing.assert_close(ours[finite].double(), ref[finite], atol=1e-4, rtol=1e-4)
    x_prev = posterior_sample(log_p, x_t, t, sched, torch.Generator().manual_seed(1), truncation_rate=0.9)
    again = posterior_sample(log_p, x_t, t, sched, torch.Generator().manual_seed(1), truncation_rate=0.9)
    assert x_prev.shape == x_t.shape and x_prev.dtype == torch.int64
    assert torch.equal(x_prev, again), "the same seed gave different samples"
    possible = ref.exp().gather(1, x_prev.unsqueeze(1)).squeeze(1) > 0
    assert bool(possible.all()), "a sample has probability 0 under the reference posterior"
    print("posterior_log_probs / posterior_sample (B=2, K=50, N=33, t=40): match the reference")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allow-checkout", action="store_true",
                        help="accept the checkout's own package (an editable install)")
    check_installed(parser.parse_args(argv).allow_checkout)
    g = torch.Generator().manual_seed(0)
    check_attention(g)
    check_codebook(g)
    check_diffusion(g)
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
