"""imgtx_fast's CPU kernels on NumPy arrays, with no torch import.

    import numpy as np
    from imgtx_fast import numpy as itx
    indices, quantized = itx.codebook_lookup(z, codebook)            # z (..., D), codebook (K, D)
    out = itx.attention(q, k, v, pattern=itx.Local2d(32, 32, (8, 16), (8, 16)))
    sched = itx.MaskAndReplaceSchedule(num_classes=1024)
    x_prev = itx.posterior_sample(log_p_x0, x_t, t, sched, np.random.default_rng(0))

Same kernels, checks, errors and results as the torch ops. Inputs: numpy arrays, or anything
exposing __array_interface__ or DLPack (read without a copy, strides honoured); float32 and
float16 (numpy has no bfloat16; ml_dtypes' bfloat16 arrays are accepted). Outputs are new numpy
arrays. Threads: get_num_threads / set_num_threads (default: OMP_NUM_THREADS, else every CPU
this process may run on).
"""
import contextlib
import os

import numpy as np

from . import _C
from ._frontend import ArrayOps, CodebookLookup, MaskAndReplaceSchedule
from ._frontend.common import int_scalar
from .patterns import Local1d, Local2d

__all__ = ["CodebookLookup", "Local1d", "Local2d", "MaskAndReplaceSchedule", "attention",
           "codebook_lookup", "get_num_threads", "posterior_log_probs", "posterior_sample",
           "q_sample", "set_num_threads"]


def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_threads = _default_threads()


def get_num_threads() -> int:
    """Threads the CPU kernels use (they never start more)."""
    return _threads


def set_num_threads(n: int) -> None:
    """Set the CPU kernels' thread count for this process (torch.set_num_threads's analogue)."""
    global _threads
    if int_scalar(n) is None or int_scalar(n) < 1:  # numpy integers too, as torch's
        raise ValueError(f"set_num_threads: n must be an int >= 1, got {n!r}")
    _threads = int_scalar(n)


def _is_array(x) -> bool:
    return (isinstance(x, (np.ndarray, np.generic)) or hasattr(x, "__array_interface__")
            or hasattr(x, "__array_struct__") or hasattr(x, "__dlpack__"))


class _CpuRuntime:
    framework = "numpy"
    xp = np
    host = True

    @staticmethod
    def is_array(x) -> bool:
        return _is_array(x)

    @staticmethod
    def array(x, name: str, op: str):
        if isinstance(x, np.ndarray):
            return x
        if isinstance(x, np.generic) or hasattr(x, "__array_interface__") or hasattr(x, "__array_struct__"):
            return np.asarray(x)
        if hasattr(x, "__dlpack__"):
            try:
                return np.from_dlpack(x)
            except (BufferError, RuntimeError, TypeError, ValueError) as e:
                raise ValueError(f"{op}: {name} cannot be read as a host array through DLPack "
                                 f"({e}); device arrays go to imgtx_fast.cupy") from e
        raise TypeError(f"{op}: {name} must be a numpy.ndarray (or expose __array_interface__ "
                        f"or __dlpack__), got {type(x).__name__}")

    @staticmethod
    def device(a) -> str:
        return "cpu"

    @staticmethod
    def on_device(device):
        return contextlib.nullcontext()

    @staticmethod
    def ptr(a) -> int:
        return a.ctypes.data  # the cheapest pure-numpy read of the address (~1-2 us)

    @staticmethod
    def seed(key: int):
        return np.array([key], dtype=np.int64)

    @staticmethod
    def table(sched):
        return np.asarray(sched.table, dtype=np.float64)

    @staticmethod
    def codebook_lookup(args, sizes):
        _C.codebook_lookup_cpu(*args, _threads)

    @staticmethod
    def attention_forward(args):
        _C.attention_forward_cpu(*args, _threads)

    @staticmethod
    def mr_posterior(args) -> int:
        return _C.mr_posterior_cpu(*args, _threads)

    @staticmethod
    def mr_q_sample(args) -> int:
        return _C.mr_q_sample_cpu(*args, _threads)


_ops = ArrayOps(_CpuRuntime())
codebook_lookup = _ops.codebook_lookup
attention = _ops.attention
posterior_sample = _ops.posterior_sample
posterior_log_probs = _ops.posterior_log_probs
q_sample = _ops.q_sample
