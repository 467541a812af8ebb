"""Bringing small results back from an accelerator: reduce where the tensors live, then copy once.

Hooks and reductions leave one small tensor per layer on that layer's device (several devices under
`device_map="auto"`). Copying each to the host on its own synchronises once per tensor; joining the ones
that share a device first makes it one copy per device.
"""
from __future__ import annotations

from typing import Sequence

import torch


def cat_to_host(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """`torch.cat(tensors, dim)` on the CPU, with one device-to-host copy per device the tensors live on."""
    if not tensors:
        raise ValueError("Nothing to concatenate.")
    devices = list(dict.fromkeys(t.device for t in tensors))
    if len(devices) == 1:
        return torch.cat(list(tensors), dim).cpu()
    on_host: dict[int, torch.Tensor] = {}
    for device in devices:
        idx = [i for i, t in enumerate(tensors) if t.device == device]
        joined = torch.cat([tensors[i] for i in idx], dim).cpu()
        on_host.update(zip(idx, joined.split([tensors[i].shape[dim] for i in idx], dim)))
    return torch.cat([on_host[i] for i in range(len(tensors))], dim)


def stack_to_host(tensors: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """`torch.stack(tensors, dim)` on the CPU, with one device-to-host copy per device."""
    return cat_to_host([t.unsqueeze(dim) for t in tensors], dim)
