"""torch dtype <-> the compiled core's DType codes (csrc/include/imgtx/dtype.h)."""
import torch

FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def float_code(t: torch.Tensor, name: str, op: str) -> int:
    """The DType code of a floating tensor; TypeError naming the argument otherwise."""
    code = FLOAT_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return code
