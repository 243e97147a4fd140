"""The engine process's side of the gateway protocol, on a real socketpair."""

from __future__ import annotations

import socket
import subprocess
import sys

import msgspec

from engine import protocol as p


def read_frame(sock: socket.socket) -> list[p.FromEngine]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the engine closed the socket"
            data += chunk
        return data

    return p.decode_from_engine(exactly(p.frame_length(exactly(p.FRAME_HEADER.size))))


def test_accepted_leaves_before_the_step_that_encodes_the_prompt() -> None:
    # The gateway starts the response on Accepted; sent with the first token, it would make
    # that token wait for the response to be prepared.
    options = p.EngineOptions(
        model="random:llama",
        dtype="float32",
        max_num_seqs=4,
        max_model_len=128,
        policy="continuous",
        num_threads=1,
        profile="quick",
        adapt=False,
    )
    parent, child = socket.socketpair()
    command = [sys.executable, "-m", "engine.process", "--fd", str(child.fileno())]
    command += ["--options", msgspec.json.encode(options).decode()]
    process = subprocess.Popen(command, pass_fds=(child.fileno(),))
    child.close()
    parent.settimeout(240)
    try:
        assert [type(m) for m in read_frame(parent)] == [p.Ready]
        submit = p.Submit("r1", prompt_ids=list(range(10, 40)), max_tokens=3, ignore_eos=True)
        parent.sendall(p.encode_frame([submit]))
        frames = [read_frame(parent)]
        while not any(isinstance(m, p.Finished) for m in frames[-1]):
            frames.append(read_frame(parent))
    finally:
        parent.sendall(p.encode_frame([p.Shutdown()]))
        assert process.wait(60) == 0
        parent.close()
    assert frames[0] == [p.Accepted("r1", 30, 3)]
    deltas = [m for frame in frames[1:] for m in frame if isinstance(m, p.TokenDelta)]
    assert [len(d.token_ids) for d in deltas] == [1, 1, 1]  # one step's token per frame
    assert len(frames) == 4
