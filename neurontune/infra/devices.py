"""Bringing small results back from an accelerator: reduce where the tensors live, then copy once.

Hooks and reductions leave one small tensor per layer on that layer's device (several devices under
`device_map="auto"`). Copying each to the host on its own synchronises once per tensor; stacking the ones
that share a device first makes it one copy per device.
"""
from __future__ import annotations

from typing import Sequence

import torch


def stack_to_host(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """`torch.stack(tensors, dim)` on the CPU, with one device-to-host copy per device the tensors live on."""
    if not tensors:
        raise ValueError("Nothing to stack.")
    devices = {t.device for t in tensors}
    if len(devices) == 1:
        return torch.stack(list(tensors), dim).cpu()
    on_host: dict[int, torch.Tensor] = {}
    for device in devices:
        idx = [i for i, t in enumerate(tensors) if t.device == device]
        for i, t in zip(idx, torch.stack([tensors[i] for i in idx]).cpu().unbind(0)):
            on_host[i] = t
    return torch.stack([on_host[i] for i in range(len(tensors))], dim)
