"""Helpers every op of the framework-free front ends uses: device agreement, strided views the
kernels can read, and the Philox key of the sampling ops."""
import numbers

import numpy as np

from .arrays import element_strides


def same_device(rt, op: str, **arrays) -> str:
    """The one device of the named arrays; ValueError naming them otherwise (torch's message)."""
    devices = {name: rt.device(a) for name, a in arrays.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        names = list(devices)
        if len(names) == 2:
            a, b = names
            raise ValueError(f"{op}: {a} and {b} must be on the same device; {a} is on "
                             f"{devices[a]}, {b} on {devices[b]}")
        raise ValueError(f"{op}: {', '.join(names)} must be on one device, got "
                         f"{', '.join(devices.values())}")
    return first


def strided(rt, a):
    """(a, strides in elements); a is copied (C order) only when its byte strides cannot be
    given to the kernels (negative or not whole elements, see arrays.element_strides)."""
    st = element_strides(a)
    if st is None:
        a = rt.xp.ascontiguousarray(a)
        st = element_strides(a)
    return a, st


def dense_last(rt, a):
    """(a, strides) with the last dim contiguous, which the attention kernels need; other dims
    keep their strides (torch's ops/fused_attention._dense_last)."""
    a, st = strided(rt, a)
    if st[-1] != 1 and a.shape[-1] != 1:
        a = rt.xp.ascontiguousarray(a)
        st = element_strides(a)
    return a, st


def real_scalar(value):
    """value as a Python float if it is one real number: an int or float, a numpy scalar, or a
    0-d array or tensor of a real dtype (what users pass after np.float32(...), x.mean(), ...);
    None otherwise. Bools are not numbers here (True as a scale or timestep is a mistake)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):  # int, float and numpy's scalar types
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d numpy/torch/cupy
        return real_scalar(value.item())
    return None


def int_scalar(value):
    """value as a Python int if it is one integer: an int, a numpy integer scalar, or a 0-d
    array or tensor of an integer dtype; None otherwise (bools included)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return int_scalar(value.item())
    return None


def check_real(value, name: str, op: str, optional: bool = False):
    """A real-number argument (scale, truncation rate, guidance scale, temperature, ...) of the
    torch and the framework-free ops alike, as a Python float (None stays None when optional);
    TypeError naming it otherwise."""
    if optional and value is None:
        return None
    r = real_scalar(value)
    if r is None:
        raise TypeError(f"{op}: {name} must be a float{' or None' if optional else ''} (an int, "
                        f"a numpy scalar or a 0-d array will do), got {type(value).__name__}")
    return r


def check_int(value, name: str, op: str) -> int:
    """An integer argument (timestep, offset, step count, ...) as a Python int; TypeError naming
    it otherwise."""
    i = int_scalar(value)
    if i is None:
        raise TypeError(f"{op}: {name} must be an int (a numpy integer or a 0-d integer array "
                        f"will do), got {type(value).__name__}")
    return i


def philox_key(generator, op: str) -> int:
    """The sampling kernels' Philox key, drawn the way the torch API draws it from a
    torch.Generator (diffusion.sampling.philox_seed: one integer in [0, 2^62)):

      None                      numpy's global generator (np.random.seed reproduces a run),
      numpy.random.Generator    generator.integers(0, 2**62),
      numpy.random.RandomState  generator.randint(0, 2**62),
      int                       the key itself, in [0, 2^63): the same key gives the same
                                samples as the torch op whose generator drew that key.
    """
    if generator is None:
        return int(np.random.randint(0, 2**62, dtype=np.int64))
    if isinstance(generator, np.random.Generator):
        return int(generator.integers(0, 2**62))
    if isinstance(generator, np.random.RandomState):
        return int(generator.randint(0, 2**62, dtype=np.int64))
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):
        if not 0 <= int(generator) < 2**63:
            raise ValueError(f"{op}: an int generator is the Philox key and must be in [0, 2^63), "
                             f"got {generator}")
        return int(generator)
    raise TypeError(f"{op}: generator must be a numpy.random.Generator, a RandomState, an int "
                    f"key or None, got {type(generator).__name__}")
