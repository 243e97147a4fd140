"""The engine process: protocol messages in, LLMEngine steps, token deltas out.

Started by the gateway as `python -m engine.process --fd N --options JSON` with one end of a
socketpair. A reader thread decodes incoming frames into a queue, so reading the socket
never stalls the step loop; the loop drains that queue between steps, steps while any
request is unfinished, and blocks on the queue (no busy spin) when idle. The replies to what
was drained (Accepted, Error) go back before the step; all the outputs of one step go back
in one frame.

Requests are validated here, where the tokenizer is: a prompt that does not fit the context
or a bad sampling field gets an Error (HTTP 400 at the gateway) instead of an Accepted.
Each accepted request ends with exactly one Finished or Error.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING

import msgspec

from adaptive.schedule import Schedule
from engine import protocol as p
from engine.heap import startup_phase

if TYPE_CHECKING:
    from engine.adaptation import Adaptation
    from engine.llm_engine import RequestOutput

logger = logging.getLogger(__name__)
SOLVING_POLL_S = 0.01  # idle loop wake-up while the planner thread works


def schedule_info(schedule: Schedule) -> p.ScheduleInfo:
    return p.ScheduleInfo(
        policy=schedule.policy.value,
        encode_batch=schedule.encode_batch,
        decode_iters=schedule.decode_iters,
        max_batch=schedule.max_batch,
        description=schedule.describe(),
        predicted_latency_s=schedule.predicted_latency_s,
        predicted_throughput_req_s=schedule.predicted_throughput_req_s,
    )


class Connection:
    """One end of the gateway socket: framed sends, and a reader thread feeding `inbox`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self.inbox: queue.Queue[p.ToEngine] = queue.Queue()
        self._reader = threading.Thread(target=self._read_loop, name="engine-reader", daemon=True)
        self._reader.start()

    def send(self, messages: list[p.FromEngine]) -> None:
        if not messages:
            return
        with self._send_lock:
            self._sock.sendall(p.encode_frame(messages))

    def _recv_exact(self, n: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = self._sock.recv(n - len(chunks))
            if not chunk:
                return None
            chunks += chunk
        return bytes(chunks)

    def _read_loop(self) -> None:
        try:
            while (header := self._recv_exact(p.FRAME_HEADER.size)) is not None:
                body = self._recv_exact(p.frame_length(header))
                if body is None:
                    break
                for message in p.decode_to_engine(body):
                    self.inbox.put(message)
        except (OSError, ValueError, msgspec.DecodeError):
            logger.exception("engine: reading from the gateway failed")
        finally:
            # The gateway is gone (or spoke nonsense): stop rather than run unattended.
            self.inbox.put(p.Shutdown())


class EngineLoop:
    def __init__(self, adaptation: Adaptation, conn: Connection, options: p.EngineOptions) -> None:
        self.adaptation = adaptation
        self.engine = adaptation.engine
        self.conn = conn
        self.options = options
        self.slo_s = options.slo_s
        self.num_prompt_tokens: dict[str, int] = {}  # live request id -> prompt length

    def run(self) -> None:
        while True:
            replies: list[p.FromEngine] = []
            for message in self._drain(block=not self.engine.has_unfinished()):
                if isinstance(message, p.Shutdown):
                    self._fail_all("server shutting down", 503, replies)
                    self.conn.send(replies)
                    return
                self._handle(message, replies)
            # Accepted goes out before the step that encodes the prompt, so the gateway
            # starts the response while the step runs and is ready for its first token.
            self.conn.send(replies)
            out: list[p.FromEngine] = []
            if self.engine.has_unfinished():
                self._step(out)
            out.extend(self.adaptation.tick())
            self.conn.send(out)

    def _drain(self, block: bool) -> list[p.ToEngine]:
        messages: list[p.ToEngine] = []
        if block:
            # while the planner works, wake up to hand its schedule over
            timeout = SOLVING_POLL_S if self.adaptation.is_solving else None
            try:
                messages.append(self.conn.inbox.get(timeout=timeout))
            except queue.Empty:
                return messages
        while True:
            try:
                messages.append(self.conn.inbox.get_nowait())
            except queue.Empty:
                return messages

    def _handle(self, message: p.ToEngine, out: list[p.FromEngine]) -> None:
        if isinstance(message, p.Submit):
            out.append(self._submit(message))
        elif isinstance(message, p.Abort):
            if message.request_id in self.num_prompt_tokens:
                self.engine.abort_request(message.request_id)
        elif isinstance(message, p.SetSlo):
            self._set_slo(message)
        elif isinstance(message, p.StatsRequest):
            stats = self.engine.stats()
            out.append(
                p.Stats(
                    num_waiting=stats.num_waiting,
                    num_running=stats.num_running,
                    num_free_slots=stats.num_free_slots,
                    slo_s=self.slo_s,
                    schedule=schedule_info(self.adaptation.controller.current.schedule),
                    active_schedule=schedule_info(stats.schedule),
                    adaptation=self.adaptation.info(),
                )
            )

    def _submit(self, msg: p.Submit) -> p.FromEngine:
        from engine.sampling import SamplingParams

        try:
            prompt_ids = self._tokenize(msg)
            max_len = self.engine.max_model_len
            max_tokens = msg.max_tokens if msg.max_tokens is not None else max_len - len(prompt_ids)
            if len(prompt_ids) + max(max_tokens, 1) > max_len:
                raise ValueError(
                    f"This model's maximum context length is {max_len} tokens; the request "
                    f"has {len(prompt_ids)} prompt tokens and max_tokens={max_tokens}. "
                    "Shorten the prompt or lower max_tokens."
                )
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=msg.temperature,
                top_p=msg.top_p,
                seed=msg.seed,
                stop=tuple(msg.stop),
                ignore_eos=msg.ignore_eos,
            )
            self.engine.add_request(msg.request_id, prompt_ids, params)
        except ValueError as exc:
            return p.Error(msg.request_id, str(exc), 400)
        except Exception as exc:  # a tokenizer or template failure must not stop the loop
            logger.exception("request %s: rejected by an unexpected error", msg.request_id)
            return p.Error(msg.request_id, f"could not prepare the request: {exc}", 400)
        self.num_prompt_tokens[msg.request_id] = len(prompt_ids)
        return p.Accepted(msg.request_id, len(prompt_ids), max_tokens)

    def _tokenize(self, msg: p.Submit) -> list[int]:
        tokenizer = self.engine.model.tokenizer
        given = sum(x is not None for x in (msg.prompt, msg.messages, msg.prompt_ids))
        if given != 1:
            raise ValueError("give exactly one of prompt, messages or prompt_ids")
        if msg.prompt_ids is not None:
            ids = list(msg.prompt_ids)
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"prompt token ids must be in [0, {vocab})")
        elif msg.messages is not None:
            if not msg.messages:
                raise ValueError("messages must not be empty")
            if tokenizer.chat_template is None:
                raise ValueError("this model has no chat template; use /v1/completions")
            chat = [{"role": m.role, "content": m.content} for m in msg.messages]
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(msg.prompt)["input_ids"])
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _set_slo(self, msg: p.SetSlo) -> None:
        """Re-solving runs off the loop; the SloApplied reply comes from `tick`."""
        self.slo_s = msg.latency_s
        self.adaptation.set_slo(msg.latency_s, msg.update_id)

    def _step(self, out: list[p.FromEngine]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # fail the live requests, keep serving new ones
            logger.exception("engine step failed")
            for request_id in list(self.num_prompt_tokens):
                self.engine.abort_request(request_id)
            self._fail_all(f"engine error: {exc}", 500, out)
            return
        self.adaptation.after_step(outputs)
        self._translate(outputs, out)

    def _translate(self, outputs: list[RequestOutput], out: list[p.FromEngine]) -> None:
        now = time.monotonic()
        for o in outputs:
            if o.request_id not in self.num_prompt_tokens:
                continue  # already failed; its abort output is not news
            if o.new_token_ids or o.new_text:
                out.append(p.TokenDelta(o.request_id, list(o.new_token_ids), o.new_text, now))
            if o.finished:
                del self.num_prompt_tokens[o.request_id]
                out.append(
                    p.Finished(
                        o.request_id,
                        o.finish_reason or "stop",
                        o.num_prompt_tokens,
                        o.num_output_tokens,
                    )
                )

    def _fail_all(self, message: str, status: int, out: list[p.FromEngine]) -> None:
        for request_id in self.num_prompt_tokens:
            out.append(p.Error(request_id, message, status, "server_error"))
        self.num_prompt_tokens.clear()


def serve(sock: socket.socket, options: p.EngineOptions) -> int:
    conn = Connection(sock)
    try:
        with startup_phase():
            from engine.adaptation import build_adaptive_engine
            from engine.model_loader import device_scope

            device = device_scope(options.device)
            with device:
                adaptation = build_adaptive_engine(options)
    except Exception as exc:  # ModelLoadError, bad options: the gateway reports it and exits
        logger.exception("engine failed to start")
        conn.send([p.Error(None, f"engine failed to start: {exc}", 500, "server_error")])
        return 1
    engine = adaptation.engine
    conn.send(
        [
            p.Ready(
                model=engine.model.name,
                max_model_len=engine.max_model_len,
                max_num_seqs=options.max_num_seqs,
                slo_s=options.slo_s,
                schedule=schedule_info(engine.stats().schedule),
            )
        ]
    )
    try:
        with device:  # the step loop creates its tensors there too
            EngineLoop(adaptation, conn, options).run()
    finally:
        adaptation.close()
        engine.close()
    return 0


class BaselineWorkload(msgspec.Struct, frozen=True):
    num_requests: int = 64
    prompt_ids: list[int] = []
    max_tokens: int = 128


def run_baseline(options: p.EngineOptions, workload: BaselineWorkload) -> dict[str, float]:
    """The engine's own throughput on a workload, no IPC: the gateway benchmark's reference."""
    from engine.model_loader import device_scope

    with device_scope(options.device):
        return _run_baseline(options, workload)


def _run_baseline(options: p.EngineOptions, workload: BaselineWorkload) -> dict[str, float]:
    with startup_phase():  # as the served engine's
        from engine.adaptation import build_adaptive_engine
        from engine.sampling import SamplingParams

        adaptation = build_adaptive_engine(options)
    adaptation.close()  # the baseline runs the first schedule, unadapted
    params = SamplingParams(max_tokens=workload.max_tokens, ignore_eos=True)
    with adaptation.engine as engine:
        for name in ("warmup", "timed"):  # the untimed round meets every batch shape first
            start = time.monotonic()
            for i in range(workload.num_requests):
                engine.add_request(f"{name}-{i}", workload.prompt_ids, params)
            num_tokens = 0
            while engine.has_unfinished():
                num_tokens += sum(len(o.new_token_ids) for o in engine.step())
            seconds = time.monotonic() - start
    return {"tokens": num_tokens, "seconds": seconds, "tokens_per_s": num_tokens / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="exegpt engine process (started by the gateway)")
    parser.add_argument("--fd", type=int, help="inherited socket descriptor")
    parser.add_argument("--options", required=True, help="EngineOptions as JSON")
    parser.add_argument("--baseline", help="BaselineWorkload as JSON: run it, print JSON, exit")
    args = parser.parse_args(argv)
    # OpenMP threads spin-wait between parallel regions by default: on a small machine the
    # spinning takes the core the gateway needs to stream tokens (and, when another process
    # holds one core, a spinning thread waits on a descheduled one). Passive threads sleep;
    # set before torch loads OpenMP, and an explicit OMP_WAIT_POLICY still wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.baseline:
        options = msgspec.json.decode(args.options, type=p.EngineOptions)
        workload = msgspec.json.decode(args.baseline, type=BaselineWorkload)
        print(msgspec.json.encode(run_baseline(options, workload)).decode(), flush=True)
        return 0
    if args.fd is None:
        parser.error("--fd is required")
    # Ctrl-C reaches the whole process group; the gateway decides when the engine stops
    # (Shutdown message, or end of file on the socket).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    options = msgspec.json.decode(args.options, type=p.EngineOptions)
    sock = socket.socket(fileno=args.fd)
    try:
        return serve(sock, options)
    finally:
        sock.close()


if __name__ == "__main__":
    raise SystemExit(main())
