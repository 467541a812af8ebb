"""Scoped forward hooks (pre-hooks, and post-hooks that edit an output) on a shared model.

Every hook registered here is tagged with a token; it runs only for forward calls made from a context
(thread or asyncio task) in which its `with` block is open, and it is removed when the block exits,
also on an exception. Blocks nest: an outer modulation and an inner activation capture both apply.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple], "tuple | None"]
PostHook = Callable[[nn.Module, tuple, object], "object | None"]
_ACTIVE: contextvars.ContextVar[frozenset] = contextvars.ContextVar("neurontune_active_hooks", default=frozenset())


def _guarded(fn: PreHook, token: object) -> PreHook:
    def hook(module: nn.Module, *args):
        if token not in _ACTIVE.get():  # another thread's call: leave it alone
            return None
        return fn(module, *args)
    return hook


@contextmanager
def scoped_pre_hooks(hooks: Iterable[tuple[nn.Module, PreHook]], with_kwargs: bool = False,
                     post: Iterable[tuple[nn.Module, PostHook]] = ()) -> Iterator[None]:
    """Register `(module, fn)` forward pre-hooks for this context only, for the duration of the block.
    With `with_kwargs`, fn is called as fn(module, args, kwargs) (torch's keyword-argument pre-hook).
    `post`: forward hooks fn(module, args, output) returning a new output or None, scoped the same way."""
    token = object()
    handles = [module.register_forward_pre_hook(_guarded(fn, token), with_kwargs=with_kwargs) for module, fn in hooks]
    handles += [module.register_forward_hook(_guarded(fn, token)) for module, fn in post]
    reset = _ACTIVE.set(_ACTIVE.get() | {token})
    try:
        yield
    finally:
        try:
            _ACTIVE.reset(reset)
        except ValueError:  # opened inside a forward that ran in another context (a gate's first forward in a worker)
            _ACTIVE.set(_ACTIVE.get() - {token})
        for h in handles:
            h.remove()


def delta_hook(idx: torch.Tensor, delta: torch.Tensor, keep: torch.Tensor | None, *, units_out: bool):
    """Forward hook adding what new minus old weights (`delta`) contribute, on the rows where `keep` is true if
    given; unchanged weights add exactly zero. `units_out`: the map's output units `idx` get x . delta[j] (gate and up
    rows); otherwise the output gets x[..., idx] @ delta (the output projection's columns)."""
    ready: dict = {}

    def hook(module, args, out):
        x = args[0]
        key = (x.device, x.dtype)
        if key not in ready:
            ready[key] = (idx.to(x.device), delta.to(x.device, x.dtype), None if keep is None else keep.to(x.device))
        i, d, k = ready[key]
        add = x @ d.t() if units_out else x.index_select(-1, i) @ d
        if k is not None:
            add = add * k.view(-1, *([1] * (add.dim() - 1))).to(add.dtype)
        return out.index_add(-1, i, add.to(out.dtype)) if units_out else out + add.to(out.dtype)
    return hook
