"""What every model of this package shares: the backend switch and the checkpoint format.

A model subclasses `ModelBase` and sets two class attributes:
    config_class  the dataclass of its configuration (stored as plain values)
    checkpoint_format  the tag written into its files, so `load` refuses any other file clearly
"""
import contextlib
from dataclasses import asdict
from typing import Dict, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .._backend import _BACKENDS, backend as _backend_block

__all__ = ["ModelBase", "half_state", "load_state"]


def half_state(module: nn.Module, half: bool) -> Dict[str, Tensor]:
    """module's state dict, float32 tensors stored as float16 when `half` (halves a file)."""
    return {k: v.half() if half and v.dtype == torch.float32 else v.clone()
            for k, v in module.state_dict().items()}


def load_state(module: nn.Module, state: Dict[str, Tensor]) -> None:
    """Load a (possibly half_state) state dict into module, in module's own dtypes."""
    ref = module.state_dict()
    module.load_state_dict({k: v.to(ref[k].dtype) if k in ref else v for k, v in state.items()})


class ModelBase(nn.Module):
    """backend: "fast" (our kernels), "reference" (the plain-PyTorch twins, same weights) or None
    (follow imgtx_fast.set_backend); a runtime choice, never saved with the weights."""

    config_class: type = None
    checkpoint_format: str = None

    @property
    def backend(self) -> Optional[str]:
        return self._backend_name

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        if name is not None and name not in _BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend must be one of {_BACKENDS} or None, got {name!r}")
        self._backend_name = name

    def _backend(self):
        """The context every public method runs its ops in."""
        return contextlib.nullcontext() if self.backend is None else _backend_block(self.backend)

    # -- checkpoints ------------------------------------------------------------------------
    def state(self, half: bool = False) -> dict:
        """The checkpoint as a dict of plain values and tensors (what `save` writes)."""
        return {"format": self.checkpoint_format, "config": asdict(self.config),
                "state_dict": half_state(self, half)}

    def save(self, path, half: bool = False) -> None:
        """One file: the config (plain values) and the state dict (float16 when `half`)."""
        torch.save(self.state(half), path)

    @classmethod
    def from_state(cls, blob: dict, backend: Optional[str] = None):
        model = cls(cls.config_class(**blob["config"]), backend=backend)
        load_state(model, blob["state_dict"])
        return model

    @classmethod
    def load(cls, path, map_location="cpu", backend: Optional[str] = None):
        """The model `save` wrote (weights_only loading: no code runs from the file)."""
        blob = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != cls.checkpoint_format:
            raise ValueError(f"{cls.__name__}.load: {path} is not a {cls.checkpoint_format} checkpoint")
        return cls.from_state(blob, backend)
