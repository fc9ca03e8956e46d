"""`prefopt iterate`: sample, judge and train for several rounds, each from the last round's policy.

The loop is :func:`prefopt.iterate.run_iterate`; this module turns flags into its
configuration. Train options are the same flags as `prefopt train` (and ``--config``
YAML), less those iterate sets for every round itself.
"""
from __future__ import annotations

import argparse

from prefopt.cli import command
from prefopt.errors import ConfigError


def _iterate_args(parser: argparse.ArgumentParser) -> None:
    from prefopt.commands.pipeline import add_prompt_and_judge_args
    from prefopt.config import add_arguments
    from prefopt.iterate import PER_ROUND_FIELDS

    g = parser.add_argument_group("iterate")
    g.add_argument("--model", required=True, help="the SFT model: round 1 samples from it and starts training from it")
    add_prompt_and_judge_args(g, "training prompts")
    g.add_argument("--rounds", type=int, default=2, help="rounds of sample -> judge -> train (default: 2)")
    g.add_argument("--samples-per-prompt", type=int, default=4,
                   help="answers sampled per training prompt each round (default: 4)")
    g.add_argument("--output-dir", required=True,
                   help="where round-N/ (data, training run, metrics), rounds.jsonl and iterate.yaml go")
    g.add_argument("--eval-prompts", default=None, help="held-out evaluation prompts (same formats as --prompts)")
    g.add_argument("--eval-fraction", type=float, default=None,
                   help="without --eval-prompts: hold out this fraction of --prompts for evaluation (default: 0.1)")
    g.add_argument("--eval-samples", type=int, default=4,
                   help="samples per evaluation prompt for the reward and KL estimates (default: 4)")
    g.add_argument("--reference", default="round", choices=("round", "sft"),
                   help="each round's reference: the policy the round starts from (round; Self-Rewarding LMs) or "
                        "the SFT model (sft; KL-regularised towards the initial policy) (default: round)")
    g.add_argument("--iterate-format", default="ranked", choices=("ranked", "pairs"),
                   help="train on the K-answer rows (ranked) or on best-vs-worst pairs of them (pairs) "
                        "(default: ranked)")
    g.add_argument("--keep-truncated", action="store_true",
                   help="also use answers cut at --max-new-tokens (by default they are left out)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per sampled answer (default: 64)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default: 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    g.add_argument("--generation-batch-size", type=int, default=16,
                   help="sequences per generation batch (default: 16)")
    g.add_argument("--judge-batch-size", type=int, default=16, help="texts per reward-model batch (default: 16)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir (an error if there is none); rerunning the same "
                        "command continues it too")
    g.add_argument("--overwrite", action="store_true", help="delete the iterate run in --output-dir and start again")
    parser.add_argument("--config", help="YAML file of train options (flags win over it)")
    add_arguments(parser, exclude=set(PER_ROUND_FIELDS))


def _train_flags(args: argparse.Namespace) -> dict:
    from prefopt.config import FIELDS
    from prefopt.iterate import PER_ROUND_FIELDS

    return {k: v for k, v in vars(args).items() if k in FIELDS and k not in PER_ROUND_FIELDS}


@command("iterate", "iterative DPO: sample from the current policy, judge, train; repeat for --rounds")(_iterate_args)
def run_iterate_command(args: argparse.Namespace) -> int:
    from prefopt.config import build_config, load_yaml
    from prefopt.iterate import PER_ROUND_FIELDS, IterateConfig, run_iterate, train_options

    if args.config:
        fixed = sorted(set(load_yaml(args.config)) & PER_ROUND_FIELDS)
        if fixed:
            raise ConfigError(f"--config {args.config}: '{fixed[0]}' is set by prefopt iterate for every round; "
                              "remove it from the file")
    tcfg, explicit = build_config(_train_flags(args), args.config)
    cfg = IterateConfig(model=args.model, prompts=args.prompts, judge=args.judge, output_dir=args.output_dir,
                        rounds=args.rounds, samples_per_prompt=args.samples_per_prompt, prompt_field=args.prompt_field,
                        eval_prompts=args.eval_prompts, eval_fraction=args.eval_fraction,
                        eval_samples=args.eval_samples, reference=args.reference,
                        iterate_format=args.iterate_format, keep_truncated=args.keep_truncated,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        generation_batch_size=args.generation_batch_size, judge_batch_size=args.judge_batch_size,
                        train=train_options(tcfg))
    records = run_iterate(cfg, explicit, resume=args.resume, overwrite=args.overwrite)
    print("round  reward (± se)       KL(policy || SFT) (± se)  win vs SFT  rows   train loss")
    for rec in records:
        win = "-" if rec["win_rate_vs_sft"] is None else f"{rec['win_rate_vs_sft']:.3f}"
        loss = "-" if rec["train_loss"] is None else f"{rec['train_loss']:.4f}"
        rows = "-" if rec["rows"] is None else str(rec["rows"])
        print(f"{rec['round']:>5}  {rec['reward_mean']:+.4f} ± {rec['reward_stderr']:.4f}  "
              f"{rec['kl']:>8.3f} ± {rec['kl_stderr']:.3f}          {win:>10}  {rows:>5}  {loss:>10}")
    print(f"wrote {args.output_dir}/rounds.jsonl; the last policy is {records[-1]['policy']}")
    return 0
