"""`prefopt demo`: the whole DPO pipeline on a miniature of the paper's sentiment task.

The DPO paper's controlled-sentiment experiment (section 6.1): prompts are the first
words of a movie review, the policy continues them, and the reward is a sentiment
classifier's score; DPO must raise the reward while staying close (in KL) to the SFT
model it started from. This demo runs the same pipeline end to end on a CPU in a few
minutes with nothing downloaded:

1. **Model.** A byte-level BPE tokenizer and a small Llama-architecture model are built
   from scratch (prefopt.tiny), trained on the reviews shipped in
   ``prefopt/resources/reviews.txt`` (mixed-sentiment, written by
   examples/controlled_sentiment/make_corpus.py).
2. **SFT.** The model learns to write reviews: prompt = a review's first 2-4 words,
   completion = the rest (``prefopt.train.train`` with loss ``sft``). This is pi_ref.
3. **Preference pairs.** For held-out prompts, several completions are sampled from the
   SFT model and judged by VADER (the ``vaderSentiment`` lexicon, a real sentiment scorer
   nobody here wrote); the best and worst per prompt form a pair.
4. **DPO** on those pairs, with the SFT model as the reference.
5. **Evaluation** on other held-out prompts: mean reward of SFT and DPO samples, the DPO
   policy's win rate against SFT, and KL(pi_dpo || pi_sft) estimated from DPO's samples.
6. With ``--iterative``, **iterative DPO** (`prefopt iterate`): two rounds that each sample
   afresh from the current policy on the pair prompts, rank the answers with VADER and train
   on the K-answer rows, evaluated the same way round by round. It is not on by default
   because it takes the full demo from about 4 to about 5 minutes on one CPU thread.

The reward is VADER's compound score of **prompt + completion**, the whole review as a
reader sees it: a continuation that negates its prompt ("... was | not good at all") is
scored in context. The prompt is the same for every completion it is compared with, so it
shifts the rewards of a prompt together and does not decide which completion wins.
"""
from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError

DEMO_ENTRIES = ("demo.json", "base", "data", "sft", "dpo", "iterate", "plots", "cache", "summary.json", "eval")
JUDGE = "vader"


@dataclass
class DemoSettings:
    """Every knob of the demo; ``FULL`` and ``QUICK`` are the two shipped configurations."""

    num_reviews: int = 4000          # reviews of the corpus used (SFT train + held-out prompts)
    heldout_reviews: int = 600       # reviews kept out of SFT; their openings are the pair and eval prompts
    eval_prompts: int = 200          # of the held-out openings, this many are evaluation prompts
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    sft_steps: int = 500
    sft_lr: float = 2e-3
    sft_batch: int = 32
    pair_samples: int = 4            # completions per prompt, judged to make best-worst pairs
    pair_rounds: int = 4             # times each pair prompt is used (different samples each time)
    dpo_steps: int = 100
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    dpo_batch: int = 32
    eval_samples: int = 4
    max_new_tokens: int = 48
    gen_batch: int = 64
    seed: int = 0
    # the --iterative stage: rounds of iterative DPO on K-answer rows, each round sampled afresh from
    # the last round's policy; rounds x steps x batch spends what offline DPO does on its pairs
    iterate_rounds: int = 2
    iterate_steps: int = 50
    iterate_batch: int = 16


FULL = DemoSettings()
QUICK = DemoSettings(num_reviews=1000, heldout_reviews=240, eval_prompts=40, vocab_size=600, hidden_size=64,
                     num_layers=2, num_heads=4, intermediate_size=128, sft_steps=150, sft_lr=3e-3, sft_batch=32,
                     pair_samples=4, pair_rounds=2, dpo_steps=25, dpo_lr=2e-4, dpo_batch=32, eval_samples=4,
                     max_new_tokens=32, gen_batch=64, iterate_rounds=2, iterate_steps=12, iterate_batch=16)


# ---------------------------------------------------------------------------- data


def load_reviews() -> list[str]:
    """The shipped corpus, one review per line."""
    text = resources.files("prefopt").joinpath("resources/reviews.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_review(review: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, completion): the first 2-4 words, and the rest with its leading space."""
    words = review.split(" ")
    k = min(rng.randint(2, 4), len(words) - 1)
    return " ".join(words[:k]), " " + " ".join(words[k:])


def make_splits(settings: DemoSettings) -> dict[str, Any]:
    """SFT rows, pair prompts and eval prompts, from disjoint reviews of the corpus."""
    reviews = load_reviews()[:settings.num_reviews]
    rng = random.Random(settings.seed)
    order = list(range(len(reviews)))
    rng.shuffle(order)
    held = [reviews[i] for i in order[:settings.heldout_reviews]]
    train = [reviews[i] for i in order[settings.heldout_reviews:]]
    sft_rows = []
    for r in train:
        prompt, completion = split_review(r, rng)
        sft_rows.append({"prompt": prompt, "completion": completion})
    prompts = [split_review(r, rng)[0] for r in held]
    eval_prompts = prompts[:settings.eval_prompts]
    pair_prompts = prompts[settings.eval_prompts:] * settings.pair_rounds
    return {"corpus": reviews, "sft_rows": sft_rows, "pair_prompts": pair_prompts, "eval_prompts": eval_prompts}


# ---------------------------------------------------------------------------- stages


def build_base(settings: DemoSettings, corpus: list[str], path: Path) -> Path:
    """Train the tokenizer and save a randomly initialised model to ``path``."""
    from prefopt.tiny import build_llama, save_tiny, train_tokenizer

    tok = train_tokenizer(corpus, vocab_size=settings.vocab_size)
    model = build_llama(tok, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                        num_heads=settings.num_heads, intermediate_size=settings.intermediate_size,
                        max_position_embeddings=256, seed=settings.seed)
    return save_tiny(model, tok, path)


def train_config(*, loss_type: list[str], steps: int, lr: float, batch: int, cache_dir: Path, seed: int,
                 beta: float = 0.1, warmup: int = 0, scheduler: str = "cosine", model: Path | str | None = None,
                 data: Path | None = None, output_dir: Path | None = None, ref_model: str | None = None):
    """The demo's TrainConfig; model, data and output directory are left out for `iterate`, which sets them."""
    from prefopt.config import TrainConfig

    return TrainConfig(model=None if model is None else str(model), ref_model=ref_model,
                       data=None if data is None else str(data),
                       output_dir=None if output_dir is None else str(output_dir), overwrite=True,
                       loss_type=loss_type, beta=beta, learning_rate=lr, batch_size=batch, max_steps=steps,
                       lr_scheduler=scheduler, warmup_steps=warmup, max_length=96, max_prompt_length=24,
                       save_steps=None, logging_steps=max(1, steps // 25), cache_dir=str(cache_dir), seed=seed,
                       progress=False)


def explicit_options(loss_type: list[str]) -> set[str]:
    return {"loss_type", "learning_rate", "max_steps"} | ({"beta"} if loss_type != ["sft"] else set())


def train_run(*, model: Path | str, data: Path, output_dir: Path, loss_type: list[str], steps: int, lr: float,
              batch: int, cache_dir: Path, seed: int, beta: float = 0.1, ref_model: str | None = None,
              warmup: int = 0, scheduler: str = "cosine") -> dict[str, Any]:
    """One ``prefopt.train.train`` run with the demo's fixed options."""
    from prefopt.train import train

    cfg = train_config(model=model, data=data, output_dir=output_dir, loss_type=loss_type, steps=steps, lr=lr,
                       batch=batch, cache_dir=cache_dir, seed=seed, beta=beta, ref_model=ref_model, warmup=warmup,
                       scheduler=scheduler)
    return train(cfg, explicit_options(loss_type))


def load_model(path: Path | str):
    from prefopt.modeling import load_causal_lm, load_tokenizer

    return load_causal_lm(str(path)), load_tokenizer(str(path))


def sample_judged(model, tok, prompts: list[str], judge, num_samples: int, settings: DemoSettings, seed: int):
    """(prompt ids, samples, rewards [P, K]) for ``prompts`` under ``model``."""
    from prefopt.generation import GenerationSettings, encode_prompts, generate, score_samples

    gen = GenerationSettings(num_samples=num_samples, max_new_tokens=settings.max_new_tokens, temperature=1.0,
                             top_p=1.0, seed=seed, batch_size=settings.gen_batch, max_prompt_length=24)
    ids = encode_prompts(tok, prompts, gen.max_prompt_length)
    samples = generate(model, tok, ids, gen)
    return ids, samples, score_samples(judge, prompts, samples)


def make_preference_pairs(sft_dir: Path, prompts: list[str], settings: DemoSettings, judge, path: Path,
                          seed: int) -> dict[str, Any]:
    """Sample from the SFT model, judge, and write best-worst pairs to ``path``."""
    from prefopt.atomic import write_jsonl
    from prefopt.generation import make_pairs, mean_and_stderr

    model, tok = load_model(sft_dir)
    _, samples, rewards = sample_judged(model, tok, prompts, judge, settings.pair_samples, settings, seed)
    rows, skipped = make_pairs(prompts, samples, rewards, "best-worst", seed=seed)
    write_jsonl(path, rows)
    mean, _ = mean_and_stderr(rewards)
    gap, _ = mean_and_stderr([r["chosen_score"] - r["rejected_score"] for r in rows] or [0.0])
    return {"pairs": len(rows), "skipped": skipped, "sample_reward_mean": mean, "mean_score_gap": gap}


def evaluate_policy(policy, ref, tok, prompts: list[str], judge, settings: DemoSettings, seed: int,
                    ref_samples=None) -> dict[str, Any]:
    """Reward of the policy's samples and KL(policy || ref) from them; ref samples for the win rate."""
    from prefopt.generation import sample_logps, summarize

    ids, samples, rewards = sample_judged(policy, tok, prompts, judge, settings.eval_samples, settings, seed)
    kw = {"batch_size": settings.gen_batch, "pad_token_id": tok.pad_token_id}
    ratios = (sample_logps(policy, ids, samples, **kw) - sample_logps(ref, ids, samples, **kw)).double()
    ref_rewards = ref_samples["rewards"] if ref_samples else None
    lengths = _lengths(samples)
    stats = summarize(rewards, ref_rewards, ratios, lengths)
    return {"stats": stats, "samples": samples, "rewards": rewards, "ids": ids}


def iterate_config(out: Path, sft_dir: Path, prompts: list[str], eval_prompts: list[str], settings: DemoSettings,
                   iterate_format: str = "ranked"):
    """The `prefopt iterate` configuration of the demo task, and the train options it names explicitly.

    Each round samples ``pair_samples`` answers per prompt from the current policy, VADER
    ranks them, and DPO (the demo's beta and learning rate) trains on them; the prompt
    files are written under OUTPUT_DIR/data.
    """
    from prefopt.atomic import write_jsonl
    from prefopt.iterate import IterateConfig, train_options

    loss = ["sigmoid"]
    tcfg = train_config(loss_type=loss, steps=settings.iterate_steps, lr=settings.dpo_lr,
                        batch=settings.iterate_batch, cache_dir=out / "cache", seed=settings.seed,
                        beta=settings.dpo_beta, warmup=max(1, settings.iterate_steps // 10))
    prompts_file = write_jsonl(out / "data" / "iterate_prompts.jsonl", [{"prompt": q} for q in prompts])
    eval_file = write_jsonl(out / "data" / "eval_prompts.jsonl", [{"prompt": q} for q in eval_prompts])
    cfg = IterateConfig(model=str(sft_dir), prompts=str(prompts_file), judge=JUDGE, output_dir=str(out / "iterate"),
                        rounds=settings.iterate_rounds, samples_per_prompt=settings.pair_samples,
                        eval_prompts=str(eval_file), eval_samples=settings.eval_samples,
                        max_new_tokens=settings.max_new_tokens, generation_batch_size=settings.gen_batch,
                        iterate_format=iterate_format, train=train_options(tcfg))
    return cfg, explicit_options(loss)


def iterative_dpo(out: Path, sft_dir: Path, prompts: list[str], eval_prompts: list[str],
                  settings: DemoSettings) -> list[dict[str, Any]]:
    """Run :func:`iterate_config`'s rounds from scratch; returns the records of rounds 0..R."""
    from prefopt.iterate import run_iterate

    cfg, explicit = iterate_config(out, sft_dir, prompts, eval_prompts, settings)
    return run_iterate(cfg, explicit, overwrite=True)


def _lengths(samples):
    import torch

    return torch.tensor([[len(s.token_ids) for s in row] for row in samples], dtype=torch.float64)


# ---------------------------------------------------------------------------- the demo


def prepare_dir(out: Path, settings: DemoSettings, overwrite: bool) -> None:
    """Use ``out`` for the demo; refuse to mix with anything else unless told to overwrite."""
    marker = out / "demo.json"
    wanted = {"prefopt_demo": dataclasses.asdict(settings)}
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        same = False
        if marker.is_file():
            try:
                same = json.loads(marker.read_text()) == wanted
            except (OSError, json.JSONDecodeError):
                same = False
        if not same and not overwrite:
            what = "a demo run with other settings" if marker.is_file() else "other files"
            raise ConfigError(f"--output-dir {out} already holds {what}; pass --overwrite to replace the demo's "
                              f"files there, or choose another directory")
        others = [p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES]
        if others and not marker.is_file():
            raise ConfigError(f"--output-dir {out} holds files that are not the demo's ({', '.join(others[:3])}); "
                              "choose an empty or new directory")
        for name in DEMO_ENTRIES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(wanted, indent=1))


def run_demo(output_dir: str | Path | None = None, *, quick: bool = False, overwrite: bool = False,
             console=None, settings: DemoSettings | None = None, threads: int | None = 1,
             iterative: bool = False) -> dict[str, Any]:
    """Run the demo and return its summary (also written to OUTPUT_DIR/summary.json).

    ``iterative`` adds a stage of iterative DPO (`prefopt iterate`, ``settings.iterate_rounds``
    rounds) after offline DPO, compared with it on the same prompts; it is optional because it
    takes the full demo past five minutes on a small CPU.

    ``threads`` sets torch's CPU threads for the run (None: leave them as they are). The
    demo's matrices are small (a few hundred columns), so splitting each product over
    threads saves little, and on a machine whose cores are busy with other work the
    threads wait on each other at every operation: one thread is the robust default.
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads: must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        return _run_demo(output_dir, quick=quick, overwrite=overwrite, console=console, settings=settings,
                         iterative=iterative)
    finally:
        torch.set_num_threads(previous)


def _run_demo(output_dir, *, quick: bool, overwrite: bool, console, settings: DemoSettings | None,
              iterative: bool) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from prefopt.atomic import write_json
    from prefopt.judges import load_judge
    from prefopt.plotting import plot_frontier, plot_rounds, plot_runs

    console = console or Console()
    settings = settings or (QUICK if quick else FULL)
    out = Path(output_dir or "prefopt-demo")
    prepare_dir(out, settings, overwrite)
    torch.manual_seed(settings.seed)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        times[name] = round(now - since, 1)
        console.print(f"[dim]{name}: {times[name]:.1f} s[/dim]")
        return now

    console.rule(f"prefopt demo ({'quick' if quick else 'full'}): controlled sentiment, miniature")
    splits = make_splits(settings)
    data = out / "data"
    data.mkdir(exist_ok=True)
    sft_data = data / "sft.jsonl"
    sft_data.write_text("".join(json.dumps(r) + "\n" for r in splits["sft_rows"]))
    unique_pair_prompts = len(splits["pair_prompts"]) // settings.pair_rounds
    console.print(f"corpus: {len(splits['corpus'])} reviews; SFT on {len(splits['sft_rows'])}; held out: "
                  f"{unique_pair_prompts} prompts for pairs (each sampled {settings.pair_rounds}x), "
                  f"{len(splits['eval_prompts'])} for evaluation")
    base = build_base(settings, splits["corpus"], out / "base")
    t = lap("tokenizer + model", t0)

    stages = 5 if iterative else 4
    console.print(f"[bold]1/{stages} SFT[/bold]: learn to write reviews")
    train_run(model=base, data=sft_data, output_dir=out / "sft", loss_type=["sft"], steps=settings.sft_steps,
              lr=settings.sft_lr, batch=settings.sft_batch, cache_dir=out / "cache", seed=settings.seed,
              warmup=max(1, settings.sft_steps // 20))
    sft_dir = out / "sft" / "final"
    t = lap("sft", t)

    judge = load_judge(JUDGE)
    console.print(f"[bold]2/{stages} pairs[/bold]: sample {settings.pair_samples} completions per prompt from the SFT "
                  "model, judge with VADER, keep best vs worst")
    pair_info = make_preference_pairs(sft_dir, splits["pair_prompts"], settings, judge, data / "pairs.jsonl",
                                      seed=settings.seed + 1)
    console.print(f"{pair_info['pairs']} pairs; mean reward gap chosen - rejected {pair_info['mean_score_gap']:.3f}")
    t = lap("sampling pairs", t)

    console.print(f"[bold]3/{stages} DPO[/bold]: beta={settings.dpo_beta}, reference = the SFT model")
    dpo_metrics = train_run(model=sft_dir, data=data / "pairs.jsonl", output_dir=out / "dpo", loss_type=["sigmoid"],
                            steps=settings.dpo_steps, lr=settings.dpo_lr, batch=settings.dpo_batch,
                            cache_dir=out / "cache", seed=settings.seed, beta=settings.dpo_beta,
                            warmup=max(1, settings.dpo_steps // 10))
    dpo_dir = out / "dpo" / "final"
    t = lap("dpo", t)

    console.print(f"[bold]4/{stages} evaluation[/bold]: sample from both policies on held-out prompts")
    sft_model, tok = load_model(sft_dir)
    dpo_model, _ = load_model(dpo_dir)
    prompts = splits["eval_prompts"]
    sft_eval = evaluate_policy(sft_model, sft_model, tok, prompts, judge, settings, seed=settings.seed + 2)
    dpo_eval = evaluate_policy(dpo_model, sft_model, tok, prompts, judge, settings, seed=settings.seed + 2,
                               ref_samples=sft_eval)
    t = lap("evaluation", t)

    rounds: list[dict[str, Any]] = []
    if iterative:
        console.print(f"[bold]5/{stages} iterative DPO[/bold]: {settings.iterate_rounds} rounds of sampling "
                      f"{settings.pair_samples} answers per prompt from the current policy, ranking them with VADER "
                      f"and training {settings.iterate_steps} steps on the K-answer rows (reference = the round's "
                      "start policy)")
        rounds = iterative_dpo(out, sft_dir, splits["pair_prompts"][:unique_pair_prompts], prompts, settings)
        t = lap("iterative dpo", t)

    s, d = sft_eval["stats"], dpo_eval["stats"]
    examples = []
    for i in range(min(4, len(prompts))):
        examples.append({"prompt": prompts[i], "sft": sft_eval["samples"][i][0].text,
                         "sft_reward": sft_eval["rewards"][i, 0].item(), "dpo": dpo_eval["samples"][i][0].text,
                         "dpo_reward": dpo_eval["rewards"][i, 0].item()})
    points = [
        {"method": "SFT (reference)", "label": "SFT", "kl": 0.0, "reward": s["policy_reward_mean"],
         "reward_stderr": s["policy_reward_stderr"], "kl_stderr": 0.0},
        {"method": f"DPO beta={settings.dpo_beta}", "label": "DPO", "kl": d["kl"], "reward": d["policy_reward_mean"],
         "reward_stderr": d["policy_reward_stderr"], "kl_stderr": d["kl_stderr"]},
    ] + [{"method": "iterative DPO", "label": f"round {r['round']}", "kl": r["kl"], "reward": r["reward_mean"],
          "reward_stderr": r["reward_stderr"], "kl_stderr": r["kl_stderr"]} for r in rounds if r["round"] > 0]
    summary: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "judge": "VADER compound score of prompt + completion, in [-1, 1]",
        "settings": dataclasses.asdict(settings),
        "sft": {"reward_mean": s["policy_reward_mean"], "reward_stderr": s["policy_reward_stderr"], "kl": 0.0,
                "mean_tokens": s["policy_mean_tokens"]},
        "dpo": {"reward_mean": d["policy_reward_mean"], "reward_stderr": d["policy_reward_stderr"], "kl": d["kl"],
                "kl_stderr": d["kl_stderr"], "win_rate_vs_sft": d["win_rate"],
                "win_rate_stderr": d["win_rate_stderr"], "mean_tokens": d["policy_mean_tokens"],
                "final_train_metrics": {k: v for k, v in dpo_metrics.items() if isinstance(v, (int, float))}},
        "reward_gain": d["policy_reward_mean"] - s["policy_reward_mean"],
        "pairs": pair_info,
        "eval_prompts": len(prompts),
        "eval_samples_per_prompt": settings.eval_samples,
        "points": points,
        "iterative": rounds or None,
        "examples": examples,
        "seconds": times,
    }
    charts = [str(p) for p in plot_runs([out / "sft", out / "dpo"], out / "plots")]
    charts.append(str(plot_frontier(points, out / "plots" / "frontier.png",
                                    title="Demo: reward vs KL from the SFT model", reward_label="mean VADER reward")))
    if rounds:
        charts.append(str(plot_rounds([out / "iterate"], out / "plots" / "rounds.png",
                                      reward_label="mean VADER reward")))
    summary["charts"] = charts
    times["total"] = round(time.perf_counter() - t0, 1)
    write_json(out / "summary.json", summary, indent=1, ensure_ascii=False)
    show(summary, console)
    console.print(f"wrote {out / 'summary.json'} and {len(charts)} charts under {out / 'plots'} "
                  f"({times['total']:.0f} s in all)")
    return summary


def show(summary: dict[str, Any], console) -> None:
    """The results table and a few generations before and after DPO."""
    from rich.table import Table
    from rich.text import Text

    s, d = summary["sft"], summary["dpo"]
    table = Table(title="Held-out prompts: VADER reward of sampled reviews (higher = more positive)")
    table.add_column("policy")
    table.add_column("reward", justify="right")
    table.add_column("KL(pi || SFT)", justify="right")
    table.add_column("win vs SFT", justify="right")
    table.add_column("tokens", justify="right")
    table.add_row("SFT (ref)", f"{s['reward_mean']:+.3f} ± {s['reward_stderr']:.3f}", "0", "-",
                  f"{s['mean_tokens']:.1f}")
    table.add_row("DPO", f"{d['reward_mean']:+.3f} ± {d['reward_stderr']:.3f}",
                  f"{d['kl']:.2f} ± {d['kl_stderr']:.2f}",
                  f"{d['win_rate_vs_sft']:.2f} ± {d['win_rate_stderr']:.2f}", f"{d['mean_tokens']:.1f}")
    for r in summary.get("iterative") or []:
        if r["round"] > 0:
            table.add_row(f"iterative DPO r{r['round']}", f"{r['reward_mean']:+.3f} ± {r['reward_stderr']:.3f}",
                          f"{r['kl']:.2f} ± {r['kl_stderr']:.2f}",
                          f"{r['win_rate_vs_sft']:.2f} ± {r['win_rate_stderr']:.2f}", f"{r['mean_tokens']:.1f}")
    console.print(table)
    ex = Table(title="Sample generations (prompt | SFT continuation | DPO continuation)", show_lines=True)
    ex.add_column("prompt", max_width=18)
    ex.add_column("SFT", ratio=1)
    ex.add_column("DPO", ratio=1)
    for e in summary["examples"]:
        ex.add_row(Text(e["prompt"]), Text(e["sft"]).append(f"  ({e['sft_reward']:+.2f})", style="dim"),
                   Text(e["dpo"]).append(f"  ({e['dpo_reward']:+.2f})", style="dim"))
    console.print(ex)
