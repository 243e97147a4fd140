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

A decoder-only step goes down the pipeline as micro-batches (one per stage unless the step
says how many), each a run of the step's new queries and of its running rows (attention
never mixes rows), with sends that do not wait, so the stages compute at once:

    stage 0:  mb0 mb1 mb2
    stage 1:      mb0 mb1 mb2
    stage 2:          mb0 mb1 mb2   -> logits of each, reassembled by the driver

An encoder-decoder model (T5, pipeline stages only) makes two passes of one micro-batch:
the encoder blocks over the new queries, whose output every stage needs for its
cross-attention, then the decoder step.

Nothing in a step waits for a later stage: the driver posts the receives of the step's
logits when it starts the step and takes them later (`Pending`), and a stage's sends
complete when the next step needs the link again. So the driver may start further steps
on other cache rows before the first one's logits are back, and each stage works on a
different step at once (engine/pipelined.py keeps one step per stage in flight):

    stage 0:  A0  B0  A1  B1  A2          A, B: steps over two sets of rows; A1 starts
    stage 1:      A0  B0  A1  B1          once A0's logits are sampled

Under WAA (`Allocation` with encode workers) the group is two such pipelines side by side:
the driver's side decodes, step by step as above; the encode side runs the same stages on
each encode batch it is handed and passes the prompts' KV on (engine/handover.py). The
groups the ranks compute in are in engine/groups.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine.handover import Incoming, expect_prompts
from engine.layout import Allocation, Layout, split_evenly
from engine.model_loader import LoadedModel
from engine.models.base import EncodeItem
from engine.models.decoder_only import DecoderOnlyExecutor, StepBatch, TensorSlice, num_layers
from engine.models.t5 import T5Executor
from engine.protocol import EncodeOrder, WorkerStep

if TYPE_CHECKING:
    from engine.groups import RankGroups


class StageWorker(ABC):
    """One rank's share of every step (the driver's included): its layers, its heads.

    On the driver's side a step's logits go to the driver; on WAA's encode side they stay
    on the last stage, which hands them over itself. A decode rank of a WAA group also
    keeps the encode batches announced to it, until their rows are placed (`incoming`)."""

    executor: DecoderOnlyExecutor | T5Executor
    num_model_layers: int  # the model's layers with a KV cache (T5: its decoder blocks)
    cache_layers: range  # those this rank holds

    def __init__(self, layout: Layout, vocab_size: int, groups: RankGroups) -> None:
        self.rank = dist.get_rank()
        self.layout = layout
        self.stage = layout.stage(self.rank)
        self.groups = groups
        self.vocab_size = vocab_size
        self.last_rank = layout.last_rank
        self.is_driver_side = layout.first_rank == 0
        self.incoming: deque[Incoming] = deque()
        self.expect: Callable[[list[int]], Incoming] | None = None  # set by make_stage
        self._sends: list[dist.Work] = []  # to the next stage, in flight

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.layout.num_stages - 1

    @torch.inference_mode()
    def run(self, step: WorkerStep) -> Pending | None:
        """This rank's part of the step; the logits to come where this rank is the driver.
        Order: the moves (rows compacted), the arrived encode batches (rows placed after
        them), the forward."""
        for src, dst, length in step.moves:
            self.executor.move_slot(src, dst, length)
        if step.encodes or step.installs:
            assert self.expect is not None, "an encode batch announced without encode workers"
            self.incoming.extend(self.expect(lens) for lens in step.encodes)
            for rows in step.installs:
                self.incoming.popleft().install(self.executor, rows)
        if not (step.items or step.token_ids):
            if self.rank != 0:
                return None
            return Pending([torch.empty(0, self.vocab_size)], [], lambda parts: parts[0])
        items = [EncodeItem(slot, ids) for slot, ids in step.items]
        return self.forward(
            items, step.token_ids, step.context_lens, step.num_microbatches, step.first_row
        )

    @torch.inference_mode()
    def encode(self, order: EncodeOrder) -> torch.Tensor | None:
        """WAA's encode side: encode a batch, query i into cache row i; returns the first
        tokens' logits [queries, vocab] on the last stage (None elsewhere)."""
        items = [EncodeItem(row, prompt) for row, prompt in enumerate(order.prompts)]
        pending = self.forward(items, [], [])
        return None if pending is None else pending.wait(timedelta(0))  # computed here

    def finish_sends(self) -> None:
        """Wait for this rank's sends to the next stage (before leaving the group)."""
        for send in self._sends:
            send.wait()
        self._sends = []

    @abstractmethod
    def forward(
        self,
        items: list[EncodeItem],
        token_ids: list[int],
        context_lens: list[int],
        num_microbatches: int = 0,
        first_row: int = 0,
    ) -> Pending | None:
        """ModelExecutor.forward's arguments (the running rows are cache rows from
        `first_row` on) and the micro-batches to cut the step into (0: one per stage);
        returns the logits to come on the driver, or, on WAA's encode side, on the last
        stage."""

    def _pipe(self, passes: list[Pass], dtype: torch.dtype) -> list[torch.Tensor]:
        """Micro-batches down the pipeline: stage 0 computes each pass's `first()`, later
        stages receive it from the stage before; each stage applies its `layers` and sends
        the result on without waiting, so stage s works on micro-batch c while stage s+1
        works on c-1. The sends complete by the next pass down the same link, so a stage
        goes on to the next step while the next stage finishes this one. Returns this
        stage's outputs (the results, on the last stage)."""
        tp = self.layout.tp_degree
        self.finish_sends()
        outs = []
        for p in passes:
            if self.stage == 0:
                h = p.first()
            else:
                h = torch.empty(p.shape, dtype=dtype)
                dist.recv(h, src=self.rank - tp, group=self.groups.side)
            h = p.layers(h)
            if not self.is_last_stage:
                self._sends.append(self._isend(h, self.rank + tp))
            outs.append(h)
        return outs

    def _isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        work = dist.isend(tensor, dst=dst, group=self.groups.side)
        assert work is not None  # every rank is in its side's group
        return work

    def _deliver(
        self,
        logits: list[Callable[[], torch.Tensor]],
        num_rows: list[int],
        assemble: Callable[[list[torch.Tensor]], torch.Tensor],
    ) -> Pending | None:
        """Each micro-batch's logits, computed by the last stage, for the driver (None on
        every other rank; on WAA's encode side, kept by the last stage). The driver posts
        its receives and returns; the last stage's sends wait for them."""
        if self.rank == self.last_rank:
            outs = [compute() for compute in logits]
            if self.rank == 0 or not self.is_driver_side:
                return Pending(outs, [], assemble)
            for work in [self._isend(out, 0) for out in outs]:
                work.wait()
        if self.rank != 0:
            return None
        outs = [torch.empty(rows, self.vocab_size) for rows in num_rows]  # [rows, vocab] f32
        receives = [dist.irecv(out, src=self.last_rank, group=self.groups.side) for out in outs]
        return Pending(outs, [work for work in receives if work is not None], assemble)


@dataclass(frozen=True)
class Pass:
    """One micro-batch's trip down the pipeline (StageWorker._pipe)."""

    first: Callable[[], torch.Tensor]  # stage 0's input
    layers: Callable[[torch.Tensor], torch.Tensor]  # every stage's own layers
    shape: tuple[int, int]  # of what a stage receives


class Pending:
    """The driver's logits of a step in flight: its micro-batches' logits, computed here
    or on their way from the last stage (`receives`); `wait` assembles them."""

    def __init__(
        self,
        parts: list[torch.Tensor],
        receives: list[dist.Work],
        assemble: Callable[[list[torch.Tensor]], torch.Tensor],
    ) -> None:
        self._parts = parts
        self._receives = receives
        self._assemble = assemble

    def wait(self, timeout: timedelta) -> torch.Tensor:
        for work in self._receives:
            work.wait(timeout)
        return self._assemble(self._parts)


class DecoderOnlyStage(StageWorker):
    def __init__(
        self,
        loaded: LoadedModel,
        layout: Layout,
        num_slots: int,
        max_len: int,
        groups: RankGroups,
    ) -> None:
        super().__init__(layout, loaded.vocab_size, groups)
        tp = None
        if layout.tp_degree > 1:
            reduce = partial(dist.all_reduce, group=groups.tp)
            tp = TensorSlice(layout.tp_rank(self.rank), layout.tp_degree, reduce)
        self.num_model_layers = num_layers(loaded)
        self.cache_layers = layout.layers(self.stage, self.num_model_layers)
        self.executor: DecoderOnlyExecutor = DecoderOnlyExecutor(
            loaded, num_slots, max_len, self.cache_layers, tp
        )

    def forward(
        self,
        items: list[EncodeItem],
        token_ids: list[int],
        context_lens: list[int],
        num_microbatches: int = 0,
        first_row: int = 0,
    ) -> Pending | None:
        ex = self.executor
        parts = self._micro_batches(
            items, token_ids, context_lens, num_microbatches or self.layout.num_stages, first_row
        )
        passes = [
            Pass(partial(ex.embed, b), partial(ex.run_layers, b), (b.num_tokens, ex.hidden_size))
            for b in parts
        ]
        hs = self._pipe(passes, ex.dtype)  # [packed + n, hidden] each

        def assemble(logits: list[torch.Tensor]) -> torch.Tensor:
            # each micro-batch's logits are its queries', then its rows'; the step's are
            # all the queries', then all the rows'
            queries = [out[: len(b.items)] for out, b in zip(logits, parts, strict=True)]
            rows = [out[len(b.items) :] for out, b in zip(logits, parts, strict=True)]
            return torch.cat(queries + rows)

        return self._deliver(
            [partial(ex.logits, b, h) for b, h in zip(parts, hs, strict=True)],
            [b.num_logits for b in parts],
            assemble,
        )

    def _micro_batches(
        self,
        items: list[EncodeItem],
        token_ids: list[int],
        context_lens: list[int],
        parts: int,
        first_row: int,
    ) -> list[StepBatch]:
        """`parts` micro-batches (fewer when the step has fewer queries and rows):
        contiguous runs of the queries to encode and of the running rows."""
        ranges = zip(
            split_evenly(len(items), parts), split_evenly(len(token_ids), parts), strict=True
        )
        return [
            self.executor.batch(
                items[q.start : q.stop],
                token_ids[r.start : r.stop],
                context_lens[r.start : r.stop],
                first_row=first_row + r.start,
            )
            for q, r in ranges
            if len(q) or len(r)
        ]


class T5Stage(StageWorker):
    """Two passes down the pipeline per step: the encoder over the new queries, whose output
    the last stage broadcasts (every stage projects it into its own cross-attention cache),
    then the decoder step, one micro-batch each."""

    def __init__(
        self,
        loaded: LoadedModel,
        layout: Layout,
        num_slots: int,
        max_len: int,
        groups: RankGroups,
    ) -> None:
        super().__init__(layout, loaded.vocab_size, groups)
        cfg = loaded.model.config
        self.num_model_layers = cfg.num_decoder_layers
        self.cache_layers = layout.layers(self.stage, self.num_model_layers)
        self.executor: T5Executor = T5Executor(
            loaded,
            num_slots,
            max_len,
            layout.layers(self.stage, cfg.num_layers),
            self.cache_layers,
        )

    def forward(
        self,
        items: list[EncodeItem],
        token_ids: list[int],
        context_lens: list[int],
        num_microbatches: int = 0,
        first_row: int = 0,
    ) -> Pending | None:
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
            dist.broadcast(enc, src=self.last_rank, group=self.groups.side)
            ex.store_cross(items, enc)
        batch = ex.decode_batch(items, token_ids, context_lens, first_row)
        rows = len(batch.slots)
        decode = Pass(
            partial(ex.decoder_embed, batch),
            partial(ex.decoder_layers, batch),
            (rows, ex.hidden_size),
        )
        (h,) = self._pipe([decode], ex.dtype)  # [rows, d_model]
        return self._deliver([partial(ex.logits, h)], [rows], lambda logits: logits[0])


def make_stage(
    loaded: LoadedModel,
    allocation: Allocation,
    rank: int,
    num_slots: int,
    max_len: int,
    groups: RankGroups,
    timeout_s: float,
) -> StageWorker:
    """The stage `rank` runs; a decode rank of a WAA group also takes the encode side's
    hand-overs (engine/handover.py)."""
    kind = T5Stage if loaded.is_encoder_decoder else DecoderOnlyStage
    stage = kind(loaded, allocation.side(rank), num_slots, max_len, groups)
    if allocation.encode is not None and stage.is_driver_side:
        stage.expect = partial(expect_prompts, allocation.encode, stage, timeout_s)
    return stage
