"""imgtx_fast: fused CPU/CUDA kernels for transformer image generators.

    from imgtx_fast import codebook_lookup
    indices, quantized = codebook_lookup(z, codebook)

The compiled core (imgtx_fast._C) does not link libtorch; ops are registered with
torch.library under torch.ops.imgtx.*.
"""
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
from ._backend import backend, get_backend, set_backend
from .ops import CodebookLookup, attention, codebook_lookup
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
