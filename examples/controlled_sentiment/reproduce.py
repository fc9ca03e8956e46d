"""Reward-vs-KL frontier of the DPO paper's Figure 2 (left), in miniature, on a CPU.

The paper compares, on IMDb sentiment generation, how much reward each method reaches
for a given KL(pi || pi_ref) from the SFT model. This script runs the same comparison on
prefopt's demo task (tiny model trained on the shipped reviews, VADER as the reward,
see prefopt/demo.py), with the methods of the figure that need no reward model of their
own:

* **DPO** at several beta, on best-worst pairs sampled from the SFT model and judged by VADER;
* **Preferred-FT**: supervised fine-tuning of the SFT model on the chosen answers;
* **Unlikelihood**: maximise log p(y_w) and push down every token of y_l with the
  unlikelihood term -sum_t log(1 - p(y_l,t | x, y_l,<t)), weighted by alpha; written here
  on top of prefopt's public pieces (tokenizing, collate, completion_logps' per-token
  log-probs), since it is no loss prefopt ships;
* **Best-of-N** sampling from the SFT model (no training): for each prompt, the best of N
  samples by reward; its KL from the SFT model is the known closed form
  log N - (N - 1) / N (an upper bound, exact when rewards do not tie).

Every trained policy is evaluated the same way: 200 held-out prompts x 4 samples, mean
VADER reward, and KL(pi || pi_sft) estimated from the policy's own samples.

    python examples/controlled_sentiment/reproduce.py --output-dir runs/frontier \\
        --chart docs/images/controlled_sentiment_frontier.png

writes OUTPUT_DIR/results.json (every point), OUTPUT_DIR/frontier.png, and prints a
markdown table. It trains 1 SFT model and 17 policies: about 12 minutes on one CPU thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from prefopt import demo
from prefopt.generation import GenerationSettings, encode_prompts, generate, mean_and_stderr, score_samples
from prefopt.judges import load_judge
from prefopt.plotting import plot_frontier

# (beta, optimizer steps): beta sweeps the KL penalty; fewer steps give points nearer the SFT model
DPO_RUNS = ((0.05, 100), (0.1, 25), (0.1, 50), (0.1, 100), (0.25, 100), (0.5, 100), (1.0, 100))
PFT_STEPS = (50, 100, 200, 400, 800)
UL_ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0)
BON_NS = (2, 4, 8, 16)


def train_unlikelihood(sft_dir: Path, pairs_file: Path, out: Path, *, alpha: float, steps: int, lr: float,
                       batch_size: int, seed: int) -> Path:
    """Unlikelihood training (the DPO paper's baseline), with prefopt's data and log-prob pieces.

    loss per pair = -log p(y_w | x) + alpha * sum_t -log(1 - p(y_l,t | x, y_l,<t)).
    """
    from transformers import get_scheduler

    from prefopt.batching import collate
    from prefopt.data import TokenizeSettings, detect_format, load_rows, to_pairs, tokenize_pairs
    from prefopt.logprobs import completion_logps

    model, tok = demo.load_model(sft_dir)
    rows = load_rows(str(pairs_file))
    examples, _ = tokenize_pairs(to_pairs(rows, detect_format(rows)), tok,
                                 TokenizeSettings(max_length=96, max_prompt_length=24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, steps // 10), num_training_steps=steps)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        chosen_idx, order = order[:batch_size], order[batch_size:]
        batch = collate([examples[i] for i in chosen_idx], pad_token_id=tok.pad_token_id)
        seq = completion_logps(model, batch)
        nll = -seq.logps[0::2]
        rejected = batch.token_seq % 2 == 1
        # log(1 - p) = log(-expm1(log p)), clamped away from p = 1 where it is -inf
        lp = seq.token_logps[rejected].clamp(max=-1e-6)
        ul_tokens = -torch.log(-torch.expm1(lp))
        ul = torch.zeros(batch.num_examples).index_add(0, batch.token_seq[rejected] // 2, ul_tokens)
        loss = (nll + alpha * ul).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    final = out / "final"
    model.save_pretrained(final)
    tok.save_pretrained(final)
    return final


def best_of_n(sft_model, tok, prompts, judge, settings: demo.DemoSettings, n_max: int, seed: int) -> list[dict]:
    """Best-of-N points: the best of each disjoint group of N samples, averaged over groups and prompts."""
    gen = GenerationSettings(num_samples=n_max, max_new_tokens=settings.max_new_tokens, seed=seed,
                             batch_size=settings.gen_batch, max_prompt_length=24)
    ids = encode_prompts(tok, prompts, 24)
    rewards = score_samples(judge, prompts, generate(sft_model, tok, ids, gen))
    points = []
    for n in BON_NS:
        best = rewards.view(len(prompts), n_max // n, n).max(dim=-1).values
        mean, se = mean_and_stderr(best)
        points.append({"method": "Best-of-N", "label": f"N={n}", "kl": math.log(n) - (n - 1) / n,
                       "kl_stderr": 0.0, "reward": mean, "reward_stderr": se})
    return points


def start_output(parser: argparse.ArgumentParser, out: Path, overwrite: bool):
    """An empty ``out`` (a non-empty one is replaced only with --overwrite), a printer stamping the seconds
    since then, and that start time."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            parser.error(f"{out} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    return say, t0


def train_sft_model(settings: demo.DemoSettings, out: Path) -> tuple[dict, Path]:
    """The miniature's data splits and the SFT model trained on them from a fresh base model, as the demo
    makes them: ``(splits, SFT final/ directory)``; the SFT rows go to ``out/data/sft.jsonl``."""
    splits = demo.make_splits(settings)
    data = out / "data"
    data.mkdir()
    (data / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in splits["sft_rows"]))
    base = demo.build_base(settings, splits["corpus"], out / "base")
    demo.train_run(model=base, data=data / "sft.jsonl", output_dir=out / "sft", loss_type=["sft"],
                   steps=settings.sft_steps, lr=settings.sft_lr, batch=settings.sft_batch, cache_dir=out / "cache",
                   seed=settings.seed, warmup=max(1, settings.sft_steps // 20))
    return splits, out / "sft" / "final"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/frontier"))
    parser.add_argument("--chart", type=Path, default=None, help="also copy the chart here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, see prefopt demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = demo.FULL
    out: Path = args.output_dir
    say, t0 = start_output(parser, out, args.overwrite)
    splits, sft_dir = train_sft_model(settings, out)
    data = out / "data"
    common = {"cache_dir": out / "cache", "seed": settings.seed, "batch": settings.dpo_batch}
    say("SFT model trained")
    judge = load_judge("vader")
    pair_info = demo.make_preference_pairs(sft_dir, splits["pair_prompts"], settings, judge, data / "pairs.jsonl",
                                           seed=settings.seed + 1)
    say(f"{pair_info['pairs']} preference pairs sampled and judged")

    sft_model, tok = demo.load_model(sft_dir)
    prompts = splits["eval_prompts"]
    eval_seed = settings.seed + 2
    sft_eval = demo.evaluate_policy(sft_model, sft_model, tok, prompts, judge, settings, seed=eval_seed)
    s = sft_eval["stats"]
    points = [{"method": "SFT", "label": "SFT", "kl": 0.0, "kl_stderr": 0.0, "reward": s["policy_reward_mean"],
               "reward_stderr": s["policy_reward_stderr"]}]

    def evaluate(method: str, label: str, final: Path, config: dict) -> None:
        model, _ = demo.load_model(final)
        ev = demo.evaluate_policy(model, sft_model, tok, prompts, judge, settings, seed=eval_seed,
                                  ref_samples=sft_eval)["stats"]
        points.append({"method": method, "label": label, "kl": ev["kl"], "kl_stderr": ev["kl_stderr"],
                       "reward": ev["policy_reward_mean"], "reward_stderr": ev["policy_reward_stderr"],
                       "win_rate_vs_sft": ev["win_rate"], "mean_tokens": ev["policy_mean_tokens"], **config})
        say(f"{method} {label}: reward {ev['policy_reward_mean']:.3f}, KL {ev['kl']:.2f}")

    for beta, steps in DPO_RUNS:
        run = out / f"dpo_beta{beta}_{steps}"
        demo.train_run(model=sft_dir, data=data / "pairs.jsonl", output_dir=run, loss_type=["sigmoid"],
                       steps=steps, lr=settings.dpo_lr, beta=beta, warmup=max(1, steps // 10), **common)
        label = f"beta={beta}" + (f", {steps} steps" if steps != settings.dpo_steps else "")
        evaluate("DPO", label, run / "final", {"beta": beta, "steps": steps})
    for steps in PFT_STEPS:
        run = out / f"pft_{steps}"
        demo.train_run(model=sft_dir, data=data / "pairs.jsonl", output_dir=run, loss_type=["sft"], steps=steps,
                       lr=settings.dpo_lr, warmup=max(1, steps // 10), **common)
        evaluate("Preferred-FT", f"{steps} steps", run / "final", {"steps": steps})
    for alpha in UL_ALPHAS:
        run = out / f"unlikelihood_{alpha}"
        final = train_unlikelihood(sft_dir, data / "pairs.jsonl", run, alpha=alpha, steps=settings.dpo_steps,
                                   lr=settings.dpo_lr, batch_size=settings.dpo_batch, seed=settings.seed)
        evaluate("Unlikelihood", f"alpha={alpha}", final, {"alpha": alpha, "steps": settings.dpo_steps})
    points.extend(best_of_n(sft_model, tok, prompts, judge, settings, max(BON_NS), seed=eval_seed + 1))
    say("Best-of-N evaluated")

    chart = plot_frontier(points, out / "frontier.png", title="Controlled sentiment (miniature): reward vs KL",
                          reward_label="mean VADER reward of samples")
    if args.chart:
        args.chart.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(chart, args.chart)
    results = {"settings": dataclasses.asdict(settings), "pairs": pair_info, "eval_prompts": len(prompts),
               "eval_samples_per_prompt": settings.eval_samples, "points": points,
               "seconds": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| method | setting | KL(pi ‖ pi_sft) | mean reward | win rate vs SFT |")
    print("|---|---|---:|---:|---:|")
    for p in points:
        win = f"{p['win_rate_vs_sft']:.3f}" if "win_rate_vs_sft" in p else "-"
        print(f"| {p['method']} | {p['label']} | {p['kl']:.2f} ± {p['kl_stderr']:.2f} | "
              f"{p['reward']:.3f} ± {p['reward_stderr']:.3f} | {win} |")
    say(f"wrote {out / 'results.json'} and {chart}")


if __name__ == "__main__":
    main()
