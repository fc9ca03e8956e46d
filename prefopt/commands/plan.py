"""`prefopt plan`: estimate a training run's peak memory before starting it.

Reads the model's config.json (no weights), tokenizes --data with the trainer's own data
pipeline, and prints the estimate of :mod:`prefopt.plan` with its largest parts; with
--gpu-memory it says whether the run fits and, when not, which settings would.
"""
from __future__ import annotations

import argparse

from prefopt.cli import _flags, command
from prefopt.config import add_arguments, build_config
from prefopt.errors import ConfigError, ModelError, PrefoptError


def _plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with the same option names (flags win over it)")
    parser.add_argument("--gpu-memory", dest="gpu_memory", metavar="SIZE",
                        help="memory of one device, e.g. 80GiB or 24G: say whether the run fits, and what would")
    parser.add_argument("--num-processes", dest="num_processes", type=int, default=1,
                        help="processes (devices) the run is launched on (default: 1)")
    parser.add_argument("--sharding", choices=("ddp", "zero2", "zero3"), default=None,
                        help="how several processes share the state: ddp (a full copy each), zero2 (gradients and "
                             "optimizer state divided), zero3 (or FSDP: weights too) (default: zero3 when "
                             "--num-processes > 1)")
    parser.add_argument("--device", dest="plan_device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the estimate is of host memory, and includes reading the checkpoint at load")
    add_arguments(parser)


@command("plan", "estimate the peak memory of a training run from the model's config and the data")(_plan_args)
def run_plan(args: argparse.Namespace) -> int:
    from prefopt import plan as P
    from prefopt.inputs import prepare_examples
    from prefopt.modeling import load_tokenizer
    from prefopt.train import job_mode

    flags = _flags(args)
    budget_text = flags.pop("gpu_memory")
    processes = flags.pop("num_processes")
    sharding = flags.pop("sharding")
    device = flags.pop("plan_device")
    if processes < 1:
        raise ConfigError(f"--num-processes: must be >= 1, got {processes}")
    try:
        budget = P.parse_memory(budget_text) if budget_text else None
    except ValueError as e:
        raise ConfigError(f"--gpu-memory: {e}") from None
    cfg, _ = build_config(flags, args.config)
    if not cfg.model:
        raise ConfigError("--model is required: a local model directory or a hub name")
    tokenizer = load_tokenizer(cfg.tokenizer_path or "", trust_remote_code=cfg.trust_remote_code,
                               chat_template=cfg.chat_template)
    data = prepare_examples(cfg, tokenizer, job_mode(cfg), None)
    try:
        plan = P.make_plan(cfg, data.train, num_processes=processes, sharding=sharding, host=device == "cpu")
        shape = plan.data()
        est = plan.estimate()
    except Exception as e:  # noqa: BLE001 -- a config the estimate does not model is said in one line
        if isinstance(e, PrefoptError):
            raise
        raise ModelError(f"--model {cfg.model}: prefopt plan cannot estimate this architecture "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    m = plan.model
    print(f"model: {m.name}, {m.params / 1e6:.1f}M parameters ({m.layers} layers, hidden {m.hidden}, "
          f"vocab {m.vocab}); {plan.setup.describe()}")
    layout = ("the whole micro-batch in one row" if shape.one_row else "one packed row at a time"
              if shape.rows_per_forward == 1 else f"the whole micro-batch, {shape.rows_per_forward} rows")
    print(f"data: {data.summary}; largest forward {shape.row_tokens} tokens ({layout}), "
          f"{shape.row_scored} scored by the LM head")
    print(est.line())
    for name, size in est.largest(len(est.parts)):
        print(f"  {name:<26} {P.format_bytes(size):>12}")
    for note in est.notes:
        print(f"note: {note}")
    if budget is None:
        return 0
    if est.peak <= budget:
        print(f"fits in {P.format_bytes(budget)} ({P.format_bytes(budget - est.peak)} to spare)")
        return 0
    print(f"does not fit in {P.format_bytes(budget)}: {P.format_bytes(est.peak - budget)} over")
    suggestions = P.suggest(plan, budget)
    fitting = [s for s in suggestions if s.fits(budget)]
    if fitting:
        print("settings that fit:")
    else:
        print("no single suggested change fits; the lowest found:")
    for s in suggestions:
        print(f"  {s.change}: peak {P.format_bytes(s.estimate.peak)}")
    return 0 if fitting else 1
