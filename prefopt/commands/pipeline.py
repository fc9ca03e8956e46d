"""Pipeline commands around training: `sample`, `plot`, `demo`, and `eval --generate`'s flags.

Heavy imports (torch, transformers, matplotlib) stay inside the functions, so
`prefopt --help` does not pay for them.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prefopt.cli import command
from prefopt.errors import ConfigError


def _generation_args(parser: argparse.ArgumentParser, *, batch_flag: str = "--batch-size") -> None:
    g = parser.add_argument_group("generation")
    g.add_argument("--num-samples", type=int, default=4, help="completions sampled per prompt (default: 4)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per completion (default: 64)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; 0 = greedy (default: 1.0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0, off)")
    g.add_argument(batch_flag, dest="gen_batch_size", type=int, default=16,
                   help="sequences per generation batch (default: 16)")
    g.add_argument("--judge-batch-size", type=int, default=16, help="texts per reward-model batch (default: 16)")
    g.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")


def _settings(args: argparse.Namespace, seed: int, max_prompt_length: int | None):
    from prefopt.generation import GenerationSettings

    s = GenerationSettings(num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=seed,
                           batch_size=args.gen_batch_size, max_prompt_length=max_prompt_length)
    s.validate()
    return s


def _limit(prompts: list, max_prompts: int | None) -> list:
    if max_prompts is not None:
        if max_prompts < 1:
            raise ConfigError(f"--max-prompts: must be >= 1, got {max_prompts}")
        prompts = prompts[:max_prompts]
    return prompts


# ---------------------------------------------------------------------------- sample


def add_prompt_and_judge_args(parser, what: str) -> None:
    """--prompts, --prompt-field and --judge, as `sample` and `iterate` take them (``what``: the prompts' role)."""
    parser.add_argument("--prompts", required=True,
                        help=f"{what}: .jsonl/.json/.csv with a prompt field, or .txt with one prompt per line")
    parser.add_argument("--prompt-field", default="prompt", help="name of the prompt field (default: prompt)")
    parser.add_argument("--judge", required=True,
                        help="reward-model directory (num_labels=1), module:function, or 'vader'")


def _sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model to sample from (usually the SFT model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's)")
    add_prompt_and_judge_args(parser, "prompts")
    parser.add_argument("--output", required=True, help="where to write the preference data (.jsonl)")
    parser.add_argument("--output-format", default="pairs", choices=("pairs", "ranked"),
                        help="pairs: prompt/chosen/rejected rows (see --pairing); ranked: one row per prompt with "
                             "its usable samples and their scores, prompt/completions/scores, for K-answer "
                             "training (default: pairs)")
    parser.add_argument("--pairing", default=None, choices=("best-worst", "all", "bradley-terry"),
                        help="pairs: best vs worst sample per prompt, all pairs of unequal score, or pairs labelled "
                             "at random with P(y1 > y2) = sigmoid(s1 - s2) (default: best-worst)")
    parser.add_argument("--bt-scale", type=float, default=None,
                        help="bradley-terry: P(y1 > y2) = sigmoid(scale * (s1 - s2)) (default: 1.0)")
    parser.add_argument("--keep-truncated", action="store_true",
                        help="also pair samples cut at --max-new-tokens (by default they are left out: training "
                             "ends every completion with EOS, which would teach the model to stop mid-sentence)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--max-prompt-length", type=int, default=512, help="prompt tokens kept (default: 512)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--trust-remote-code", action="store_true")
    _generation_args(parser)


@command("sample", "sample completions, score them with a judge, write preference pairs or K-answer rows")(
    _sample_args)
def run_sample(args: argparse.Namespace) -> int:
    from prefopt.atomic import write_jsonl
    from prefopt.generation import load_prompts, sample_pairs

    ranked = args.output_format == "ranked"
    if ranked and (args.pairing is not None or args.bt_scale is not None):
        flag = "--pairing" if args.pairing is not None else "--bt-scale"
        raise ConfigError(f"{flag} applies to --output-format pairs; ranked rows keep every usable sample, and "
                          "training derives their pairs (--k-pairing)")
    pairing = args.pairing or "best-worst"
    if args.bt_scale is not None and pairing != "bradley-terry":
        raise ConfigError("--bt-scale applies to --pairing bradley-terry only")
    settings = _settings(args, args.seed, args.max_prompt_length)
    prompts = _limit(load_prompts(args.prompts, prompt_field=args.prompt_field), args.max_prompts)
    rows, summary = sample_pairs(model=args.model, prompts=prompts, judge=args.judge, settings=settings,
                                 pairing=pairing, bt_scale=1.0 if args.bt_scale is None else args.bt_scale,
                                 tokenizer=args.tokenizer, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                                 judge_batch_size=args.judge_batch_size, keep_truncated=args.keep_truncated,
                                 output_format=args.output_format)
    write_jsonl(args.output, rows)
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items() if n) or "none"
    print(f"{summary['prompts']} prompts x {settings.num_samples} samples: mean score {summary['score_mean']:.4f}; "
          f"{summary['finished_fraction']:.0%} ended with EOS")
    cut = summary["truncated_samples"]
    if cut:
        what = ("kept (--keep-truncated)" if args.keep_truncated
                else f"left out of the {'rows' if ranked else 'pairs'} (--keep-truncated keeps them)")
        print(f"{cut} of {summary['samples']} samples were cut at --max-new-tokens {settings.max_new_tokens}: {what}")
    what = "K-answer rows (ranked)" if ranked else f"pairs ({pairing})"
    print(f"wrote {summary['rows']} {what} to {args.output}; skipped: {skipped}")
    if not rows:
        nothing = "no rows" if ranked else "no pairs"
        if cut and not args.keep_truncated:
            print(f"warning: {nothing}: too few samples per prompt ended before --max-new-tokens; raise "
                  "--max-new-tokens, sample more, or pass --keep-truncated")
        else:
            print(f"warning: {nothing}: every prompt's samples tied or were identical; sample more or raise the "
                  "temperature")
    return 0


# ---------------------------------------------------------------------------- eval --generate


def add_generation_eval_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `prefopt eval --generate` (added to the eval command's parser by prefopt.cli)."""
    parser.add_argument("--generate", action="store_true",
                        help="sample from the policy and the reference, judge both, estimate KL(policy || ref)")
    parser.add_argument("--judge", default=None,
                        help="with --generate: reward-model directory, module:function, or 'vader'")
    parser.add_argument("--prompts", default=None,
                        help="with --generate: prompts file (default: the unique prompts of --eval-data or --data)")
    _generation_args(parser, batch_flag="--generation-batch-size")


def run_generation_eval(args: argparse.Namespace, flags: dict, output: str) -> int:
    from prefopt.config import build_config
    from prefopt.atomic import write_json
    from prefopt.generation import generation_eval, load_prompts

    if not args.judge:
        raise ConfigError("--generate needs --judge (a reward-model directory, module:function, or 'vader')")
    cfg, _ = build_config(flags, args.config)
    if not cfg.model:
        raise ConfigError("--model is required")
    settings = _settings(args, cfg.seed, cfg.max_prompt_length)
    source = args.prompts or cfg.eval_data or cfg.data
    if not source:
        raise ConfigError("--generate needs prompts: pass --prompts FILE, or --data / --eval-data")
    prompts = _limit(load_prompts(source, prompt_field=cfg.prompt_field, unique=args.prompts is None),
                     args.max_prompts)
    result = generation_eval(model=cfg.model, ref_model=cfg.ref_model, judge=args.judge, prompts=prompts,
                             settings=settings, tokenizer=cfg.tokenizer, dtype=cfg.dtype,
                             attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code,
                             chunk_size=cfg.lm_head_chunk_size, judge_batch_size=args.judge_batch_size)
    result["prompts_source"] = source
    write_json(output, result, indent=1, ensure_ascii=False)
    print(f"policy reward {result['policy_reward_mean']:.4f} ± {result['policy_reward_stderr']:.4f}  "
          f"reference reward {result['ref_reward_mean']:.4f} ± {result['ref_reward_stderr']:.4f}  "
          f"win rate {result['win_rate']:.3f}  KL {result['kl']:.4f} ± {result['kl_stderr']:.4f}")
    if "kl_note" in result:
        print(f"note: {result['kl_note']}")
    print(f"wrote {output} ({len(prompts)} prompts x {settings.num_samples} samples)")
    return 0


# ---------------------------------------------------------------------------- plot


def _plot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR",
                        help="run directories (holding metrics.jsonl), directories of runs, or `prefopt iterate` "
                             "directories (holding rounds.jsonl: reward and KL by round, and each round's curves)")
    parser.add_argument("--output-dir", default=None,
                        help="where the PNGs go (default: RUN_DIR/plots for one run, ./prefopt-plots otherwise)")
    parser.add_argument("--frontier", nargs="+", default=None, metavar="FILE",
                        help="generation-eval JSON files (eval --generate output, demo summary.json) for a "
                             "reward-vs-KL chart; found in the run directories automatically when omitted")


@command("plot", "draw training curves and reward-vs-KL charts as PNG files")(_plot_args)
def run_plot(args: argparse.Namespace) -> int:
    from prefopt.plotting import (detect_frontier_files, is_iterate_dir, iterate_train_runs, plot_frontier,
                                  plot_rounds, plot_runs, read_frontier_files)

    if not args.runs and not args.frontier:
        raise ConfigError("give at least one RUN_DIR, or --frontier FILE...")
    if args.output_dir:
        out = Path(args.output_dir)
    elif len(args.runs) == 1:
        out = Path(args.runs[0]) / "plots"
    else:
        out = Path("prefopt-plots")
    iterated = [r for r in args.runs if is_iterate_dir(r)]
    runs = [r for r in args.runs if r not in iterated]
    written = [plot_rounds(iterated, out / "rounds.png")] if iterated else []
    runs += [d for r in iterated for d in iterate_train_runs(r)]
    if runs:
        written += plot_runs(runs, out)
    files = args.frontier if args.frontier else detect_frontier_files(args.runs)
    if files:
        written.append(plot_frontier(read_frontier_files(files), out / "frontier.png"))
    for p in written:
        print(p)
    if not written:
        print("nothing to draw: the runs' metrics.jsonl files hold no logged metrics yet")
    return 0


# ---------------------------------------------------------------------------- demo


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="prefopt-demo",
                        help="where the demo writes its models, data, charts and summary.json "
                             "(default: ./prefopt-demo)")
    parser.add_argument("--quick", action="store_true", help="a much smaller configuration (under a minute)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --output-dir")
    parser.add_argument("--iterative", action="store_true",
                        help="add two rounds of iterative DPO (prefopt iterate) after offline DPO, compared with it "
                             "(about 90 s more on one CPU thread, which takes the full demo past five minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default: 1; the demo's model is too small to gain from more, "
                             "and extra threads slow it down badly on a busy machine)")


@command("demo", "run the whole pipeline (SFT, sampled pairs, DPO, evaluation) on a miniature sentiment task")(
    _demo_args)
def run_demo_command(args: argparse.Namespace) -> int:
    from prefopt.demo import run_demo

    run_demo(args.output_dir, quick=args.quick, overwrite=args.overwrite, threads=args.threads,
             iterative=args.iterative)
    return 0
