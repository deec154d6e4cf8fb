"""imgtx_fast's CUDA kernels on CuPy arrays, with no torch import.

    import cupy as cp
    from imgtx_fast import cupy as itx
    indices, quantized = itx.codebook_lookup(z, codebook)            # cupy arrays on one GPU
    x_prev = itx.posterior_sample(log_p_x0, x_t, t, itx.MaskAndReplaceSchedule(1024), seed)

The same checks, errors and results as the torch ops, on cupy.ndarray inputs (or anything
exposing __cuda_array_interface__ or DLPack on a GPU: read without a copy, strides honoured).
Kernels launch on CuPy's current stream of the arrays' device, read on every call; outputs are
new cupy arrays on that device. float32/float16 (CuPy has no bfloat16).

Differences from the torch ops, all for want of torch's machinery:
- attention runs the CUDA attention kernels only: float16 inputs, equal q/k and v head dims of
  a size they support, and only when IMGTX_FAST_CUDA_ATTENTION=1 (the opt-in of the torch op,
  kept until scripts/device_check.sh has verified the kernels). Other cases raise
  NotImplementedError; the torch op would fall back to plain PyTorch there.
- Sampling keys are drawn on the host (see imgtx_fast._frontend.common.philox_key) and copied
  to the GPU, so sampling calls cannot be captured in a CUDA graph.
"""
import os
import weakref

import numpy as np

try:
    import cupy
except ImportError as e:  # cupy is an optional dependency
    raise ImportError("imgtx_fast.cupy needs CuPy: pip install 'imgtx_fast[cupy]' (cupy-cuda12x)") from e

from . import _C
from ._frontend import ArrayOps, CodebookLookup, MaskAndReplaceSchedule
from .patterns import Local1d, Local2d

__all__ = ["CodebookLookup", "Local1d", "Local2d", "MaskAndReplaceSchedule", "attention",
           "codebook_lookup", "posterior_log_probs", "posterior_sample", "q_sample"]


def _device_id(device: str) -> int:
    return int(device.split(":")[1])


def _stream():
    """CuPy's current stream of the current device, read on every call (never cached)."""
    return cupy.cuda.get_current_stream()


def _capturing(stream) -> bool:
    is_capturing = getattr(stream, "is_capturing", None)
    return bool(is_capturing()) if is_capturing is not None else False


def _need_cuda_build():
    if not _C.cuda_compiled():
        raise RuntimeError("imgtx_fast was built without CUDA; rebuild with IMGTX_FAST_CUDA=1 "
                           "to use imgtx_fast.cupy")


class _CudaRuntime:
    framework = "cupy"
    xp = cupy
    host = False  # reading values would sync: key_lengths are clamped by the kernels instead

    def __init__(self):
        self._tables = weakref.WeakKeyDictionary()  # schedule -> {device id: table on it}

    @staticmethod
    def is_array(x) -> bool:
        return isinstance(x, cupy.ndarray) or hasattr(x, "__cuda_array_interface__")

    @staticmethod
    def array(x, name: str, op: str):
        if isinstance(x, cupy.ndarray):
            return x
        if hasattr(x, "__cuda_array_interface__"):
            return cupy.asarray(x)
        if hasattr(x, "__dlpack__") and not isinstance(x, (np.ndarray, np.generic)):
            try:
                return cupy.from_dlpack(x)
            except Exception as e:  # noqa: BLE001 - DLPack producers raise many types
                raise TypeError(f"{op}: {name} cannot be read as a GPU array through DLPack "
                                f"({e}); host arrays go to imgtx_fast.numpy") from e
        raise TypeError(f"{op}: {name} must be a cupy.ndarray (or expose __cuda_array_interface__ "
                        f"or __dlpack__ on a GPU), got {type(x).__name__}")

    @staticmethod
    def device(a) -> str:
        return f"cuda:{a.device.id}"

    @staticmethod
    def on_device(device):
        return cupy.cuda.Device(_device_id(device))

    @staticmethod
    def ptr(a) -> int:
        return a.data.ptr

    @staticmethod
    def seed(key: int):
        return cupy.asarray(np.array([key], dtype=np.int64))

    def table(self, sched):
        per_device = self._tables.setdefault(sched, {})
        dev = cupy.cuda.Device().id
        table = per_device.get(dev)
        if table is None:
            table = per_device[dev] = cupy.asarray(np.asarray(sched.table, dtype=np.float64))
        return table

    @staticmethod
    def codebook_lookup(args, sizes):
        _need_cuda_build()
        workspace = cupy.empty(max(_C.codebook_lookup_cuda_workspace_size(*sizes), 1), dtype=cupy.uint8)
        _C.codebook_lookup_cuda(*args, workspace.data.ptr, _stream().ptr)

    @staticmethod
    def attention_forward(args):
        _need_cuda_build()
        if os.environ.get("IMGTX_FAST_CUDA_ATTENTION", "0") != "1":
            raise NotImplementedError(
                "attention: the CUDA attention kernels are opt-in until verified on a GPU (set "
                "IMGTX_FAST_CUDA_ATTENTION=1); imgtx_fast.cupy has no plain fallback")
        sizes, q, k, v, _out, _lse, _scale, offset, mask, key_lengths, pattern = args
        if not _C.attention_cuda_supported(sizes, q, k, v, offset, mask, key_lengths, pattern):
            raise NotImplementedError(
                "attention: the CUDA attention kernels do not take this case (they need float16 "
                "q/k/v, equal q/k and v head dims of a supported size, and a float32 or q-dtype "
                "additive mask); the torch op runs it in plain PyTorch")
        workspace = cupy.empty(max(_C.attention_forward_cuda_workspace_size(*args), 1), dtype=cupy.uint8)
        _C.attention_forward_cuda(*args, workspace.data.ptr, _stream().ptr)

    @staticmethod
    def _with_status(launch, args) -> int:
        """Launch a kernel that reports bad tokens in a device status word, then read it (one
        small sync, as the torch op does; skipped while a CUDA graph is captured)."""
        _need_cuda_build()
        status = cupy.zeros(1, dtype=cupy.int32)
        stream = _stream()
        launch(*args, status.data.ptr, stream.ptr)
        return 0 if _capturing(stream) else int(status.get()[0])

    def mr_posterior(self, args) -> int:
        return self._with_status(_C.mr_posterior_cuda, args)

    def mr_q_sample(self, args) -> int:
        return self._with_status(_C.mr_q_sample_cuda, args)


_ops = ArrayOps(_CudaRuntime())
codebook_lookup = _ops.codebook_lookup
attention = _ops.attention
posterior_sample = _ops.posterior_sample
posterior_log_probs = _ops.posterior_log_probs
q_sample = _ops.q_sample
