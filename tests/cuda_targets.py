"""Run the CUDA kernel tests (tests/test_*_cuda.py) on two targets without duplicating them.

    def test_something(target):
        out = op(target.to(x))                # the CUDA kernels run on target.device
        with target.host():
            want = op(x)                      # the CPU kernels, for comparison

The `target` fixture's params:
  gpu       CUDA tensors on a real device; marked `gpu` (skipped without one, see conftest.py).
  emulated  CPU tensors inside imgtx_fast.testing.emulated_cuda(): the same CUDA kernels run
            under the CPU-side emulator of csrc/simt (imgtx_fast._C_simt), ~1e4-1e6x slower
            than a GPU, so sized tests shrink their cases (Target.pick). Marked `emulated`
            (`pytest -m emulated` runs them all); skipped when this installation lacks
            _C_simt (`IMGTX_FAST_SIMT=1 pip install .`).
  emulated_full  (only on tests parametrized with @full_sizes_too or sized_cases) the emulator
            with the GPU sizes; marked `slow` as well (run with `pytest -m slow` or
            IMGTX_RUN_SLOW=1).

Under emulation the fixture checks after the test that the emulator launched at least one
kernel (tests that launch none on purpose set target.expect_launches = False), and
Target.kernels() checks a single call: calls the CUDA kernels do not support silently take the
CPU kernels (the designed fallback), which would otherwise pass every comparison.
"""
import contextlib

import pytest
import torch

from reliability_helpers import skip_slow_unless_requested  # noqa: F401 (autouse fixture)
from imgtx_fast.ops import _launch
from imgtx_fast.testing import emulated_cuda, emulator_available

EMULATOR_SEED = 0  # block/thread scheduling order of the emulator

_needs_emulator = pytest.mark.skipif(
    not emulator_available(),
    reason="needs imgtx_fast._C_simt, the CUDA kernels built for the CPU emulator "
           "(reinstall with `IMGTX_FAST_SIMT=1 pip install .`)")

GPU = pytest.param("gpu", marks=pytest.mark.gpu, id="gpu")
EMULATED = pytest.param("emulated", marks=[pytest.mark.emulated, _needs_emulator], id="emulated")
EMULATED_FULL = pytest.param("emulated_full", marks=[pytest.mark.emulated, pytest.mark.slow,
                                                     _needs_emulator], id="emulated_full")

# Tests whose cases differ in size between the GPU and the emulator (Target.pick) also run the
# GPU sizes under the emulator, as `slow`.
full_sizes_too = pytest.mark.parametrize("target", [GPU, EMULATED, EMULATED_FULL], indirect=True)


def _same(a, b) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except RuntimeError:  # sizes holding tensors (e.g. key_lengths) that differ in shape
        return False


def sized_cases(cases: dict):
    """Params for @pytest.mark.parametrize("target, case", sized_cases(CASES), indirect=["target"]),
    where CASES maps a case name to (its GPU size, its emulated size) and the test reads
    target.pick(*CASES[case]): every case on `gpu` and `emulated`, and on `emulated_full`
    (slow) the cases whose emulated size is a shrunk stand-in."""
    params = []
    for t in (GPU, EMULATED, EMULATED_FULL):
        for name, (full, small) in cases.items():
            if t is EMULATED_FULL and _same(full, small):
                continue
            params.append(pytest.param(t.values[0], name, marks=t.marks, id=f"{name}-{t.id}"))
    return params


class Target:
    """Where the CUDA kernels of a test run: a GPU, or the emulator on CPU tensors."""

    def __init__(self, name: str, sim=None):
        self.name = name
        self.sim = sim                  # the _C_simt module under emulation, else None
        self.emulated = sim is not None
        self.device = "cpu" if self.emulated else "cuda"
        self.small = name == "emulated"  # shrunk sizes (see pick)
        self.expect_launches = self.emulated

    def __repr__(self):
        return f"Target({self.name!r})"

    def to(self, x):
        """x on the target's device with the same strides and storage offset (CPU tensors stay
        as they are under emulation; a plain .to("cuda") would make slices and expanded views
        contiguous, so the GPU would not see the layout the test builds); anything that is not
        a tensor is returned unchanged."""
        if not isinstance(x, torch.Tensor) or x.device.type == self.device:
            return x
        if x.is_contiguous() and x.storage_offset() == 0:
            return x.to(self.device)
        n = x.untyped_storage().nbytes() // x.element_size()
        storage = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), 0, (n,), (1,))
        return storage.to(self.device).as_strided(x.shape, x.stride(), x.storage_offset())

    def to_kw(self, kw: dict) -> dict:
        return {n: self.to(v) for n, v in kw.items()}

    def generator(self, seed: int) -> torch.Generator:
        """A torch.Generator on the target's device, seeded."""
        return torch.Generator(self.device).manual_seed(seed)

    def pick(self, full, small, emulated_full=None):
        """`full` on the GPU, `small` under the plain emulated target; emulated_full takes
        `full` too unless given its own value (where the GPU sizes would take the emulator
        far too long even for a `slow` test)."""
        if self.name == "emulated_full" and emulated_full is not None:
            return emulated_full
        return small if self.small else full

    @contextlib.contextmanager
    def host(self):
        """CPU tensors take the CPU kernels inside this block (the emulator is paused): the
        comparisons against the CPU backend."""
        if not self.emulated:
            yield
            return
        token = _launch.EMULATOR.set(None)
        try:
            yield
        finally:
            _launch.EMULATOR.reset(token)

    def launches(self) -> int:
        """Kernel launches the emulator ran so far in this test (0 on a GPU: not counted)."""
        return self.sim.counters()["launches"] if self.emulated else 0

    @contextlib.contextmanager
    def kernels(self, at_least: int = 1):
        """Under emulation, checks that the block launched at least `at_least` CUDA kernels
        (i.e. the call did not take the CPU fallback). Nothing to check on a GPU."""
        before = self.launches()
        yield
        if self.emulated:
            ran = self.launches() - before
            assert ran >= at_least, (f"expected >= {at_least} CUDA kernel launches under the "
                                     f"emulator, got {ran}: the call took the CPU kernels")


@pytest.fixture(params=[GPU, EMULATED])
def target(request):
    """The CUDA kernels' target of the test: see the module docstring."""
    if request.param == "gpu":
        yield Target("gpu")
        return
    with emulated_cuda(seed=EMULATOR_SEED) as sim:
        sim.reset_counters()
        t = Target(request.param, sim)
        yield t
        launches = sim.counters()["launches"]
    call = getattr(request.node, "rep_call", None)
    if t.expect_launches and call is not None and call.passed:
        assert launches > 0, "the emulator launched no CUDA kernel: the test ran the CPU kernels"
