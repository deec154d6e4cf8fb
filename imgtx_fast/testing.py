"""Test utilities: run the CUDA kernels without a GPU.

    with imgtx_fast.testing.emulated_cuda(seed=0):
        out = imgtx_fast.attention(q, k, v)   # q, k, v on the CPU, fp16: the CUDA kernels run

Inside the block, the torch ops given CPU tensors call the CUDA host entry points of
imgtx_fast._C_simt: the same .cu sources as the GPU build, compiled by the host compiler against
the emulator of csrc/simt (threads as fibers, warp collectives, shared memory, cp.async, mma and
ldmatrix emulated, with race, divergence and bounds checks; see docs/gpu-verification.md). That
covers codebook lookup, every diffusion op, and attention forward, backward and decode with
fp16/bf16 and the kernels' head dims (calls the CUDA kernels do not support take the CPU kernels,
as they take the torch path on a GPU). Outside the block nothing changes. The module is built by
`IMGTX_FAST_SIMT=1 pip install .`.
"""
import contextlib
import importlib


def _simt_module():
    try:
        return importlib.import_module("imgtx_fast._C_simt")
    except ImportError as e:
        raise RuntimeError(
            "imgtx_fast.testing.emulated_cuda needs the emulated CUDA module imgtx_fast._C_simt, "
            "which this installation lacks: reinstall with `IMGTX_FAST_SIMT=1 pip install .`") from e


def emulator_available() -> bool:
    """Whether imgtx_fast._C_simt (the CUDA kernels under the emulator) is installed."""
    try:
        _simt_module()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def emulated_cuda(seed: int = 0, arch: int = 80, *, sample_blocks: int = 0):
    """Route the torch ops given CPU tensors to the CUDA kernels, run under the emulator.

    seed: the order in which blocks and threads are scheduled (a different seed shuffles both).
    arch: the emulated device, 80 (A100), 86/89 (99 KB of shared memory per block) or 90 (H100);
    it sets the shared-memory limits the kernels are checked against.
    sample_blocks: run only that many blocks of each launch (0: all), for cost-model runs whose
    outputs are discarded (benchmarks/gpu_model.py): launch_log() scales their counts to the grid.
    The skipped blocks write nothing, so a later kernel that follows indices an earlier one
    writes (the codebook finalize) may read out of bounds: sample only launches that do not.
    Yields the module, whose counters() and launch_log() tell what ran.
    """
    from .ops._launch import EMULATOR

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"emulated_cuda: seed must be a non-negative int, got {seed!r}")
    if not isinstance(arch, int):
        raise TypeError(f"emulated_cuda: arch must be an int (80, 86, 89 or 90), got {arch!r}")
    if not isinstance(sample_blocks, int) or sample_blocks < 0:
        raise ValueError(f"emulated_cuda: sample_blocks must be a non-negative int, got {sample_blocks!r}")
    mod = _simt_module()
    before = mod.settings()
    mod.configure(seed, arch, sample_blocks)
    token = EMULATOR.set(mod)
    try:
        yield mod
    finally:
        EMULATOR.reset(token)
        mod.configure(before["seed"], before["arch"], before["sample_blocks"])
