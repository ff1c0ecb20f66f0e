"""What every process of a run must agree on, decided in one collective."""

from __future__ import annotations

import torch


def max_over_processes(value: int, device: torch.device | str, world_size: int) -> int:
    """The largest ``value`` any process passed, the same on every process: a collective (every process calls
    it at the same point), one int32 all-reduce and one read; with one process, ``value`` itself."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = torch.tensor([value], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())
    return value
