"""Many processes: data parallel over the inputs under ``torchrun`` or ``accelerate launch``.

``torchrun --nproc_per_node N -m sinkless scan ...`` (or ``accelerate launch -m sinkless scan ...``)
starts N copies of the command. ``setup`` joins them into one ``torch.distributed`` group through
accelerate's ``PartialState`` (NCCL on GPUs, one GPU per process; gloo on CPUs). Each process then
measures its share of the work (``shard``: every N-th batch or image), and ``gather_dict`` /
``all_sum`` give every process the results of all, so each one takes the same decisions and the
main process writes the same outputs a single process would (scan records are per input and batches
keep their single-process boundaries, so the numbers are the ones one process computes). Only the
main process prints, shows progress and writes files. No scheduler of our own: the launcher starts
the processes, torch.distributed moves the results.

Without a launcher (no ``WORLD_SIZE`` > 1 in the environment) every function is the identity.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")

__all__ = [
    "setup", "placement", "active", "rank", "world_size", "is_main", "shard", "gather_dict", "map_ordered", "all_sum", "barrier", "process_device",
]

log = logging.getLogger(__name__)


def _launched() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def setup(device: torch.device | str | None = None) -> None:
    """Join the process group a launcher prepared (no-op when there is none or it is already joined)."""
    if not _launched() or active():
        return
    from accelerate import PartialState

    cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    atexit.register(_finish)
    if not active():
        raise RuntimeError(f"launched with WORLD_SIZE={os.environ.get('WORLD_SIZE')} but no process group started ({state.distributed_type})")
    log.debug("process %d of %d (%s)", rank(), world_size(), state.backend)


def _finish() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def placement(device: str | torch.device = "auto", dtype: str | torch.dtype = "float32") -> tuple[torch.device, torch.dtype]:
    """A command's ``--device`` / ``--dtype`` resolved, after joining the launcher's process group if any
    (then each process on a node takes its own GPU)."""
    from sinkless.devices import resolve_device, resolve_dtype

    resolved = resolve_device(device)
    setup(resolved)
    return process_device(resolved), resolve_dtype(dtype)


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def process_device(device: torch.device) -> torch.device:
    """Under a launcher, process k of a node uses GPU k (``LOCAL_RANK``); other devices are shared."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(items: Sequence) -> list:
    """This process's share of ``items``: every ``world_size``-th one from ``rank`` (all of them alone)."""
    return list(items)[rank() :: world_size()]


def gather_dict(mine: dict) -> dict:
    """The union of every process's ``mine`` (disjoint keys), on every process."""
    if not active():
        return dict(mine)
    parts: list = [None] * world_size()
    torch.distributed.all_gather_object(parts, mine)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def map_ordered(fn: Callable[[int], T], n: int, *, desc: str | None = None, progress: bool = False) -> list[T]:
    """``[fn(i) for i in range(n)]`` with each process computing its share; every process gets the whole list."""
    mine = shard(range(n))
    done = {i: fn(i) for i in tqdm(mine, desc=desc, disable=not (progress and is_main()), leave=False)}
    merged = gather_dict(done)
    return [merged[i] for i in range(n)]


def all_sum(*tensors: torch.Tensor) -> None:
    """Sum CPU tensors over the processes, in place (every process gets the totals)."""
    if not active():
        return
    on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    for tensor in tensors:
        moved = tensor.to(process_device(torch.device("cuda"))) if on_gpu else tensor
        torch.distributed.all_reduce(moved, op=torch.distributed.ReduceOp.SUM)
        if on_gpu:
            tensor.copy_(moved.cpu())


def barrier() -> None:
    if active():
        torch.distributed.barrier()
