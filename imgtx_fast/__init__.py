"""imgtx_fast: fused CPU/CUDA kernels for transformer image generators.

    from imgtx_fast import codebook_lookup
    indices, quantized = codebook_lookup(z, codebook)

The compiled core (imgtx_fast._C) does not link libtorch; ops are registered with
torch.library under torch.ops.imgtx.*. Without torch, imgtx_fast.numpy and imgtx_fast.cupy
run the same kernels on NumPy and CuPy arrays.

Importing this package does not import torch: the torch-based names (codebook_lookup,
attention, ...) and subpackages load on first use, so `import imgtx_fast.numpy` stays
torch-free. When torch is already imported, the ops are registered right away, as before.
"""
import importlib as _importlib
import sys as _sys

try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on how the package was installed
    import os as _os

    raise ImportError(
        f"imgtx_fast's compiled core (_C) is missing next to {_os.path.dirname(__file__)}. If that "
        "is a source checkout, you are importing it instead of the installed package: run from "
        "another directory (or use the `imgtx-fast` command), or build in place with "
        "`pip install -e .`."
    ) from e
if _C.cpu_isa_env_warning():
    # An unusable IMGTX_FAST_CPU_ISA is ignored with a warning, as torch ignores a bad
    # ATEN_CPU_CAPABILITY: one line (line 0: no source line under it), then auto-detection.
    import warnings as _warnings

    _warnings.warn_explicit(_C.cpu_isa_env_warning(), RuntimeWarning, __file__, 0, __name__)
from ._backend import backend, get_backend, set_backend
from .patterns import Local1d, Local2d

__version__ = "0.1.0"

__all__ = [
    "CodebookLookup",
    "Local1d",
    "Local2d",
    "attention",
    "backend",
    "codebook_lookup",
    "get_backend",
    "set_backend",
    "__version__",
]

# name -> the (torch-based) module that defines it, imported on first access
_LAZY = {"CodebookLookup": "ops", "attention": "ops", "codebook_lookup": "ops"}
_SUBMODULES = {"ops", "reference", "nn", "diffusion", "models", "integrations", "datasets",
               "demo", "distributed", "numpy", "cupy", "testing"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


if "torch" in _sys.modules:  # torch is loaded anyway: register torch.ops.imgtx.* now, as before
    from . import ops as _ops  # noqa: F401
