"""The torch range the package states: pyproject's dependency and the README say the same
minimum, the torch running the tests meets it, and what the minimum rests on is there."""
import pathlib
import re

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _version(text: str):
    return tuple(int(x) for x in text.split("."))


def _declared_minimum():
    deps = re.search(r"^dependencies = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), re.M)
    assert deps, "pyproject.toml has a dependencies line"
    torch_req = re.search(r'"torch>=([0-9.]+)"', deps.group(1))
    assert torch_req, f"torch is pinned from below only: {deps.group(1)}"
    return torch_req.group(1)


def test_readme_states_the_declared_minimum():
    minimum = _declared_minimum()
    readme = (ROOT / "README.md").read_text()
    stated = re.findall(r"torch >= ([0-9]+(?:\.[0-9]+)*)", readme)
    assert stated and set(stated) == {minimum}, (stated, minimum)


def test_this_torch_meets_the_minimum_and_has_what_it_rests_on():
    minimum = _version(_declared_minimum())
    running = _version(re.match(r"[0-9]+\.[0-9]+", torch.__version__).group(0))
    assert running >= minimum, (torch.__version__, minimum)
    from imgtx_fast.ops.fused_attention import attention_forward

    assert hasattr(attention_forward, "register_vmap")  # custom ops' vmap rules: 2.5
    q = torch.zeros(1, 2, 3, 4)
    F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)  # SDPA's GQA: 2.5
