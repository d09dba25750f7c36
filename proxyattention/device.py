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
        """bf16 where the GPU computes it natively (capability 8.0 and newer), fp16 + scaler below."""
        if not enabled or device.type != "cuda":
            return cls(None, None)
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return cls(torch.bfloat16, None)
        return cls(torch.float16, torch.amp.GradScaler("cuda"))

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


def configure_backends(device: torch.device) -> None:
    """Let cuDNN pick the fastest convolution algorithms for the trial's fixed input shapes."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def device_info(device: torch.device, precision: Precision, batch_size: int) -> dict[str, Any]:
    """The ``device`` block of ``result.json``: where and how the trial computed."""
    import platform

    cuda = device.type == "cuda"
    return {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "precision": precision.name,
        "batch_size": int(batch_size),
    }
