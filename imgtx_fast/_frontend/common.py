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
