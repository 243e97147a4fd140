"""Model workers: N-1 processes beside the engine's, one torch.distributed group of N.

The engine's process is the driver, rank 0: `WorkerGroup` is its ModelExecutor, so the
scheduler and runner do not know the model is spread out. It starts the other ranks as
`python -m engine.workers` with torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK,
WORLD_SIZE), hosting the rendezvous store itself on a free local port. Each worker loads
the model on its own, says so through the store, and joins the group; the driver waits for
them while watching that none has exited, then checks that all loaded the same weights.

Under WAA (an Allocation with encode workers) the last ranks encode: the driver hands them
encode batches (`decode` steps carry them) and takes their first-token logits back when
they arrive (`take_encoded`), the KV having gone to the decode ranks (engine/handover.py);
each decode rank, the driver first, runs the steps.

A worker that dies fails the step that needs it: its exit is seen before the step starts
or while the driver waits for encodes, or a collective or hand-over with it errors (its
sockets close) or times out. The group is then torn down, the step raises WorkerFailure
(the engine fails every request the group held state for; the engine process reports each
with an error event), and the next step starts a fresh group.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import msgspec
import torch
import torch.distributed as dist

from engine.groups import RankGroups, SentStep, join_group, receive_step
from engine.handover import EncodeQueue, hand_over, receive_order, send_order
from engine.heap import startup_phase
from engine.layout import Allocation
from engine.model_loader import LoadedModel, load_model
from engine.models.base import EncodeItem
from engine.parallel import Pending, StageWorker, make_stage
from engine.protocol import EncodeOrder, WorkerSpec, WorkerStep, parse_address

logger = logging.getLogger(__name__)
STARTUP_POLL_S = 0.05
STOP_WAIT_S = 10.0  # a stopped worker gets this long to leave before it is killed
# A worker's start (imports, model load) may take minutes on a large model; one that dies
# meanwhile is seen at once, so this only bounds a worker that hangs while loading.
LOAD_TIMEOUT_S = 900.0
REJOIN_POLL_S = 2.0  # a worker started elsewhere looks for its driver's group this often
SPEC_KEY, GENERATION_KEY = "spec", "generation"  # in the rendezvous store


class WorkerFailure(RuntimeError):
    """A worker died or a step's collective failed; the group is gone."""


@dataclass(frozen=True)
class InFlight:
    """A step submitted to the group, its logits not taken yet."""

    sent: SentStep
    logits: Pending
    generation: int  # of the group it runs on


class WorkerGroup:
    """The driver's ModelExecutor over a group of `spec.num_workers` ranks."""

    def __init__(
        self,
        loaded: LoadedModel,
        spec: WorkerSpec,
        rendezvous: str | None = None,
        local_workers: int | None = None,
    ) -> None:
        """rendezvous: HOST:PORT this process listens on for its workers, needed when some
        start elsewhere; local_workers: how many run on this machine, this process included
        (default all); the others join with `exegpt worker` (EngineConfig checks both)."""
        self.loaded = loaded
        self.spec = spec
        self.rendezvous = None if rendezvous is None else parse_address(rendezvous)
        self.local_workers = spec.num_workers if local_workers is None else local_workers
        self.allocation = Allocation(spec.num_workers, spec.tp_degree, spec.encode_workers)
        self.allocation.check(loaded)
        self.layout = self.allocation.decode  # the driver's side
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stage: StageWorker | None = None
        self._groups: RankGroups | None = None
        self._encodes: EncodeQueue | None = None
        self._moves: list[tuple[int, int, int]] = []
        self._is_closed = False
        self._generation = 0  # counts the groups started, so a step outlives none
        self._start()

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs]

    def forward(
        self, items: list[EncodeItem], token_ids: list[int], context_lens: list[int]
    ) -> torch.Tensor:
        return self._run(
            WorkerStep([(item.slot, item.token_ids) for item in items], token_ids, context_lens)
        )

    def submit(
        self,
        items: list[EncodeItem],
        token_ids: list[int],
        context_lens: list[int],
        first_row: int = 0,
    ) -> InFlight:
        """Start `forward` as one micro-batch over the running rows [first_row,
        first_row + n): this process computes the first stage's share and returns; the
        other stages work on it meanwhile. `collect` takes the logits, in the order the
        steps were submitted; steps in flight together must hold different rows."""
        step = WorkerStep(
            [(item.slot, item.token_ids) for item in items],
            token_ids,
            context_lens,
            num_microbatches=1,
            first_row=first_row,
        )
        return self._submit(step)

    def collect(self, step: InFlight) -> torch.Tensor:
        """The logits of a submitted step (ModelExecutor.forward's)."""
        if step.generation != self._generation:
            raise WorkerFailure("the model worker group that ran this step is gone")
        with self._failing():
            step.sent.wait(self.spec.timeout_s)
            return step.logits.wait(timedelta(seconds=self.spec.timeout_s))

    def decode(
        self,
        token_ids: list[int],
        context_lens: list[int],
        *,
        encodes: list[list[list[int]]],
        installs: list[list[int]],
        num_microbatches: int,
    ) -> torch.Tensor:
        """WAA's step: hand each batch of prompts in `encodes` to the encode workers, place
        the oldest arrived batches' queries in the rows `installs` gives (-1: not kept),
        then decode the running rows in `num_microbatches` micro-batches. Row logits."""
        step = WorkerStep(
            token_ids=token_ids,
            context_lens=context_lens,
            encodes=[[len(prompt) for prompt in prompts] for prompts in encodes],
            installs=installs,
            num_microbatches=num_microbatches,
        )
        return self._run(step, encodes)

    def take_encoded(self, block: bool) -> list[torch.Tensor]:
        """WAA: first-token logits [queries, vocab] of each encode batch that arrived since
        the last call, oldest first; with `block`, waits for one while any is in flight."""
        if self._encodes is None:  # a fresh group has none in flight
            return []
        with self._failing():
            return self._encodes.take(block, self._check_alive)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Queued: every rank applies it before the next step's forward."""
        self._moves.append((src, dst, length))

    def close(self) -> None:
        self._is_closed = True
        if self._stage is not None:
            assert self._groups is not None
            try:
                if self._encodes is not None:  # their KV needs the decode ranks
                    self._encodes.take(True, self._check_alive)
                    for work in send_order(EncodeOrder(is_stop=True), self._encode_ranks):
                        work.wait(timedelta(seconds=STOP_WAIT_S))
                SentStep(WorkerStep(is_stop=True), self._groups.steps).wait(STOP_WAIT_S)
            except (RuntimeError, dist.DistError):
                logger.warning("a model worker was gone before the stop")
        self._stop_processes(STOP_WAIT_S)
        self._leave()

    @property
    def _encode_ranks(self) -> range:
        return range(0) if self.allocation.encode is None else self.allocation.encode.ranks

    def _run(self, step: WorkerStep, encodes: list[list[list[int]]] | None = None) -> torch.Tensor:
        return self.collect(self._submit(step, encodes))

    def _submit(self, step: WorkerStep, encodes: list[list[list[int]]] | None = None) -> InFlight:
        if self._is_closed:
            raise RuntimeError("the model workers are closed")
        if self._stage is None:
            logger.info("restarting the model workers")
            self._start()
        assert self._stage is not None and self._groups is not None
        step = msgspec.structs.replace(step, moves=self._moves)
        self._moves = []
        with self._failing():
            self._check_alive()
            for prompts in encodes or []:
                assert self._encodes is not None, "encode batches without encode workers"
                self._encodes.put(prompts)
            sent = SentStep(step, self._groups.steps)
            logits = self._stage.run(step)
        assert logits is not None  # the driver always receives them
        return InFlight(sent, logits, self._generation)

    @contextmanager
    def _failing(self) -> Iterator[None]:
        """A failure inside tears the group down and raises WorkerFailure."""
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            self._fail(str(exc))
            raise WorkerFailure(f"model worker group failed: {exc}") from exc

    def _start(self) -> None:
        if dist.is_initialized():
            raise RuntimeError("this process already drives a model worker group")
        self._generation += 1
        host, port = self.rendezvous or ("127.0.0.1", _free_port())
        store = dist.TCPStore(
            host,
            port,
            self.spec.num_workers,
            is_master=True,
            timeout=timedelta(seconds=self.spec.timeout_s),
            wait_for_workers=False,
        )
        store.set(SPEC_KEY, msgspec.json.encode(self.spec).decode())
        store.set(GENERATION_KEY, str(self._generation))
        local_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        env = os.environ | {"MASTER_ADDR": local_host, "MASTER_PORT": str(port)}
        env["WORLD_SIZE"] = str(self.spec.num_workers)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the ranks share the machine's cores
        self._procs = [
            subprocess.Popen(
                [sys.executable, "-m", "engine.workers"],
                env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            )
            for r in range(1, self.local_workers)
        ]
        if self.local_workers < self.spec.num_workers:
            logger.info(
                "waiting for workers %d-%d to join at %s:%d (exegpt worker --rendezvous)",
                self.local_workers,
                self.spec.num_workers - 1,
                host,
                port,
            )
        spec = self.spec
        try:
            self._wait_loaded(store)
            self._groups = join_group(self.loaded, self.allocation, store, 0, spec.timeout_s)
            self._stage = make_stage(
                self.loaded,
                self.allocation,
                0,
                spec.num_slots,
                spec.max_len,
                self._groups,
                spec.timeout_s,
            )
            if self.allocation.encode is not None:
                vocab = self.loaded.vocab_size
                self._encodes = EncodeQueue(self.allocation.encode, vocab, spec.timeout_s)
        except BaseException:
            self._stop_processes(0.0)
            self._leave()
            raise
        logger.info(
            "model workers ready: this process and pids %s; %s",
            self.pids,
            ", ".join(
                f"{name} {side.num_stages} pipeline stages x TP {side.tp_degree}"
                for name, side in zip(("decode", "encode"), self.allocation.sides, strict=False)
            ),
        )

    def _wait_loaded(self, store: dist.TCPStore) -> None:
        keys = [f"loaded/{rank}" for rank in range(1, self.spec.num_workers)]
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not store.check(keys):
            self._check_alive()
            if time.monotonic() > deadline:
                raise WorkerFailure(f"model workers not loaded after {LOAD_TIMEOUT_S:.0f} s")
            time.sleep(STARTUP_POLL_S)

    def _check_alive(self) -> None:
        for rank, proc in enumerate(self._procs, start=1):
            if proc.poll() is not None:
                raise WorkerFailure(
                    f"model worker {rank} (pid {proc.pid}) exited with status {proc.returncode}"
                )

    def _fail(self, reason: str) -> None:
        logger.error(
            "model worker group failed (%s): in-flight requests fail, the next step restarts it",
            reason,
        )
        self._stop_processes(0.0)
        self._leave()

    def _stop_processes(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        for proc in self._procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []

    def _leave(self) -> None:
        """After the processes stopped: their sockets are closed, so no wait stays blocked."""
        self._stage = None
        self._groups = None
        self._moves = []
        if self._encodes is not None:
            self._encodes.close()
            self._encodes = None
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_worker(store: dist.Store, rank: int) -> None:
    """Rank `rank` (>= 1) of the group whose rendezvous `store` is: load the model the
    driver's spec names, join, then run steps (or, on WAA's encode side, encode batches)
    until the driver stops it."""
    spec = msgspec.json.decode(store.get(SPEC_KEY), type=WorkerSpec)
    torch.set_num_threads(spec.num_threads)
    with startup_phase():
        loaded = load_model(spec.model, spec.dtype)
        store.set(f"loaded/{rank}", "1")
        allocation = Allocation(spec.num_workers, spec.tp_degree, spec.encode_workers)
        groups = join_group(loaded, allocation, store, rank, spec.timeout_s)
        stage = make_stage(
            loaded, allocation, rank, spec.num_slots, spec.max_len, groups, spec.timeout_s
        )
        stage.executor.drop_model_layers()  # the model is this process's alone
    if stage.is_driver_side:
        while not (step := receive_step(groups.steps)).is_stop:
            stage.run(step)
    else:
        while not (order := receive_order()).is_stop:
            hand_over(stage, allocation.decode, order, stage.encode(order), spec.timeout_s)
    stage.finish_sends()
    dist.destroy_process_group()


def run_started_worker(rank: int) -> None:
    """A worker the driver started, its rendezvous in torchrun's environment."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = timedelta(seconds=LOAD_TIMEOUT_S)
    run_worker(dist.TCPStore(addr, port, is_master=False, timeout=timeout), rank)


def serve_remote(host: str, port: int, rank: int) -> None:
    """A worker started on another machine (`exegpt worker`): join the driver's group at
    host:port, and after a failure of the group the next one the driver starts, until
    the driver stops it."""
    joined = None  # the generation of the group last joined
    while True:
        try:
            store = dist.TCPStore(
                host, port, is_master=False, timeout=timedelta(seconds=REJOIN_POLL_S)
            )
            generation = store.get(GENERATION_KEY)
        except (RuntimeError, dist.DistError):  # no driver listening (yet, or any more)
            time.sleep(REJOIN_POLL_S)
            continue
        if generation == joined:  # the failed group's store, not torn down yet
            del store
            time.sleep(REJOIN_POLL_S)
            continue
        store.set_timeout(timedelta(seconds=LOAD_TIMEOUT_S))  # the others may be loading
        joined = generation
        logger.info("joining the group at %s:%d as worker %d", host, port, rank)
        try:
            run_worker(store, rank)
            return
        except (RuntimeError, dist.DistError):
            logger.exception("the group failed; joining the driver's next one")
            if dist.is_initialized():
                dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="exegpt model worker")
    add_worker_command_arguments(parser)
    args = parser.parse_args(argv)
    return run_worker_command(args)


def add_worker_command_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rendezvous",
        help="HOST:PORT of the engine's driver (`exegpt serve --rendezvous`); without it, "
        "the worker is one the driver started (torchrun's MASTER_ADDR, MASTER_PORT, RANK)",
    )
    parser.add_argument("--rank", type=int, help="this worker's rank (with --rendezvous)")


def run_worker_command(args: argparse.Namespace) -> int:
    work: Callable[[], None]
    if args.rendezvous is not None:
        if args.rank is None or args.rank < 1:
            raise SystemExit("--rendezvous needs --rank 1 or higher (rank 0 is the driver)")
        rank = args.rank
        work = partial(serve_remote, *parse_address(args.rendezvous), rank)
    else:
        rank = int(os.environ["RANK"])
        work = partial(run_started_worker, rank)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s worker {rank} %(levelname)s %(message)s"
    )
    try:
        work()
    except Exception:  # the driver sees the exit (or the broken group) and reports it
        logger.exception("model worker %d failed", rank)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
