"""The `prefopt` command line.

Each sub-command is a thin shell over a library function. User errors
(:class:`prefopt.errors.PrefoptError`) print one line on stderr and exit with status 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable

from prefopt.config import add_arguments, build_config
from prefopt.errors import PrefoptError

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    """Register ``run`` with an ``add(parser)`` that declares its flags."""

    def wrap(add: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace], int]):
            COMMANDS[name] = (help, add, run)
            return run

        return register

    return wrap


def _flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}


def _train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same option names (flags win over it)")
    add_arguments(parser)


@command("train", "train a policy on preference pairs (DPO and its family)")(_train_args)
def run_train(args: argparse.Namespace) -> int:
    from prefopt.train import train

    cfg, explicit = build_config(_flags(args), args.config)
    train(cfg, explicit)
    return 0


@command("sft", "supervised fine-tuning on prompt -> chosen (or prompt/completion, messages) data")(_train_args)
def run_sft(args: argparse.Namespace) -> int:
    from prefopt.train import train

    flags = _flags(args)
    flags["loss_type"] = ["sft"]
    cfg, explicit = build_config(flags, args.config)
    if cfg.loss_type != ["sft"]:
        cfg.loss_type = ["sft"]
    train(cfg, explicit)
    return 0


def _eval_args(parser: argparse.ArgumentParser) -> None:
    from prefopt.commands.pipeline import add_generation_eval_args

    _train_args(parser)
    parser.add_argument("--output", required=True, help="where to write the JSON results")
    add_generation_eval_args(parser)


@command("eval", "score a preference file with a policy and its reference (no training)")(_eval_args)
def run_eval(args: argparse.Namespace) -> int:
    from prefopt.atomic import write_json
    from prefopt.scoring import score_file

    flags = _flags(args)
    output = flags.pop("output")
    if flags.get("generate"):
        from prefopt.commands.pipeline import run_generation_eval

        return run_generation_eval(args, flags, output)
    cfg, _ = build_config(flags, args.config)
    result = score_file(cfg)
    write_json(output, result, indent=1)
    shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
    print(" ".join(f"{k}={v}" for k, v in shown.items()))
    print(f"wrote {output} ({len(result['per_example'])} examples)")
    return 0


# Modules that register more sub-commands with @command when imported; each keeps its heavy
# imports inside its functions so `prefopt --help` stays fast.
COMMAND_MODULES: list[str] = ["prefopt.commands.pipeline", "prefopt.commands.bench", "prefopt.commands.data_check",
                              "prefopt.commands.plan", "prefopt.commands.iterate"]


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="prefopt", description="Align causal language models to preferences "
                                     "with DPO and its family of losses.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from prefopt.runtime import cpu_tunings

    cpu_tunings()  # before torch allocates anything large and before MKL's first allocation; CPU only
    logging.basicConfig(level=os.environ.get("PREFOPT_LOG", "INFO").upper(), format="%(levelname)s %(message)s")
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except PrefoptError as e:
        print(f"prefopt {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"prefopt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m prefopt.cli` runs this file as __main__; command modules register into the
    # importable prefopt.cli, so dispatch through that module or their commands are missing.
    from prefopt import cli as _cli

    sys.exit(_cli.main())
