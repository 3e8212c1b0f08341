"""Host data to the model's device without making the host wait.

A copy from ordinary (pageable) host memory to a GPU waits until everything
queued before it on the stream has run. That would hold the preparation of
iteration i+1 behind iteration i on the device, which is what async
scheduling overlaps; so inputs go through pinned memory, copied
asynchronously (torch's pinned-memory cache keeps each buffer until its copy
is done). On a CPU nothing is copied.
"""
from __future__ import annotations

import numpy as np
import torch


def to_device(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return _staged(data, device).to(device, non_blocking=True)


def copy_from_host(dst: torch.Tensor, data: np.ndarray) -> None:
    """``dst.copy_(data)``, not waiting for the device when ``dst`` is on a GPU."""
    dst.copy_(_staged(data, dst.device), non_blocking=True)


def _staged(data: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    # non_blocking is a no-op for a copy between CPU tensors.
    t = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
    return t.pin_memory() if device.type == "cuda" else t
