"""Proxy Attention: one trial of a timm classifier trained with (or without) CAM-guided proxy images.

Importing this package is cheap: heavy modules (torch, timm, pytorch-grad-cam) are imported by the
submodules that need them, so ``proxyattention.config`` and ``proxyattention.schedule`` serve the
launcher without paying for torch.
"""

__version__ = "0.1.0"
