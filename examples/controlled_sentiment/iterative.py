"""Iterative DPO against offline DPO on the miniature controlled-sentiment task, at similar KL.

Offline DPO (the DPO paper's recipe, and `reproduce.py`'s DPO points): sample once from the
SFT model, pair best against worst by VADER, train. Iterative DPO (`prefopt iterate`):
sample from the current policy before every round, rank the answers by VADER, train on
them with the round's start policy (or, with --reference sft, the SFT model) as the
reference. Both start from the same SFT model, use the same 400 training prompts and 4
answers per prompt per sampling, the same beta and learning rate, and are evaluated the
same way (prefopt.iterate.evaluate_round: 200 held-out prompts x 4 samples, mean VADER
reward, KL(pi || pi_sft) from the policy's own samples, win rate against the SFT model's
samples).

Offline DPO is trained for several lengths, so that its KL brackets the rounds' KL and
the two methods can be compared at about the same distance from the SFT model.

    OMP_NUM_THREADS=1 python examples/controlled_sentiment/iterative.py --output-dir runs/iterative

writes OUTPUT_DIR/results.json, OUTPUT_DIR/frontier.png and prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from prefopt import demo
from prefopt.iterate import evaluate_round, read_eval_rewards, run_iterate
from prefopt.judges import load_judge
from prefopt.plotting import plot_frontier
from reproduce import start_output, train_sft_model  # the sibling script: the same SFT model and output rules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/iterative"))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of iterative DPO (default: 3)")
    parser.add_argument("--round-steps", type=int, default=demo.FULL.iterate_steps,
                        help=f"optimizer steps per round (default: {demo.FULL.iterate_steps})")
    parser.add_argument("--iterate-format", default="ranked", choices=("ranked", "pairs"),
                        help="iterative DPO on the K-answer rows or on their best-vs-worst pairs (default: ranked)")
    parser.add_argument("--reference", default="round", choices=("round", "sft"),
                        help="each round's reference: its start policy, or the SFT model (default: round)")
    parser.add_argument("--offline-steps", type=int, nargs="+", default=[25, 50, 100],
                        help="lengths of the offline DPO runs (default: 25 50 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, see prefopt demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = dataclasses.replace(demo.FULL, iterate_rounds=args.rounds, iterate_steps=args.round_steps)
    out: Path = args.output_dir
    say, t0 = start_output(parser, out, args.overwrite)
    splits, sft_dir = train_sft_model(settings, out)
    data = out / "data"
    say("SFT model trained")

    unique = len(splits["pair_prompts"]) // settings.pair_rounds
    train_prompts, eval_prompts = splits["pair_prompts"][:unique], splits["eval_prompts"]
    cfg, explicit = demo.iterate_config(out, sft_dir, train_prompts, eval_prompts, settings, args.iterate_format)
    cfg = dataclasses.replace(cfg, reference=args.reference)
    rounds = run_iterate(cfg, explicit, overwrite=True)
    say(f"iterative DPO: {args.rounds} rounds")
    sft_rewards = read_eval_rewards(Path(cfg.output_dir) / "round-0", len(eval_prompts), cfg.eval_samples)
    samples_per_round = unique * settings.pair_samples
    points = [{"method": "SFT", "label": "SFT", "kl": 0.0, "kl_stderr": 0.0, "reward": rounds[0]["reward_mean"],
               "reward_stderr": rounds[0]["reward_stderr"], "judged_samples": 0, "train_rows": 0}]
    for r in rounds[1:]:
        points.append({"method": f"iterative DPO ({args.iterate_format}, reference {args.reference})",
                       "label": f"round {r['round']}",
                       "kl": r["kl"], "kl_stderr": r["kl_stderr"], "reward": r["reward_mean"],
                       "reward_stderr": r["reward_stderr"], "win_rate_vs_sft": r["win_rate_vs_sft"],
                       "judged_samples": samples_per_round * r["round"],
                       "train_rows": settings.iterate_steps * settings.iterate_batch * r["round"],
                       "steps": settings.iterate_steps * r["round"], "seconds": r["seconds"]})

    judge = load_judge("vader")
    pair_info = demo.make_preference_pairs(sft_dir, splits["pair_prompts"], settings, judge, data / "pairs.jsonl",
                                           seed=settings.seed + 1)
    say(f"offline: {pair_info['pairs']} best-worst pairs from the SFT model")
    for steps in args.offline_steps:
        run = out / f"offline_dpo_{steps}"
        started = time.perf_counter()
        demo.train_run(model=sft_dir, data=data / "pairs.jsonl", output_dir=run, loss_type=["sigmoid"], steps=steps,
                       lr=settings.dpo_lr, beta=settings.dpo_beta, batch=settings.dpo_batch, cache_dir=out / "cache",
                       seed=settings.seed, warmup=max(1, steps // 10))
        stats, _ = evaluate_round(cfg, str(run / "final"), str(sft_dir), eval_prompts, cfg.train["seed"],
                                  sft_rewards=sft_rewards)
        points.append({"method": "offline DPO", "label": f"{steps} steps", "kl": stats["kl"],
                       "kl_stderr": stats["kl_stderr"], "reward": stats["policy_reward_mean"],
                       "reward_stderr": stats["policy_reward_stderr"], "win_rate_vs_sft": stats["win_rate"],
                       "judged_samples": len(splits["pair_prompts"]) * settings.pair_samples,
                       "train_rows": steps * settings.dpo_batch, "steps": steps,
                       "seconds": round(time.perf_counter() - started, 1)})
        say(f"offline DPO {steps} steps: reward {stats['policy_reward_mean']:.3f}, KL {stats['kl']:.2f}")

    chart = plot_frontier(points, out / "frontier.png", title="Iterative vs offline DPO (miniature): reward vs KL",
                          reward_label="mean VADER reward of samples")
    results = {"settings": dataclasses.asdict(settings), "iterate_format": args.iterate_format,
               "reference": args.reference,
               "offline_pairs": pair_info, "eval_prompts": len(eval_prompts),
               "eval_samples_per_prompt": cfg.eval_samples, "points": points,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| method | setting | samples judged | training rows seen (steps x batch) | KL(pi ‖ pi_sft) | "
          "mean reward | win rate vs SFT |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for p in points:
        win = f"{p['win_rate_vs_sft']:.3f}" if p.get("win_rate_vs_sft") is not None else "-"
        trained = f"{p['train_rows']:,}" if p["train_rows"] else "-"
        print(f"| {p['method']} | {p['label']} | {p['judged_samples']:,} | {trained} | "
              f"{p['kl']:.2f} ± {p['kl_stderr']:.2f} | {p['reward']:.3f} ± {p['reward_stderr']:.3f} | {win} |")
    say(f"wrote {out / 'results.json'} and {chart}")


if __name__ == "__main__":
    main()
