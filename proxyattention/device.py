"""The training device and its numeric precision.

``train.device=auto`` takes CUDA when torch sees a GPU, else the CPU. Mixed precision (``train.amp``,
``model.amp``) applies on CUDA only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from proxyattention.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``train.device`` (auto, cpu, cuda) as a torch device; cuda without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device(name)


@dataclass
class Precision:
    """Mixed precision on CUDA: bf16 where supported, else fp16 with a gradient scaler."""

    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    @classmethod
    def choose(cls, enabled: bool, device: torch.device) -> "Precision":
        if not enabled or device.type != "cuda":
            return cls(None, None)
        if torch.cuda.is_bf16_supported():
            return cls(torch.bfloat16, None)
        return cls(torch.float16, torch.amp.GradScaler("cuda"))

    def autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)
