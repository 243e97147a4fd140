"""WAA's hand-over (paper section 4.1): encode batches go from the driver to the encode
workers, and each query's prompt KV cache and first-token logits come back to the decode
side, all point to point on the group's gloo transport (isend / irecv, nothing else):

    driver (rank 0)              decode ranks (the driver too)     encode ranks
    EncodeQueue.put ---- EncodeOrder ------------------------------> receive_order
    the step announces it --->   expect_prompts: irecv the KV      StageWorker.encode
    irecv the logits                                                 (rows 0..k-1 of its cache)
    ... decoding iterations ...                                    hand_over: isend the KV,
    EncodeQueue.take <-- logits ------------------------------------- then the logits
    update: first tokens, rows
    the next step places them ->  Incoming.install copies the KV into the rows

A batch's KV travels as one message per (encode rank, decode rank) pair that holds the same
tensor slice and some of the same layers: for each query, each shared layer, each tensor of
the executor's `prompt_cache`, flattened in that order. Both ends derive the sizes from the
prompt lengths, so no header goes with it. The logits go out only once every encode
rank's KV sends completed (a barrier on the encode side when it has several ranks): when
the driver sees a batch's logits, every decode rank has its KV or is reading it off the
socket, so placing the rows never waits on the encode side's compute.

Gloo's point-to-point Work reports completion only through wait(), so nothing can be
polled: the driver's EncodeQueue waits on each batch in a thread, in order, and its step
loop takes what arrived without blocking while it has rows to decode.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import msgspec
import torch
import torch.distributed as dist

from engine.protocol import EncodeOrder

if TYPE_CHECKING:
    from engine.layout import Layout
    from engine.models.decoder_only import DecoderOnlyExecutor
    from engine.models.t5 import T5Executor
    from engine.parallel import StageWorker

    Executor = DecoderOnlyExecutor | T5Executor

ORDER_TAG, PROMPT_TAG, LOGITS_TAG = 1, 2, 3  # one FIFO stream per kind and pair of ranks
TAKE_POLL_S = 0.05  # a blocked take checks this often that the workers are alive
JOIN_WAIT_S = 10.0

_order_decoder = msgspec.msgpack.Decoder(EncodeOrder)


def send_order(order: EncodeOrder, ranks: Iterable[int]) -> list[dist.Work]:
    """The driver's: `order` to each of `ranks` without waiting (an encode rank takes it
    when done with the one before); the Works keep the tensors alive."""
    data = torch.frombuffer(bytearray(msgspec.msgpack.encode(order)), dtype=torch.uint8)
    size = torch.tensor([len(data)])
    return [_isend(t, rank, ORDER_TAG) for rank in ranks for t in (size, data)]


def receive_order() -> EncodeOrder:
    """An encode rank's: wait (for as long as the engine is idle) for the next order."""
    size = torch.zeros(1, dtype=torch.long)
    dist.recv(size, src=0, tag=ORDER_TAG)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(data, src=0, tag=ORDER_TAG)
    return _order_decoder.decode(data.numpy().tobytes())


def _isend(tensor: torch.Tensor, dst: int, tag: int) -> dist.Work:
    work = dist.isend(tensor, dst=dst, tag=tag)
    assert work is not None  # every rank is in the default group
    return work


def _shared_layers(stage: StageWorker, other: Layout) -> list[tuple[int, range]]:
    """The ranks of the other side that hold this rank's tensor slice and some of its
    cache layers, each with those layers (in this rank's numbering of its own)."""
    mine = stage.cache_layers
    tp_rank = stage.layout.tp_rank(stage.rank)
    peers = []
    for s in range(other.num_stages):
        theirs = other.layers(s, stage.num_model_layers)
        first, stop = max(mine.start, theirs.start), min(mine.stop, theirs.stop)
        if first < stop:
            peers.append(
                (other.stage_ranks(s)[tp_rank], range(first - mine.start, stop - mine.start))
            )
    return peers


def _layer_views(cache: list[list[torch.Tensor]], layers: range) -> list[torch.Tensor]:
    return [view for i in layers for view in cache[i]]


def _sizes(executor: Executor, layers: range, lens: list[int]) -> list[int]:
    """Elements of each query's part of a message over `layers`."""
    return [sum(v.numel() for v in _layer_views(executor.prompt_cache(0, n), layers)) for n in lens]


@torch.inference_mode()
def hand_over(
    stage: StageWorker,
    decode: Layout,
    order: EncodeOrder,
    logits: torch.Tensor | None,
    timeout_s: float,
) -> None:
    """An encode rank's, after StageWorker.encode: the batch's KV to the decode ranks, then
    (the last stage's tensor rank 0) the logits to the driver."""
    timeout = timedelta(seconds=timeout_s)
    cache = stage.executor.prompt_cache
    sends = []
    for peer, layers in _shared_layers(stage, decode):
        parts = [
            view.reshape(-1)
            for row, prompt in enumerate(order.prompts)
            for view in _layer_views(cache(row, len(prompt)), layers)
        ]
        sends.append(_isend(torch.cat(parts), peer, PROMPT_TAG))
    for work in sends:
        work.wait(timeout)
    if stage.layout.num_workers > 1:  # every encode rank's KV is out before the logits
        dist.barrier(group=stage.groups.side)
    if logits is not None:
        _isend(logits, 0, LOGITS_TAG).wait(timeout)


@dataclass(frozen=True)
class Incoming:
    """A decode rank's receives for one announced encode batch: per encode rank it shares
    layers with, those layers and the buffer its message lands in."""

    lens: list[int]  # prompt lengths of the batch's queries
    pieces: list[tuple[range, torch.Tensor]]
    works: list[dist.Work]
    timeout: timedelta

    def install(self, executor: Executor, rows: list[int]) -> None:
        """Copy query i's KV into cache row rows[i] (none where it is -1)."""
        for work in self.works:
            work.wait(self.timeout)
        for layers, buffer in self.pieces:
            chunks = buffer.split(_sizes(executor, layers, self.lens))
            for row, n, chunk in zip(rows, self.lens, chunks, strict=True):
                if row < 0:
                    continue
                views = _layer_views(executor.receive_prompt(row, n), layers)
                for view, part in zip(views, chunk.split([v.numel() for v in views]), strict=True):
                    view.copy_(part.view(view.shape))


def expect_prompts(
    encode: Layout, stage: StageWorker, timeout_s: float, lens: list[int]
) -> Incoming:
    """A decode rank's, when a step announces an encode batch: post its receives."""
    pieces = []
    works = []
    for peer, layers in _shared_layers(stage, encode):
        size = sum(_sizes(stage.executor, layers, lens))
        buffer = torch.empty(size, dtype=stage.executor.dtype)
        work = dist.irecv(buffer, src=peer, tag=PROMPT_TAG)
        assert work is not None
        works.append(work)
        pieces.append((layers, buffer))
    return Incoming(lens, pieces, works, timedelta(seconds=timeout_s))


@dataclass(frozen=True)
class _InFlight:
    works: list[dist.Work]  # the order's sends, then the logits' receive
    logits: torch.Tensor  # [queries, vocab] float32


class EncodeQueue:
    """The driver's end: the encode batches handed to the encode side, oldest first.

    A thread waits on each batch's order sends and logits receive, in order, and queues
    the logits, or the error a wait raised (a dead peer closes its sockets: at once; a
    hung one: after `timeout_s`); `take` hands them to the step loop."""

    def __init__(self, encode: Layout, vocab_size: int, timeout_s: float) -> None:
        self.encode = encode
        self.vocab_size = vocab_size
        self.timeout = timedelta(seconds=timeout_s)
        self.num_pending = 0
        self._todo: queue.Queue[_InFlight | None] = queue.Queue()
        self._done: queue.Queue[torch.Tensor | Exception] = queue.Queue()
        self._thread = threading.Thread(target=self._wait_loop, name="exegpt-encodes", daemon=True)
        self._thread.start()

    def put(self, prompts: list[list[int]]) -> None:
        works = send_order(EncodeOrder(prompts), self.encode.ranks)
        logits = torch.empty(len(prompts), self.vocab_size)
        receive = dist.irecv(logits, src=self.encode.last_rank, tag=LOGITS_TAG)
        assert receive is not None
        self.num_pending += 1
        self._todo.put(_InFlight([*works, receive], logits))

    def take(self, block: bool, check: Callable[[], None]) -> list[torch.Tensor]:
        """The first-token logits of the batches that arrived, oldest first; with `block`,
        at least one while any is pending, calling `check` (which may raise) meanwhile.
        Raises what a wait on the transport raised."""
        arrived: list[torch.Tensor] = []
        while self.num_pending:
            wait = block and not arrived
            try:
                done = self._done.get(timeout=TAKE_POLL_S) if wait else self._done.get_nowait()
            except queue.Empty:
                if not wait:
                    break
                check()
                continue
            self.num_pending -= 1
            if isinstance(done, Exception):
                raise done
            arrived.append(done)
        return arrived

    def close(self) -> None:
        """Stop the thread; call once the batches arrived or their peers are gone."""
        self._todo.put(None)
        self._thread.join(JOIN_WAIT_S)

    def _wait_loop(self) -> None:
        while (batch := self._todo.get()) is not None:
            try:
                for work in batch.works:
                    work.wait(self.timeout)
            except (RuntimeError, dist.DistError) as exc:
                self._done.put(exc)
            else:
                self._done.put(batch.logits)
