"""Image Transformer local attention patterns (docs/specs/local_attention.md).

A pattern says which keys each query may see. Positions are raster (row-major) indices. With a
KV cache the queries are the last Nq of the Nk positions (query i sits at position
i + Nk - Nq, like bottom-right aligned causal attention); non-causal patterns need Nq == Nk.
Keys outside the sequence/image are never visible (the original TensorFlow code's edge quirks
are not reproduced).
"""
from dataclasses import dataclass
from typing import Tuple, Union


# The kernels take sequences shorter than 2^31 and hold positions in 32-bit ints, so no field
# needs more; larger values (past int64 too) would reach them as overflowing arithmetic.
MAX_FIELD = 2**31 - 1


def _positive_int(value, name: str, owner: str, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{owner}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    if value > MAX_FIELD:
        raise ValueError(f"{owner}: {name} must be <= 2^31 - 1 (the kernels' sequences are "
                         f"shorter than 2^31), got {value}")
    return value


def _pair(value, name: str, owner: str, allow_zero: bool) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
    return (_positive_int(value[0], f"{name}[0]", owner, allow_zero),
            _positive_int(value[1], f"{name}[1]", owner, allow_zero))


@dataclass(frozen=True)
class Local1d:
    """Image Transformer's local 1D attention over raster-ordered positions.

    causal=True ("masked local 1D"): query i sees keys j with
        floor(i / block) * block - block <= j <= i
    (its own block up to itself plus the whole previous block).
    causal=False: the query block [b*block, (b+1)*block) sees keys
        [b*block - filter_width, (b+1)*block + filter_width).
    """
    block: int = 256
    causal: bool = True
    filter_width: int = 0

    def __post_init__(self):
        _positive_int(self.block, "block", "Local1d")
        _positive_int(self.filter_width, "filter_width", "Local1d", allow_zero=True)
        if not isinstance(self.causal, bool):
            raise TypeError(f"Local1d: causal must be a bool, got {type(self.causal).__name__}")
        if self.causal and self.filter_width:
            raise ValueError("Local1d: filter_width applies to causal=False only (the causal "
                             "pattern always sees the whole previous block)")

    def check(self, q_len: int, k_len: int) -> None:
        if self.causal and q_len > k_len:
            raise ValueError(f"Local1d: more queries ({q_len}) than keys ({k_len}); with a "
                             "KV cache the queries are the last positions of the keys")
        if not self.causal and q_len != k_len:
            raise ValueError(f"Local1d(causal=False) needs as many queries as keys, got "
                             f"{q_len} queries and {k_len} keys")


@dataclass(frozen=True)
class Local2d:
    """Image Transformer's local 2D attention on a height x width raster-ordered image.

    The image is cut into query tiles of query_shape = (qh, qw), taken in raster order of tiles.
    causal=True ("masked local 2D"): a pixel of the tile with origin (r0, c0) sees the fh rows
    above the tile (columns c0 - fw .. c0 + qw + fw - 1), the fw columns left of it on the
    tile's rows, and the pixels of its own tile up to itself in the tile's raster order.
    causal=False: the rectangle rows [r0 - fh, r0 + qh + fh) x cols [c0 - fw, c0 + qw + fw).
    Keys outside the image are never visible.
    """
    height: int
    width: int
    query_shape: Union[int, Tuple[int, int]] = (8, 16)
    memory_flange: Union[int, Tuple[int, int]] = (8, 16)
    causal: bool = True

    def __post_init__(self):
        _positive_int(self.height, "height", "Local2d")
        _positive_int(self.width, "width", "Local2d")
        object.__setattr__(self, "query_shape", _pair(self.query_shape, "query_shape", "Local2d", False))
        object.__setattr__(self, "memory_flange", _pair(self.memory_flange, "memory_flange", "Local2d", True))
        if not isinstance(self.causal, bool):
            raise TypeError(f"Local2d: causal must be a bool, got {type(self.causal).__name__}")

    def check(self, q_len: int, k_len: int) -> None:
        n = self.height * self.width
        if self.causal:
            if k_len > n:
                raise ValueError(f"Local2d: {k_len} keys do not fit a {self.height}x{self.width} "
                                 f"image (height*width = {n})")
            if q_len > k_len:
                raise ValueError(f"Local2d: more queries ({q_len}) than keys ({k_len}); with a "
                                 "KV cache the queries are the last positions of the keys")
        elif q_len != n or k_len != n:
            raise ValueError(f"Local2d: height*width = {n} must equal the sequence length, got "
                             f"{q_len} queries and {k_len} keys")


Pattern = Union[Local1d, Local2d]
