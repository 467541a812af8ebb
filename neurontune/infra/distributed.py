"""Data parallelism over the processes `accelerate launch` starts: which batches are this process's, and
the reductions that make an N-process run equal a single-process one. Only the main process writes.

Outside a multi-process launch every helper is a no-op (rank 0 of 1) and accelerate is never imported, so
the studio, the tests and `python -m neurontune` behave exactly as before.
"""
from __future__ import annotations

import gc
import os
from typing import Callable, Sequence, TypeVar

import torch

from .progress import SILENT, Reporter

T = TypeVar("T")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # torchrun, MPI


def launched() -> bool:
    """True in a process started by a multi-process launcher (`accelerate launch`, torchrun, mpirun)."""
    return any(int(os.environ.get(v) or 1) > 1 for v in _WORLD_VARS)


def _state():
    """accelerate's PartialState (joins the process group on first use), or None for a single process."""
    if not launched():
        return None
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    # NCCL on GPUs; gloo on the CPU. PartialState does not read ACCELERATE_USE_CPU itself (Accelerator does).
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def rank_and_size() -> tuple[int, int]:
    s = _state()
    return (s.process_index, s.num_processes) if s is not None else (0, 1)


def is_main() -> bool:
    """The process that writes files and caches, prints summaries and shows progress bars."""
    return rank_and_size()[0] == 0


def device() -> torch.device | None:
    """This process's own accelerator under a multi-GPU launch (cuda:<local rank>); None otherwise."""
    s = _state()
    return s.device if s is not None and s.device.type != "cpu" else None


def shard(jobs: Sequence[T]) -> list[T]:
    """This process's share of `jobs`: every size-th job from its rank on. Round robin keeps the load even
    when neighbouring jobs cost alike (batches of one prompt group); one process gets them all."""
    rank, size = rank_and_size()
    return list(jobs[rank::size])


def all_true(flag: bool) -> bool:
    """True only if `flag` holds on every process (e.g. each found the cache entry), so all take one branch."""
    s = _state()
    if s is None:
        return bool(flag)
    from accelerate.utils import reduce
    votes = reduce(torch.tensor([int(bool(flag))], device=s.device), reduction="sum")
    return int(votes.item()) == s.num_processes


def sum_over_processes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise sums over all processes, on the CPU. The collective runs on this process's device
    (NCCL needs GPU tensors; gloo takes CPU ones); one all-reduce per dtype."""
    s = _state()
    if s is None:
        return tensors
    from accelerate.utils import reduce
    out = {}
    for dtype in dict.fromkeys(v.dtype for v in tensors.values()):  # same order on every process (a set's is not)
        keys = [k for k, v in tensors.items() if v.dtype == dtype]
        flat = torch.cat([tensors[k].reshape(-1) for k in keys]).to(s.device)
        flat = reduce(flat, reduction="sum").cpu()
        for k, part in zip(keys, flat.split([tensors[k].numel() for k in keys])):
            out[k] = part.view_as(tensors[k])
    return {k: out[k] for k in tensors}


def sum_groups(groups: dict) -> dict:
    """Per-group attribution sums (`attribution.GroupScores`) added up over all processes: sums of sums and
    sums of counts, so the means taken afterwards equal a single-process run's up to float rounding."""
    if _state() is None:
        return groups
    flat = {f"{name}\x1f{k}": v for name, g in groups.items() for k, v in g.tensors().items()}
    total = sum_over_processes(flat)
    return {name: type(g).from_tensors({k: total[f"{name}\x1f{k}"] for k in g.tensors()}) for name, g in groups.items()}


def gather(items: list) -> list:
    """Every process's `items` (picklable), concatenated in rank order, on every process."""
    if _state() is None:
        return list(items)
    from accelerate.utils import gather_object
    return gather_object(list(items))


def map_batches(fn: Callable[[list, Reporter], list], items: Sequence, batch_size: int,
                reporter: Reporter | None = None, stage: str = "") -> list:
    """`fn(batch, reporter)` over consecutive batches of `items`, the batches shared round robin over the
    processes; every process gets all results in item order. A batch holds the same items as in a
    single-process run (same padding, same greedy answers). With one process: `fn(items, reporter)`."""
    reporter = reporter or SILENT
    if _state() is None:
        return fn(list(items), reporter)
    starts = shard(range(0, len(items), batch_size))
    total, done, mine = sum(min(batch_size, len(items) - s) for s in starts), 0, []
    for s in starts:
        mine.append((s, fn(list(items[s:s + batch_size]), SILENT)))
        done += len(mine[-1][1])
        reporter.progress(done, total, stage)
    out: list = [None] * len(items)
    for s, results in gather(mine):
        out[s:s + len(results)] = results
    return out


def barrier() -> None:
    s = _state()
    if s is not None:
        s.wait_for_everyone()


def close() -> None:
    """Leave the process group (at the end of a launched CLI command), all processes together: a process that tears
    gloo down while another still writes its files can abort at exit ("terminate called without an active exception").
    The group object is collected here, while the interpreter is whole, not during its shutdown."""
    if launched() and torch.distributed.is_available() and torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()
        gc.collect()
