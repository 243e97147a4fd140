"""One step of the forward over a torch.distributed group: pipeline stages x tensor slices.

Ranks are laid out stage-major; the driver (the engine's own process) is rank 0:

    tp_degree = 2, 3 stages:   stage 0: ranks 0 1   stage 1: ranks 2 3   stage 2: ranks 4 5
                               layers [0, a)        layers [a, b)        layers [b, L)

Every step the driver broadcasts a WorkerStep to all ranks. Each rank applies the queued
slot moves to its own cache, then runs its layers: stage 0 embeds the tokens, a later stage
receives the hidden states from the same tensor rank of the stage before, and within a stage
the tensor slices sum their row-parallel products with an all-reduce. The last stage's
tensor rank 0 sends the logits to the driver (unless it is the driver). All shapes follow
from the step's inputs, so plain send/recv of fixed-size tensors is enough.

A decoder-only step goes down the pipeline as one micro-batch per stage, each a run of the
step's new queries and of its running rows (attention never mixes rows), with sends that
do not wait, so the stages compute at once:

    stage 0:  mb0 mb1 mb2
    stage 1:      mb0 mb1 mb2
    stage 2:          mb0 mb1 mb2   -> logits of each, reassembled by the driver

An encoder-decoder model (T5, pipeline stages only) makes two passes of one micro-batch:
the encoder blocks over the new queries, whose output every stage needs for its
cross-attention, then the decoder step.

The default group carries the step broadcast, where an idle worker may wait for hours (the
driver bounds its own side of it); the step's traffic runs on groups whose timeout bounds
the wait on a dead or hung peer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from engine.model_loader import LoadedModel
from engine.models.base import EncodeItem
from engine.models.decoder_only import (
    TP_ARCHS,
    DecoderOnlyExecutor,
    StepBatch,
    TensorSlice,
    num_layers,
)
from engine.models.t5 import T5Executor
from engine.protocol import WorkerStep

IDLE_TIMEOUT = timedelta(days=30)  # a worker waits this long for the next step


def split_evenly(total: int, parts: int) -> list[range]:
    """[0, total) in `parts` contiguous ranges; the first `total % parts` have one more."""
    base, extra = divmod(total, parts)
    starts = [p * base + min(p, extra) for p in range(parts + 1)]
    return [range(starts[p], starts[p + 1]) for p in range(parts)]


@dataclass(frozen=True)
class Layout:
    num_workers: int
    tp_degree: int

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.tp_degree < 1:
            raise ValueError("the number of workers and the TP degree must be >= 1")
        if self.num_workers % self.tp_degree:
            raise ValueError(
                f"{self.num_workers} workers do not split into tensor-parallel groups of "
                f"{self.tp_degree}"
            )

    @property
    def num_stages(self) -> int:
        return self.num_workers // self.tp_degree

    def stage(self, rank: int) -> int:
        return rank // self.tp_degree

    def layers(self, stage: int, total: int) -> range:
        """Contiguous layers of a stage; the first `total % stages` stages take one more."""
        return split_evenly(total, self.num_stages)[stage]

    def check(self, loaded: LoadedModel) -> None:
        """Raise ValueError with one clear line if `loaded` cannot run on this layout."""
        if self.num_workers == 1:
            return
        cfg = loaded.model.config
        tp = self.tp_degree
        if tp > 1 and cfg.model_type not in TP_ARCHS:
            raise ValueError(
                f"tensor parallelism supports {', '.join(sorted(TP_ARCHS))}, "
                f"not {cfg.model_type}; use pipeline stages (--tp 1)"
            )
        if tp > 1 and (cfg.num_key_value_heads % tp or cfg.intermediate_size % tp):
            raise ValueError(
                f"tensor parallelism {self.tp_degree} must divide the KV heads "
                f"({cfg.num_key_value_heads}) and the MLP width ({cfg.intermediate_size})"
            )
        depth = min(
            num_layers(loaded), getattr(cfg, "num_decoder_layers", None) or num_layers(loaded)
        )
        if self.num_stages > depth:
            raise ValueError(f"{self.num_stages} pipeline stages exceed the model's {depth} layers")


class StageWorker(ABC):
    """One rank's share of every step (the driver's included): its layers, its heads."""

    executor: DecoderOnlyExecutor | T5Executor

    def __init__(self, layout: Layout, vocab_size: int, groups: tuple[Any, list[Any]]) -> None:
        self.rank = dist.get_rank()
        self.layout = layout
        self.stage = layout.stage(self.rank)
        self.data_group, self.tp_groups = groups
        self.vocab_size = vocab_size
        self.last_rank = (layout.num_stages - 1) * layout.tp_degree  # sends the logits

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.num_stages - 1

    @torch.inference_mode()
    def run(self, step: WorkerStep) -> torch.Tensor | None:
        """This rank's part of the step; the logits where this rank is the driver."""
        for src, dst, length in step.moves:
            self.executor.move_slot(src, dst, length)
        items = [EncodeItem(slot, ids) for slot, ids in step.items]
        return self.forward(items, step.token_ids, step.context_lens)

    @abstractmethod
    def forward(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor | None:
        """ModelExecutor.forward's arguments; returns the logits on the driver only."""

    def _pipe(self, passes: list[Pass], dtype: torch.dtype) -> list[torch.Tensor]:
        """Micro-batches down the pipeline: stage 0 computes each pass's `first()`, later
        stages receive it from the stage before; each stage applies its `layers` and sends
        the result on without waiting, so stage s works on micro-batch c while stage s+1
        works on c-1. Returns this stage's outputs (the results, on the last stage)."""
        tp = self.layout.tp_degree
        sends = []
        outs = []
        for p in passes:
            if self.stage == 0:
                h = p.first()
            else:
                h = torch.empty(p.shape, dtype=dtype)
                dist.recv(h, src=self.rank - tp, group=self.data_group)
            h = p.layers(h)
            if not self.is_last_stage:
                sends.append(self._isend(h, self.rank + tp))
            outs.append(h)
        for send in sends:
            send.wait()
        return outs

    def _isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        work = dist.isend(tensor, dst=dst, group=self.data_group)
        assert work is not None  # every rank is in the data group
        return work

    def _deliver(
        self, logits: list[Callable[[], torch.Tensor]], num_rows: list[int]
    ) -> list[torch.Tensor] | None:
        """Each micro-batch's logits, computed by the last stage and received by the driver
        (None on every other rank)."""
        if self.rank == self.last_rank:
            outs = [compute() for compute in logits]
            if self.rank == 0:
                return outs
            for work in [self._isend(out, 0) for out in outs]:
                work.wait()
        if self.rank != 0:
            return None
        outs = [torch.empty(rows, self.vocab_size) for rows in num_rows]  # [rows, vocab] f32
        for out in outs:
            dist.recv(out, src=self.last_rank, group=self.data_group)
        return outs


@dataclass(frozen=True)
class Pass:
    """One micro-batch's trip down the pipeline (StageWorker._pipe)."""

    first: Callable[[], torch.Tensor]  # stage 0's input
    layers: Callable[[torch.Tensor], torch.Tensor]  # every stage's own layers
    shape: tuple[int, int]  # of what a stage receives


class DecoderOnlyStage(StageWorker):
    def __init__(
        self,
        loaded: LoadedModel,
        layout: Layout,
        num_slots: int,
        max_len: int,
        groups: tuple[Any, list[Any]],
    ) -> None:
        super().__init__(layout, loaded.vocab_size, groups)
        tp = None
        if layout.tp_degree > 1:
            reduce = partial(dist.all_reduce, group=self.tp_groups[self.stage])
            tp = TensorSlice(self.rank % layout.tp_degree, layout.tp_degree, reduce)
        layers = layout.layers(self.stage, num_layers(loaded))
        self.executor: DecoderOnlyExecutor = DecoderOnlyExecutor(
            loaded, num_slots, max_len, layers, tp
        )

    def forward(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor | None:
        ex = self.executor
        parts = self._micro_batches(items, token_ids, context_lens)
        passes = [
            Pass(partial(ex.embed, b), partial(ex.run_layers, b), (b.num_tokens, ex.hidden_size))
            for b in parts
        ]
        hs = self._pipe(passes, ex.dtype)  # [packed + n, hidden] each
        logits = self._deliver(
            [partial(ex.logits, b, h) for b, h in zip(parts, hs, strict=True)],
            [b.num_logits for b in parts],
        )
        if logits is None:
            return None
        # each micro-batch's logits are its queries', then its rows'; the step's are all
        # the queries', then all the rows'
        queries = [out[: len(b.items)] for out, b in zip(logits, parts, strict=True)]
        rows = [out[len(b.items) :] for out, b in zip(logits, parts, strict=True)]
        return torch.cat(queries + rows)

    def _micro_batches(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> list[StepBatch]:
        """One micro-batch per stage (fewer when the step has fewer queries and rows):
        contiguous runs of the queries to encode and of the running rows."""
        parts = self.layout.num_stages
        ranges = zip(
            split_evenly(len(items), parts), split_evenly(len(token_ids), parts), strict=True
        )
        return [
            self.executor.batch(
                items[q.start : q.stop],
                token_ids[r.start : r.stop],
                context_lens[r.start : r.stop],
                first_row=r.start,
            )
            for q, r in ranges
            if len(q) or len(r)
        ]


class T5Stage(StageWorker):
    """Two passes down the pipeline per step: the encoder over the new queries, whose output
    the last stage broadcasts (every stage projects it into its own cross-attention cache),
    then the decoder step."""

    def __init__(
        self,
        loaded: LoadedModel,
        layout: Layout,
        num_slots: int,
        max_len: int,
        groups: tuple[Any, list[Any]],
    ) -> None:
        super().__init__(layout, loaded.vocab_size, groups)
        cfg = loaded.model.config
        self.executor: T5Executor = T5Executor(
            loaded,
            num_slots,
            max_len,
            layout.layers(self.stage, cfg.num_layers),
            layout.layers(self.stage, cfg.num_decoder_layers),
        )

    def forward(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor | None:
        ex = self.executor
        if items:
            packed = sum(len(item.token_ids) for item in items)
            encode = Pass(
                partial(ex.encoder_embed, items),
                partial(ex.encoder_layers, items),
                (packed, ex.hidden_size),
            )
            (enc,) = self._pipe([encode], ex.dtype)  # [packed, d_model]
            if self.is_last_stage:
                enc = ex.encoder_finish(enc)
            dist.broadcast(enc, src=self.last_rank, group=self.data_group)
            ex.store_cross(items, enc)
        batch = ex.decode_batch(items, token_ids, context_lens)
        rows = len(batch.slots)
        decode = Pass(
            partial(ex.decoder_embed, batch),
            partial(ex.decoder_layers, batch),
            (rows, ex.hidden_size),
        )
        (h,) = self._pipe([decode], ex.dtype)  # [rows, d_model]
        logits = self._deliver([partial(ex.logits, h)], [rows])
        return None if logits is None else logits[0]


def make_stage(
    loaded: LoadedModel,
    layout: Layout,
    num_slots: int,
    max_len: int,
    groups: tuple[Any, list[Any]],
) -> StageWorker:
    stage = T5Stage if loaded.is_encoder_decoder else DecoderOnlyStage
    return stage(loaded, layout, num_slots, max_len, groups)


def join_group(
    loaded: LoadedModel, layout: Layout, store: dist.Store, rank: int, timeout_s: float
) -> tuple[Any, list[Any]]:
    """Join the default group (gloo) and make the step's groups; every rank calls this.

    Raises RuntimeError if the ranks loaded different weights (a model folder that
    differs between machines, or random weights made from another seed)."""
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=layout.num_workers, timeout=IDLE_TIMEOUT
    )
    step_timeout = timedelta(seconds=timeout_s)
    data_group = dist.new_group(timeout=step_timeout)
    tp_groups = [
        dist.new_group(
            list(range(s * layout.tp_degree, (s + 1) * layout.tp_degree)), timeout=step_timeout
        )
        for s in range(layout.num_stages)
    ]
    mine = weights_fingerprint(loaded)
    everyone = [torch.zeros_like(mine) for _ in range(layout.num_workers)]
    dist.all_gather(everyone, mine, group=data_group)
    differing = [r for r, theirs in enumerate(everyone) if not torch.equal(theirs, mine)]
    if differing:
        raise RuntimeError(f"workers {differing} loaded other weights than worker {rank}")
    return data_group, tp_groups


def weights_fingerprint(loaded: LoadedModel) -> torch.Tensor:
    """[2] float64: the sum of every weight, and the sum weighted by parameter order."""
    sums = torch.stack([p.detach().double().sum() for p in loaded.model.parameters()])
    order = torch.arange(1, len(sums) + 1, dtype=torch.float64)
    return torch.stack([sums.sum(), (sums * order).sum()])


_step_decoder = msgspec.msgpack.Decoder(WorkerStep)


def send_step(step: WorkerStep, timeout_s: float) -> None:
    """The driver's side of the step broadcast. Gloo's broadcast waits for every receiver,
    so a hung worker would hold it for the group's idle timeout: the wait is bounded here."""
    data = torch.frombuffer(bytearray(msgspec.msgpack.encode(step)), dtype=torch.uint8)
    timeout = timedelta(seconds=timeout_s)
    for tensor in (torch.tensor([len(data)]), data):
        dist.broadcast(tensor, src=0, async_op=True).wait(timeout)


def receive_step() -> WorkerStep:
    """A worker's side: wait (for as long as the engine is idle) for the driver's step."""
    size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src=0)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return _step_decoder.decode(data.numpy().tobytes())
