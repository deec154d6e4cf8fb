"""The process-wide switch between the compiled kernels and their plain-PyTorch twins."""
import contextlib
import threading

_BACKENDS = ("fast", "reference")
_state = threading.local()
_default = "fast"


def get_backend() -> str:
    """The backend ops use now in this thread: 'fast' (compiled kernels) or 'reference'."""
    return getattr(_state, "backend", _default)


def set_backend(name: str) -> None:
    """Switch every op, process-wide, to 'fast' or to the plain-PyTorch 'reference' twin."""
    global _default
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _default = name
    if hasattr(_state, "backend"):
        del _state.backend


@contextlib.contextmanager
def backend(name: str):
    """Context manager: use backend `name` in this thread inside the block."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    previous = getattr(_state, "backend", None)
    _state.backend = name
    try:
        yield
    finally:
        if previous is None:
            del _state.backend
        else:
            _state.backend = previous
