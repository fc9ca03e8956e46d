"""`prefopt bench`: time N real training steps and report throughput, memory and MFU.

The steps run through :func:`prefopt.train.train` itself (same data path, reference,
batching, loss and optimizer as ``prefopt train``), observed by
:class:`prefopt.benchmarking.BenchHooks`. The run goes to a temporary output
directory and, unless ``--cache-dir`` is given, a fresh reference cache, so the
reference pass is part of what is measured; final/ is not written.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from prefopt.cli import _flags, command
from prefopt.config import add_arguments, build_config
from prefopt.errors import ConfigError


def _bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same option names (flags win over it)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps to time (default: 10)")
    parser.add_argument("--json", metavar="FILE", dest="json_file", help="also write the result as JSON here")
    parser.add_argument("--format", choices=("table", "json"), default="table", dest="out_format",
                        help="what to print on stdout (default: table)")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    add_arguments(parser, exclude={"max_steps"})


@command("bench", "time real training steps: tokens/s, pairs/s, peak memory, model FLOP utilisation")(_bench_args)
def run_bench(args: argparse.Namespace) -> int:
    import torch

    from prefopt.benchmarking import BenchHooks, finite_or_none, format_table, peak_flops, process_seconds, summarize
    from prefopt.train import train

    flags = _flags(args)
    steps = flags.pop("steps")
    json_file = flags.pop("json_file")
    out_format = flags.pop("out_format")
    threads = flags.pop("num_threads")
    if steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {steps}")
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--num-threads: must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    flags["max_steps"] = steps
    flags.setdefault("save_steps", None)
    flags.setdefault("progress", False)
    flags.setdefault("logging_steps", 1)
    with tempfile.TemporaryDirectory(prefix="prefopt-bench-") as tmp:
        if "output_dir" not in flags:
            flags["output_dir"] = str(Path(tmp) / "run")
        if "cache_dir" not in flags:
            flags["cache_dir"] = str(Path(tmp) / "cache")
        cfg, explicit = build_config(flags, args.config)
        hooks = BenchHooks()
        start = time.perf_counter()
        # with --format json, stdout carries the JSON only: the run's own messages go to stderr
        with contextlib.redirect_stdout(sys.stderr) if out_format == "json" else contextlib.nullcontext():
            train(cfg, explicit, hooks=hooks)
        if not hooks.records:
            raise ConfigError("no training step ran (empty training data?)")
        setup = hooks.train_start - start
        wall = process_seconds()
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        settings = {k: getattr(cfg, k) for k in (
            "model", "data", "loss_type", "beta", "batch_size", "grad_accum", "max_length", "learning_rate",
            "dtype", "ref_cache", "prefix_sharing", "packing", "block_attention", "lean_activations", "trim_last_layer",
            "full_lm_head", "lm_head_chunk_size", "gradient_checkpointing", "compile", "lora_r", "shuffle", "seed")}
        settings["num_threads"] = torch.get_num_threads()
        settings["torch"] = torch.__version__
        result = summarize(hooks, setup_seconds=setup, wall_seconds=wall, peak=peak_flops(hooks.device, dtype),
                           settings=settings)
    result = finite_or_none(result)
    text = json.dumps(result, indent=1)
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(text + "\n")
    if out_format == "json":
        sys.stdout.write(text + "\n")
    else:
        print(format_table(result))
        if json_file:
            print(f"wrote {json_file}")
    return 0
