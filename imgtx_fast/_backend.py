"""The process-wide switch between the compiled kernels and their plain-PyTorch twins."""
import contextlib
import threading

from . import _C

_BACKENDS = ("fast", "reference")
_state = threading.local()  # .backend: this thread's `backend()` block, .frames: its open blocks
_default = "fast"
_reference_blocks = 0  # open backend("reference") blocks, all threads (fast_everywhere)
_blocks_lock = threading.Lock()


def get_backend() -> str:
    """The backend ops use now in this thread: 'fast' (compiled kernels) or 'reference'."""
    return getattr(_state, "backend", _default)


def fast_everywhere() -> bool:
    """True when no thread can be on the reference backend: the default is 'fast' and no
    backend('reference') block is open. A cheap global test (get_backend() reads a
    thread-local) for the per-call fast paths; when False they ask get_backend()."""
    return _default == "fast" and not _reference_blocks


def _publish() -> None:
    """Hands fast_everywhere() to the compiled core, whose one-call entry points read it. Called
    after every change of _default or _reference_blocks; under the lock, so that the value
    written last was read last."""
    with _blocks_lock:
        _C.set_fast_everywhere(fast_everywhere())


def _check(name) -> None:
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")


def set_backend(name: str) -> None:
    """Switch every op, process-wide, to 'fast' or to the plain-PyTorch 'reference' twin.

    Inside a `backend()` block of this thread, the switch lasts until that block ends: the
    block restores what was active when it was entered."""
    global _default
    _check(name)
    _default = name
    _publish()
    if hasattr(_state, "backend"):
        del _state.backend
    for frame in getattr(_state, "frames", ()):
        frame.set_default = True


class _Frame:
    """What an open `backend()` block restores: the thread's block backend (None: none) and
    the process default, the latter only if set_backend was called inside the block."""

    __slots__ = ("backend", "default", "set_default")

    def __init__(self):
        self.backend = getattr(_state, "backend", None)
        self.default = _default
        self.set_default = False


@contextlib.contextmanager
def backend(name: str):
    """Context manager: use backend `name` in this thread inside the block.

    On exit -- normal, by an exception, nested or not -- the thread's backend is again the one
    active when the block was entered, even if set_backend() was called inside it (that switch
    is undone then; set_backend calls of other threads are not)."""
    global _default, _reference_blocks
    _check(name)
    frame = _Frame()
    frames = _state.__dict__.setdefault("frames", [])
    frames.append(frame)
    _state.backend = name
    if name == "reference":
        with _blocks_lock:
            _reference_blocks += 1
        _publish()
    try:
        yield
    finally:
        if name == "reference":
            with _blocks_lock:
                _reference_blocks -= 1
            _publish()
        frames.remove(frame)  # by identity (_Frame has no __eq__)
        if frame.set_default:
            _default = frame.default
            _publish()
        if frame.backend is not None:
            _state.backend = frame.backend
        elif hasattr(_state, "backend"):
            del _state.backend
