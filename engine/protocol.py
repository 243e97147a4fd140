"""Messages between the gateway (asyncio, no torch) and the engine process (the step loop).

Every message that crosses the process boundary is one of the Structs below, so both sides
agree on one typed vocabulary and a malformed frame fails loudly at decode time. This module
must stay free of torch (and of engine modules that import it): the gateway imports it.

Wire format: a stream socket carrying frames of `[4-byte big-endian length][msgpack]`, where
the msgpack body is a list of tagged messages. The engine sends one frame per step (all the
deltas that step made), so the per-token cost of the boundary is amortised over the batch.

    gateway -> engine: Submit, Abort, SetSlo, StatsRequest, Shutdown
    engine -> gateway: Ready, Accepted, TokenDelta, Finished, Error, SloApplied, Stats

Every Submit ends with exactly one terminal message for its request id: Finished or Error.

The engine's driver and its model workers (engine/workers.py) speak through torch.distributed
instead: a WorkerSpec on each worker's command line, then one msgpack-encoded WorkerStep per
step, broadcast as a byte tensor to the workers that decode; under WAA the encode workers
get an EncodeOrder per encode batch instead, sent to each of them point to point.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence

import msgspec

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 1024 * 1024  # a corrupt length prefix must not allocate gigabytes


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class ScheduleInfo(msgspec.Struct, frozen=True):
    """The engine's current Schedule, flattened (adaptive.Schedule stays engine-side)."""

    policy: str
    encode_batch: int
    decode_iters: int
    max_batch: int
    description: str
    predicted_latency_s: float | None = None
    predicted_throughput_req_s: float | None = None


class LengthStats(msgspec.Struct, frozen=True):
    """The live length histograms (exponentially decayed over finished requests)."""

    mean_input: float
    p99_input: float
    mean_output: float
    p99_output: float
    weight: float  # effective number of requests behind them


class AdaptationInfo(msgspec.Struct, frozen=True):
    """The online controller's state (adaptive/controller.py): why the schedule is what it
    is, what the planner predicted for it, and what the engine measures."""

    is_enabled: bool
    lengths: LengthStats | None
    reason: str  # trigger of the last solve: startup | slo | drift | latency | refit
    last_change_at: float  # Unix time the schedule's knobs last changed
    last_change_reason: str
    num_solves: int
    last_solve_ms: float
    switch_delay_s: float | None  # trigger -> new schedule running, last switch
    profile: str  # where the planner's profile came from
    profile_scales: list[float]  # [encode, decode] refit factors in use
    fitted_scales: list[float]  # [encode, decode] measured / predicted step time now
    bound_margin: float  # the planner aims at bound * margin (0.85, lowered by breaches)
    latency_calibration: float  # measured / predicted p99 where the planner ran high
    predicted_latency_s: float | None
    predicted_throughput_req_s: float | None
    measured_p99_latency_s: float | None
    measured_throughput_req_s: float
    slo_attainment: float | None  # since the bound was set; None: no bound or no requests
    num_finished: int


class EngineOptions(msgspec.Struct, frozen=True):
    """What the engine process is started with (passed as JSON on its command line)."""

    model: str = "smollm2"
    dtype: str = "bfloat16"
    max_num_seqs: int = 64
    max_model_len: int = 2048
    policy: str = "rra"
    slo_s: float | None = None
    num_threads: int | None = None
    profile: str = "full"  # "full" | "quick" (cached per model and device) or a profile file
    adapt: bool = True  # False: the schedule is solved once at start and kept
    num_workers: int = 1  # model worker processes (engine/workers.py); 1: in-process
    tp_degree: int = 1  # tensor-parallel degree; pipeline stages = num_workers / tp_degree
    rendezvous: str | None = None  # HOST:PORT where workers on other machines join
    local_workers: int | None = None  # workers started here, the driver included (None: all)
    device: str = "cpu"  # or "cuda[:N]": the model and its tensors on that GPU (one worker)


# --- gateway -> engine ------------------------------------------------------------------


class Submit(msgspec.Struct, tag="submit", frozen=True):
    """A new request: exactly one of prompt, messages (chat template applied) or prompt_ids."""

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int | None = None  # None: the rest of the context window
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = []
    ignore_eos: bool = False


class Abort(msgspec.Struct, tag="abort", frozen=True):
    request_id: str


class SetSlo(msgspec.Struct, tag="set_slo", frozen=True):
    update_id: int
    latency_s: float | None  # None: no bound, the highest-throughput configuration


class StatsRequest(msgspec.Struct, tag="stats_request", frozen=True):
    pass


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


# --- engine -> gateway ------------------------------------------------------------------


class Ready(msgspec.Struct, tag="ready", frozen=True):
    model: str
    max_model_len: int
    max_num_seqs: int
    slo_s: float | None
    schedule: ScheduleInfo


class Accepted(msgspec.Struct, tag="accepted", frozen=True):
    """The request passed the engine's checks (tokenised, fits the context) and is queued."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int


class TokenDelta(msgspec.Struct, tag="delta", frozen=True):
    request_id: str
    token_ids: list[int]
    text: str
    emitted_at: float = 0.0  # engine's time.monotonic() (system-wide on Linux): gateway lag


class Finished(msgspec.Struct, tag="finished", frozen=True):
    request_id: str
    finish_reason: str  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_output_tokens: int


class Error(msgspec.Struct, tag="error", frozen=True):
    """A request (or, with request_id None, the engine) failed; status is the HTTP status."""

    request_id: str | None
    message: str
    status: int = 400
    error_type: str = "invalid_request_error"
    param: str | None = None


class SloApplied(msgspec.Struct, tag="slo_applied", frozen=True):
    update_id: int
    latency_s: float | None
    schedule: ScheduleInfo
    is_feasible: bool  # False: no schedule is predicted to meet the bound; fastest one used
    source: str


class Stats(msgspec.Struct, tag="stats", frozen=True):
    """schedule: what the current SLO selected; active_schedule: what the engine runs now
    (a new schedule takes effect at the next encoding phase)."""

    num_waiting: int
    num_running: int
    num_free_slots: int
    slo_s: float | None
    schedule: ScheduleInfo
    active_schedule: ScheduleInfo
    adaptation: AdaptationInfo | None = None


# --- engine driver -> model workers -----------------------------------------------------


class WorkerSpec(msgspec.Struct, frozen=True):
    """What a model worker loads and which part it computes (its rank comes from $RANK)."""

    model: str
    dtype: str
    num_slots: int
    max_len: int
    num_workers: int
    tp_degree: int
    num_threads: int
    timeout_s: float  # longest wait on a peer inside a step
    encode_workers: int = 0  # WAA: the last ones encode, the others decode; 0: all do both


class WorkerStep(msgspec.Struct, frozen=True, array_like=True):
    """One forward for every worker that decodes: ModelExecutor.forward's arguments, after
    the slot moves queued since the last step. `is_stop`: leave the group and exit.

    Under WAA (engine/handover.py) a step also announces the encode batches just handed to
    the encode workers, so that each decode worker posts its receives for their KV, and
    places the oldest announced batches that arrived: the row of each query, applied after
    the moves and before the forward."""

    items: list[tuple[int, list[int]]] = []  # (slot, prompt ids) of each query to encode
    token_ids: list[int] = []
    context_lens: list[int] = []
    moves: list[tuple[int, int, int]] = []  # (src, dst, length), applied in order first
    is_stop: bool = False
    encodes: list[list[int]] = []  # WAA: prompt lengths of each encode batch handed out
    installs: list[list[int]] = []  # WAA: each arrived batch's rows, -1: query not kept
    num_microbatches: int = 0  # decoder micro-batches; 0: one per pipeline stage
    first_row: int = 0  # the running rows are cache rows [first_row, first_row + n)


class EncodeOrder(msgspec.Struct, frozen=True, array_like=True):
    """WAA: one encode batch for the encode workers (query i goes to their cache row i).
    `is_stop`: leave the group and exit."""

    prompts: list[list[int]] = []
    is_stop: bool = False


ToEngine = Submit | Abort | SetSlo | StatsRequest | Shutdown
FromEngine = Ready | Accepted | TokenDelta | Finished | Error | SloApplied | Stats

_encoder = msgspec.msgpack.Encoder()
_to_engine_decoder = msgspec.msgpack.Decoder(list[ToEngine])
_from_engine_decoder = msgspec.msgpack.Decoder(list[FromEngine])


def encode_frame(messages: Sequence[ToEngine] | Sequence[FromEngine]) -> bytes:
    body = _encoder.encode(messages)
    return FRAME_HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (length,) = FRAME_HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES} byte limit")
    return int(length)


def decode_to_engine(body: bytes) -> list[ToEngine]:
    return _to_engine_decoder.decode(body)


def decode_from_engine(body: bytes) -> list[FromEngine]:
    return _from_engine_decoder.decode(body)


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (a rendezvous address) -> (host, port); ValueError with one clear line
    otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host, int(port)


def check_device(device: str, num_workers: int) -> None:
    """ValueError with one clear line unless `device` is 'cpu', 'cuda' or 'cuda:N', and a
    GPU runs one engine process (the worker group's executors run on the CPU)."""
    if re.fullmatch(r"cpu|cuda(:\d+)?", device) is None:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device != "cpu" and num_workers > 1:
        raise ValueError(
            f"model workers run on the CPU: device {device} runs one engine process "
            f"(--workers 1), got --workers {num_workers}"
        )


def check_placement(num_workers: int, rendezvous: str | None, local_workers: int | None) -> None:
    """ValueError with one clear line unless `local_workers` of `num_workers` can start on
    this machine, the others joining at `rendezvous`."""
    if rendezvous is not None:
        parse_address(rendezvous)
    if local_workers is not None and not 1 <= local_workers <= num_workers:
        raise ValueError(
            f"local workers must be between 1 and the workers ({num_workers}), got {local_workers}"
        )
    if local_workers not in (None, num_workers) and rendezvous is None:
        raise ValueError("workers on other machines need a rendezvous address (HOST:PORT)")
