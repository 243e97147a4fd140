"""The torch.distributed groups of a model worker group, and the driver's step broadcast.

Every rank joins the default group (gloo), then makes the same groups in the same order
(torch requires it, members or not):

    steps   the step broadcast from the driver to the ranks that decode (all of them
            without a WAA split), where an idle worker may wait for hours: the driver's
            side of it times out after a step's timeout, so a hung worker cannot hold
            the group's teardown
    side    the ranks of one side (engine.layout.Allocation): pipeline sends, T5's
            broadcast of the encoder output, the encode side's barrier before a hand-over;
            its timeout bounds the wait on a dead or hung peer within a step
    tp      the tensor slices of one stage: their all-reduces

WAA's hand-over (engine/handover.py) runs point to point on the default group, its waits
bounded by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from engine.layout import Allocation
from engine.model_loader import LoadedModel
from engine.protocol import WorkerStep

IDLE_TIMEOUT = timedelta(days=30)  # a worker waits this long for the next step


@dataclass(frozen=True)
class RankGroups:
    """The groups one rank computes in (see the module doc)."""

    steps: Any
    side: Any
    tp: Any


def join_group(
    loaded: LoadedModel, allocation: Allocation, store: dist.Store, rank: int, timeout_s: float
) -> RankGroups:
    """Join the default group and make the step's groups; every rank calls this.

    Raises RuntimeError if the ranks loaded different weights (a model folder that
    differs between machines, or random weights made from another seed)."""
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=allocation.num_workers, timeout=IDLE_TIMEOUT
    )
    step_timeout = timedelta(seconds=timeout_s)
    everyone = dist.new_group(timeout=step_timeout)
    side = tp = None
    for layout in allocation.sides:
        if layout.num_workers == allocation.num_workers:
            side_group = everyone
        else:
            side_group = dist.new_group(list(layout.ranks), timeout=step_timeout)
        stage_groups = [
            dist.new_group(list(layout.stage_ranks(s)), timeout=step_timeout)
            for s in range(layout.num_stages)
        ]
        if rank in layout.ranks:
            side, tp = side_group, stage_groups[layout.stage(rank)]
    # the driver's broadcasts give up after a step's timeout (a hung worker then cannot
    # hold the group's teardown); a worker waits for the next step as long as it is idle
    steps = dist.new_group(
        list(allocation.decode.ranks), timeout=step_timeout if rank == 0 else IDLE_TIMEOUT
    )
    mine = weights_fingerprint(loaded)
    theirs = [torch.zeros_like(mine) for _ in range(allocation.num_workers)]
    dist.all_gather(theirs, mine, group=everyone)
    differing = [r for r, other in enumerate(theirs) if not torch.equal(other, mine)]
    if differing:
        raise RuntimeError(f"workers {differing} loaded other weights than worker {rank}")
    return RankGroups(steps, side, tp)


def weights_fingerprint(loaded: LoadedModel) -> torch.Tensor:
    """[2] float64: the sum of every weight, and the sum weighted by parameter order."""
    sums = torch.stack([p.detach().double().sum() for p in loaded.model.parameters()])
    order = torch.arange(1, len(sums) + 1, dtype=torch.float64)
    return torch.stack([sums.sum(), (sums * order).sum()])


_step_decoder = msgspec.msgpack.Decoder(WorkerStep)


class SentStep:
    """The driver's side of the step broadcast, sent without waiting (a worker takes the
    step when done with the one before); its tensors live until it is waited for."""

    def __init__(self, step: WorkerStep, group: Any) -> None:
        data = torch.frombuffer(bytearray(msgspec.msgpack.encode(step)), dtype=torch.uint8)
        self._tensors = (torch.tensor([len(data)]), data)
        self._works = [
            dist.broadcast(tensor, src=0, group=group, async_op=True) for tensor in self._tensors
        ]

    def wait(self, timeout_s: float) -> None:
        """Gloo's broadcast waits for every receiver, so a hung worker would hold it for
        the group's idle timeout: the wait is bounded here."""
        for work in self._works:
            work.wait(timedelta(seconds=timeout_s))


def receive_step(group: Any) -> WorkerStep:
    """A worker's side: wait (for as long as the engine is idle) for the driver's step."""
    size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src=0, group=group)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return _step_decoder.decode(data.numpy().tobytes())
