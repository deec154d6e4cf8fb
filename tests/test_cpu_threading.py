"""The CPU kernels' parallel work runs on torch's OpenMP team when libgomp is in the process,
on the library's own pool otherwise (the NumPy front end, IMGTX_FAST_CPU_THREADING=pool), with
bitwise the same results, and a forked child never enters the parent's team."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import imgtx_fast
from imgtx_fast import _C

HAS_GOMP = any("libgomp" in line for line in open("/proc/self/maps")) if os.path.exists("/proc/self/maps") else False
needs_gomp = pytest.mark.skipif(not HAS_GOMP, reason="this torch build does not load libgomp")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def _run(code: str, **env) -> str:
    """Runs code in a fresh interpreter (threading is decided per process); returns its stdout."""
    full_env = {**os.environ, **env}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                         timeout=120, cwd="/")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@needs_gomp
def test_torch_in_the_process_means_its_openmp_team():
    assert _C.cpu_threading() == "openmp"


def test_numpy_front_end_without_torch_uses_the_pool():
    out = _run("import sys, numpy as np\n"
               "from imgtx_fast import numpy as itx, _C\n"
               "z = np.random.rand(3000, 16).astype(np.float32); c = np.random.rand(300, 16).astype(np.float32)\n"
               "itx.set_num_threads(2); itx.codebook_lookup(z, c)\n"
               "print(_C.cpu_threading(), 'torch' in sys.modules)")
    assert out == "pool False"


@pytest.mark.parametrize("value", ["pool", "POOL", "Pool"])
def test_the_pool_can_be_forced(value):
    assert _run("import torch\nfrom imgtx_fast import _C\nprint(_C.cpu_threading())",
                IMGTX_FAST_CPU_THREADING=value) == "pool"


_OUTPUTS = r"""
import hashlib, json, torch, imgtx_fast
from imgtx_fast import _C
from imgtx_fast.diffusion import MaskAndReplaceSchedule, posterior_sample
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 4, 200, 32, generator=g) for _ in range(3))
out = imgtx_fast.attention(q, k, v, causal=True)
z, c = torch.randn(3000, 16, generator=g), torch.randn(300, 16, generator=g)
idx = imgtx_fast.codebook_lookup(z, c)[0]
K, N = 64, 300
logp = torch.randn(2, K, N, generator=g).log_softmax(1)
x_t = torch.randint(0, K + 1, (2, N), generator=g)
tok = posterior_sample(logp, x_t, 5, MaskAndReplaceSchedule(K, 10), torch.Generator().manual_seed(1))
digest = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
print(json.dumps([_C.cpu_threading(), digest(out), digest(idx), digest(tok)]))
"""


@needs_gomp
def test_team_and_pool_give_bitwise_the_same_results():
    team = json.loads(_run(_OUTPUTS))
    pool = json.loads(_run(_OUTPUTS, IMGTX_FAST_CPU_THREADING="pool"))
    assert team[0] == "openmp" and pool[0] == "pool"
    assert team[1:] == pool[1:]


_THREAD_COUNT = r"""
import os, torch, imgtx_fast
from imgtx_fast import _C
torch.set_num_threads(2)
count = lambda: len(os.listdir("/proc/self/task"))
a = torch.randn(256, 256)
for _ in range(3):
    a @ a  # torch's OpenMP team is up
before = count()
q = torch.randn(2, 4, 256, 32)
for _ in range(3):
    imgtx_fast.attention(q, q, q)
print(_C.cpu_threading(), before, count())
"""


@needs_gomp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs /proc")
def test_the_team_adds_no_threads_to_torchs():
    """With the team, the kernels run on torch's OpenMP threads: no thread of ours appears. The
    pool adds its helper (so the count would catch a kernel that ignored the team)."""
    mode, before, after = _run(_THREAD_COUNT).split()
    assert mode == "openmp" and after == before
    mode, before, after = _run(_THREAD_COUNT, IMGTX_FAST_CPU_THREADING="pool").split()
    assert mode == "pool" and int(after) == int(before) + 1


def _fork_and_check(work, expected):
    """Runs work() in a forked child; fails if it hangs or its result differs."""
    pid = os.fork()
    if pid == 0:  # child: exit status says whether the kernel ran and was right
        ok = False
        try:
            ok = torch.equal(work(), expected)
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the kernel in the forked child hung (the parent's team or pool threads are gone)")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@needs_fork
@pytest.mark.parametrize("parent_used", ["torch openmp", "our kernel", "both"])
def test_a_forked_child_runs_kernels_after_the_parent_used_openmp(parent_used):
    """libgomp has no fork handler: a child that entered the parent's team would wait forever
    for its threads. DataLoader workers fork after the parent ran torch ops and our kernels."""
    z, c = torch.randn(4000, 32), torch.randn(500, 32)
    expected = imgtx_fast.codebook_lookup(z, c)[0]
    if "openmp" in parent_used or parent_used == "both":
        a = torch.randn(512, 512)
        for _ in range(3):
            a @ a  # torch's OpenMP team runs (and its threads exist) in the parent
    if parent_used in ("our kernel", "both"):
        imgtx_fast.codebook_lookup(z, c)
    _fork_and_check(lambda: imgtx_fast.codebook_lookup(z, c)[0], expected)

