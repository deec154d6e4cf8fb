"""The fast call of nn.MultiheadAttention as the README and the docstring show it: it runs the
fused kernel (no fallback warning) and matches torch; the default need_weights=True takes
torch's path with a warning that says how to get the fused one."""
import pathlib
import re
import warnings

import pytest
import torch

import imgtx_fast
import imgtx_fast.nn.functional as nn_functional
from imgtx_fast.nn import MultiheadAttention

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    hits = [b for b in blocks if "MultiheadAttention(" in b and "need_weights=False" in b]
    assert len(hits) == 1, "the README shows the fast MultiheadAttention call once"
    return "\n".join(line.strip() for line in hits[0].splitlines())


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Fallback warnings are once per reason: start each test without the record."""
    monkeypatch.setattr(nn_functional, "_warned", set())


def test_readme_fast_call_runs_the_fused_kernel_and_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(2, 11, 512)
    scope = {"imgtx_fast": imgtx_fast, "x": x}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        exec(_readme_snippet(), scope)
    mha, out = scope["mha"], scope["out"]
    stock = torch.nn.MultiheadAttention(512, 8, batch_first=True)
    stock.load_state_dict(mha.state_dict())
    want, _ = stock(x, x, x, need_weights=False)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)


def test_default_need_weights_takes_torchs_path_and_says_so():
    torch.manual_seed(1)
    mha = MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.warns(UserWarning, match="need_weights=False"):
        out, weights = mha(x, x, x)
    assert weights is not None and weights.shape == (2, 5, 5)
    assert "need_weights=False" in MultiheadAttention.__doc__
