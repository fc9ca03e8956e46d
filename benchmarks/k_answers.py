"""K answers per prompt: grouped K-answer rows against the same preferences expanded into pairs.

Three ways of training on the same preferences (K answers per prompt with distinct scores, so
every prompt yields K(K-1)/2 pairs):

* **(a)** the K-answer rows themselves (format ``ranked``), ``k_pairing="all"`` and
  ``k_weighting="pair"``: one segment ``[prompt | a_1 | ... | a_K]`` per prompt, and the step's
  loss is the mean over its derived pairs -- the objective of (b);
* **(b)** the same data expanded into pair rows (every pair of unequal score, chosen = the higher
  score) with ``group_by_prompt=False``: each pair is its own segment ``[prompt | chosen |
  rejected]``, the prompt computed once per pair (what TRL computes twice);
* **(c)** the expanded pairs with ``group_by_prompt=True``: a prompt's pair rows go into one
  micro-batch and one segment, and an answer repeated among them goes through the decoder once
  (the LM head still scores it once per pair row, from the first copy's hidden states).

All three run ``prefopt.train.train`` for one epoch (no shuffle, the same prompts in the same
steps: a step of (a) holds ``--prompts-per-step`` prompts, a step of (b) and (c) their pairs),
each in its own subprocess, repeats interleaved (a, b, c, a, b, c). Per run:

* **reference pass** -- the cached reference log-probs are computed inside ``train`` (it logs
  "reference log-probs: computed and cached"); the child times that call
  (``prefopt.reference.CachedReference.build``: collation, the no-grad forwards, writing the
  cache file) and counts the batches it consumes. The cache is emptied before every run.
* **training** -- the optimizer steps, timed by :class:`prefopt.benchmarking.BenchHooks`
  (forward, backward, clipping, AdamW; the first step included, and "steady" without it).
* **peak RSS** -- ``ru_maxrss`` of the child process (``os.wait4``, see ``bench_vs_trl.py``):
  the whole run, reference pass included; also the peak so far when the reference pass starts and
  when the steps start, and the steps' own: the RSS sampled every 10 ms during them, after the heap's
  free memory is handed back (``malloc_trim``) as they start.

Throughput counts, for all three, the tokens of the expanded-pair equivalent:
:func:`prefopt.batching.padded_token_count` of every pair (prompt once per completion), so a
layout that computes less shows as more tokens/s. Beside each measured speed ratio (a/b, c/b)
stands the ideal one from what the layouts compute: ``real_tokens`` of (b)'s batches over
those of (a)'s or (c)'s (and, for information, the same ratio of model FLOPs,
:func:`prefopt.benchmarking.forward_flops`, which weighs the LM head and attention as well).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/k_answers.py --workdir /tmp/kbench \\
        --results benchmarks/results/k-answers-cpu-2core.json

The tokenizer is ``make_bench_data.py``'s (built in WORKDIR on the first run, with its ~27M model);
the default model is a smaller Llama with random weights (hidden 256, 4 layers, 4 heads, MLP 688,
vocabulary 8192, ~7.4M parameters) so that the three default rounds take ~7 minutes on two cores;
``--model bench`` trains the ~27M one instead.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RUNS = {
    "a": "(a) K-answer rows, grouped",
    "b": "(b) expanded pairs, no grouping",
    "c": "(c) expanded pairs, group_by_prompt",
}


# ---------------------------------------------------------------------------- data


def make_ranked_rows(tokenizer, prompts: int, k: int = 4, prompt_tokens: tuple[int, int] = (100, 400),
                     answer_tokens: tuple[int, int] = (30, 120), seed: int = 0) -> list[dict]:
    """``{"prompt", "completions": [K answers], "scores": [K distinct numbers]}`` rows, lengths in tokens
    drawn uniformly from the ranges (the prompt's includes its " Answer:" tail), text from
    ``make_bench_data.TextMaker``; higher-scored answers carry GOOD words, lower-scored BAD ones."""
    from make_bench_data import BAD, GOOD, TextMaker

    maker = TextMaker(seed)
    rng = random.Random(seed + 2)
    tail = len(tokenizer(" Answer:", add_special_tokens=False)["input_ids"])
    rows = []
    for _ in range(prompts):
        prompt = maker.text_of_tokens(tokenizer, max(1, rng.randint(*prompt_tokens) - tail)) + " Answer:"
        scores = rng.sample(range(k), k)  # distinct: every pair of answers is a preference
        answers = [maker.text_of_tokens(tokenizer, rng.randint(*answer_tokens), GOOD if s >= k / 2 else BAD,
                                        lead_space=True) for s in scores]
        rows.append({"prompt": prompt, "completions": answers, "scores": [float(s) for s in scores]})
    return rows


def expand_pairs(rows: list[dict]) -> list[dict]:
    """Every pair of unequal score of every row as a prompt/chosen/rejected row, a prompt's pairs adjacent."""
    out = []
    for row in rows:
        c, s = row["completions"], row["scores"]
        for i in range(len(c)):
            for j in range(i + 1, len(c)):
                if s[i] == s[j]:
                    continue
                hi, lo = (i, j) if s[i] > s[j] else (j, i)
                out.append({"prompt": row["prompt"], "chosen": c[hi], "rejected": c[lo]})
    return out


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def small_model(workdir: Path, tokenizer_dir: str) -> str:
    """A Llama of hidden 256, 4 layers, 4 heads, MLP 688 with the bench tokenizer (random weights)."""
    from transformers import AutoTokenizer

    from prefopt.tiny import build_llama, save_tiny

    path = workdir / "model-small"
    if not (path / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = build_llama(tok, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688,
                            max_position_embeddings=1024, seed=0)
        save_tiny(model, tok, path)
    return str(path)


# ---------------------------------------------------------------------------- one run (the child)


def pair_tokens(example, pairing: str) -> int:
    """Tokens of ``example`` counted as its expanded pairs (padded_token_count of each pair)."""
    import torch

    from prefopt.batching import padded_token_count
    from prefopt.data.tokenize import TokenizedExample
    from prefopt.losses import derive_pairs

    if example.scores is None:
        return padded_token_count(example)
    scores = torch.tensor([example.scores], dtype=torch.float32)
    valid = ~torch.isnan(scores)
    kp = derive_pairs(scores.nan_to_num(0.0), valid, pairing)
    return sum(padded_token_count(TokenizedExample(example.prompt_ids, [example.completions[i], example.completions[j]],
                                                   example.index, example.line))
               for i, j in zip(kp.chosen.tolist(), kp.rejected.tolist()))


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """The highest resident set size seen every ``interval`` seconds while running (ru_maxrss cannot
    tell the training steps' own peak once an earlier stage went higher)."""

    def __init__(self, interval: float = 0.01):
        import threading

        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval)

    def start(self) -> None:
        self.peak = current_rss_bytes()
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
        return self.peak


def trim_heap() -> bool:
    """Hand the heap's free memory back to the kernel (glibc ``malloc_trim``), so that what the steps hold
    shows in the RSS sampled during them instead of what the reference pass freed (prefopt's CPU tunings
    keep up to 512 MiB of freed heap mapped, see :func:`prefopt.runtime.keep_freed_memory`)."""
    import ctypes

    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _hooks_class():
    from prefopt.benchmarking import BenchHooks, peak_rss_bytes
    from prefopt.train import loss_units

    @dataclass
    class KHooks(BenchHooks):
        """BenchHooks that also record, per step, the pair-equivalent tokens and the loss units."""

        cfg: object = None
        pair_tokens: list = field(default_factory=list)
        steps: list = field(default_factory=list)

        def on_train_start(self, *, policy, reference, data, steps, device, fast_paths=None) -> None:
            self.peak_rss_at_start = peak_rss_bytes()  # after the fast-path check and the reference pass
            self.pair_tokens = [pair_tokens(ex, self.cfg.k_pairing) for ex in data.train]  # before the clock starts
            self.truncated = sum(bool(ex.truncated) for ex in data.train)
            self.trimmed = trim_heap()
            self.sampler = RssSampler()
            self.sampler.start()
            super().on_train_start(policy=policy, reference=reference, data=data, steps=steps, device=device,
                                   fast_paths=fast_paths)

        def on_step(self, step, micro, metrics) -> None:
            super().on_step(step, micro, metrics)
            rec = self.records[-1]
            self.steps.append({"step": step, "seconds": rec.seconds, "examples": len(rec.example_index),
                               "pair_tokens": sum(self.pair_tokens[i] for i in rec.example_index),
                               "real_tokens": rec.real_tokens, "slots": rec.slots, "rows": len(micro),
                               "flops": rec.flops, "loss_units": sum(loss_units(b, self.cfg) for b in micro),
                               "loss": rec.loss})
            self._last = time.perf_counter()  # the bookkeeping above is not training time

    return KHooks


def measure(spec: dict) -> dict:
    """Train once as ``spec["config"]`` (TrainConfig fields) says; time the reference pass and the steps."""
    import prefopt.train as T
    from prefopt.benchmarking import ModelShape, forward_flops, peak_rss_bytes
    from prefopt.config import TrainConfig
    from prefopt.reference import CachedReference

    cfg = TrainConfig(**spec["config"])
    ref = {"seconds": 0.0, "real_tokens": 0, "slots": 0, "batches": 0, "flops": 0.0, "examples": 0, "calls": 0}
    shape: dict = {}
    original_table, original_build = T.reference_table, CachedReference.build.__func__

    def reference_table(run, model, *args, **kwargs):
        shape["model"] = ModelShape.of(run.base_model)
        ref["peak_rss_before_bytes"] = peak_rss_bytes()
        return original_table(run, model, *args, **kwargs)

    def build(cls, model, batches, *args, **kwargs):
        excluded = 0.0

        def counted():
            nonlocal excluded
            for b in batches:
                t = time.perf_counter()
                ref["batches"] += 1
                ref["real_tokens"] += b.real_tokens
                ref["slots"] += b.slots
                ref["examples"] += b.num_examples
                ref["flops"] += forward_flops(shape["model"], b)
                excluded += time.perf_counter() - t
                yield b

        start = time.perf_counter()
        out = original_build(cls, model, counted(), *args, **kwargs)
        ref["seconds"] += time.perf_counter() - start - excluded
        ref["calls"] += 1
        ref["hit"] = bool(out[1])
        return out

    hooks = _hooks_class()(cfg=cfg)
    T.reference_table, CachedReference.build = reference_table, classmethod(build)
    try:
        start = time.perf_counter()
        T.train(cfg, hooks=hooks)
        total = time.perf_counter() - start
    finally:
        if getattr(hooks, "sampler", None) is not None:
            hooks.sampler.stop()
        T.reference_table, CachedReference.build = original_table, classmethod(original_build)
    if ref.get("hit", True) or ref["calls"] != 1:
        raise RuntimeError(f"expected one computed reference pass, got {ref}")
    ref["pair_tokens"] = sum(hooks.pair_tokens)
    steps = hooks.steps
    return {"steps": steps, "reference": ref, "train_seconds": sum(s["seconds"] for s in steps),
            "steady_seconds": sum(s["seconds"] for s in steps[1:]), "setup_seconds": hooks.train_start - start,
            "in_process_seconds": total, "examples": len(hooks.pair_tokens), "truncated": hooks.truncated,
            "fast_paths": hooks.fast_paths.describe() if hooks.fast_paths is not None else None,
            "peak_rss_before_reference_bytes": ref.pop("peak_rss_before_bytes"),
            "peak_rss_before_training_bytes": hooks.peak_rss_at_start, "training_peak_rss_bytes": hooks.sampler.peak,
            "heap_trimmed_before_steps": hooks.trimmed,
            "self_peak_rss_bytes": peak_rss_bytes()}


def child_main(spec_path: str) -> int:
    from prefopt.runtime import cpu_tunings

    cpu_tunings()  # as `prefopt train` does, before torch allocates
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    result = measure(spec)
    Path(spec["out"]).write_text(json.dumps(result) + "\n")
    return 0


# ---------------------------------------------------------------------------- the comparison (the parent)


def run_configs(ranked: Path, pairs: Path, model: str, work: Path, prompts_per_step: int, pairs_per_prompt: int,
                learning_rate: float, seed: int) -> dict[str, dict]:
    common = dict(model=model, dtype="float32", learning_rate=learning_rate, lr_scheduler="linear", warmup_steps=0,
                  weight_decay=0.0, max_grad_norm=1.0, beta=0.1, loss_type=["sigmoid"], grad_accum=1, epochs=1.0,
                  shuffle=False, seed=seed, max_length=1024, max_prompt_length=512, save_steps=None,
                  logging_steps=1, progress=False, overwrite=True, k_pairing="all", k_weighting="pair")
    per_step = prompts_per_step * pairs_per_prompt
    # the reference pass: 4 steps' worth of preferences per batch for all three (prefopt's default, 4 x batch)
    return {
        "a": dict(common, data=str(ranked), batch_size=prompts_per_step, eval_batch_size=4 * prompts_per_step,
                  group_by_prompt=True),
        "b": dict(common, data=str(pairs), batch_size=per_step, eval_batch_size=4 * per_step, group_by_prompt=False),
        "c": dict(common, data=str(pairs), batch_size=per_step, eval_batch_size=4 * per_step, group_by_prompt=True),
    }


def one_run(key: str, config: dict, work: Path, rnd: int, threads: int, isolate: bool) -> dict:
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    cache, out_dir = runs / f"cache-{key}", runs / f"out-{key}"
    shutil.rmtree(cache, ignore_errors=True)  # emptied before every run: the reference pass is computed
    config = dict(config, cache_dir=str(cache), output_dir=str(out_dir))
    spec = {"config": config, "threads": threads, "out": str(runs / f"{key}-round{rnd}.json")}
    if not isolate:  # in this process (the smoke test): no peak RSS of its own
        result = measure(spec)
        result.update(wall_seconds=result["in_process_seconds"], cpu_seconds=None, peak_rss_bytes=None)
        return result
    from bench_vs_trl import run_child

    spec_path = runs / f"{key}-round{rnd}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    child = run_child(f"k-answers-{key}-round{rnd}", [sys.executable, str(Path(__file__).resolve()), "--child",
                                                      str(spec_path)], runs, threads)
    result = json.loads(Path(spec["out"]).read_text())
    result.update(child)
    return result


def summarize(key: str, tries: list[dict]) -> dict:
    """The same rule for every run: fastest reference pass and fastest training, highest peak RSS."""
    first = tries[0]
    steps = first["steps"]
    best_train = min(tries, key=lambda r: r["train_seconds"])
    best_ref = min(tries, key=lambda r: r["reference"]["seconds"])
    rss = [r["peak_rss_bytes"] for r in tries if r["peak_rss_bytes"] is not None]
    tokens = sum(s["pair_tokens"] for s in steps)
    steady_tokens = sum(s["pair_tokens"] for s in steps[1:]) or tokens
    return {
        "key": key, "name": RUNS[key], "rounds": len(tries), "examples": first["examples"], "steps": len(steps),
        "truncated": first["truncated"], "fast_paths": first["fast_paths"],
        "examples_per_step": [s["examples"] for s in steps], "loss_units": [s["loss_units"] for s in steps],
        "losses": [s["loss"] for s in steps],
        "pair_tokens": tokens, "real_tokens": sum(s["real_tokens"] for s in steps),
        "slots": sum(s["slots"] for s in steps), "flops": sum(s["flops"] for s in steps),
        "train_seconds": best_train["train_seconds"], "tokens_per_second": tokens / best_train["train_seconds"],
        "steady_tokens_per_second": steady_tokens / (best_train["steady_seconds"] or best_train["train_seconds"]),
        "median_step_seconds": sorted(s["seconds"] for s in best_train["steps"])[len(steps) // 2],
        "reference": {**{k: first["reference"][k] for k in ("real_tokens", "slots", "batches", "examples", "flops",
                                                             "pair_tokens")},
                      "seconds": best_ref["reference"]["seconds"],
                      "tokens_per_second": first["reference"]["pair_tokens"] / best_ref["reference"]["seconds"]},
        "peak_rss_bytes": max(rss) if rss else None,
        "peak_rss_before_reference_bytes": max(r["peak_rss_before_reference_bytes"] for r in tries),
        "peak_rss_before_training_bytes": max(r["peak_rss_before_training_bytes"] for r in tries),
        "training_peak_rss_bytes": max(r["training_peak_rss_bytes"] for r in tries),
        "per_round": [{"train_seconds": r["train_seconds"], "reference_seconds": r["reference"]["seconds"],
                       "setup_seconds": r["setup_seconds"], "wall_seconds": r["wall_seconds"],
                       "cpu_seconds": r["cpu_seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                       "peak_rss_before_reference_bytes": r["peak_rss_before_reference_bytes"],
                       "peak_rss_before_training_bytes": r["peak_rss_before_training_bytes"],
                       "training_peak_rss_bytes": r["training_peak_rss_bytes"],
                       "step_seconds": [s["seconds"] for s in r["steps"]]} for r in tries],
    }


def ratios(rows: dict[str, dict]) -> dict:
    """Measured speed ratios x/b (tokens/s, the same tokens for all) beside the ideal ones (b's work / x's)."""
    b = rows["b"]
    out = {}
    for key in ("a", "c"):
        x = rows[key]
        out[f"{key}/b"] = {
            "reference_measured": x["reference"]["tokens_per_second"] / b["reference"]["tokens_per_second"],
            "reference_ideal_tokens": b["reference"]["real_tokens"] / x["reference"]["real_tokens"],
            "reference_ideal_flops": b["reference"]["flops"] / x["reference"]["flops"],
            "train_measured": x["tokens_per_second"] / b["tokens_per_second"],
            "train_steady_measured": x["steady_tokens_per_second"] / b["steady_tokens_per_second"],
            "train_ideal_tokens": b["real_tokens"] / x["real_tokens"],
            "train_ideal_flops": b["flops"] / x["flops"],
            "memory": (x["peak_rss_bytes"] / b["peak_rss_bytes"]) if x["peak_rss_bytes"] and b["peak_rss_bytes"]
            else None,
            "memory_steps": x["training_peak_rss_bytes"] / b["training_peak_rss_bytes"],
            # round by round (the same tokens in every run, so the ratio of seconds)
            "train_measured_rounds": [rb["train_seconds"] / rx["train_seconds"]
                                      for rx, rb in zip(x["per_round"], b["per_round"])],
            "reference_measured_rounds": [rb["reference_seconds"] / rx["reference_seconds"]
                                          for rx, rb in zip(x["per_round"], b["per_round"])],
        }
    return out


def checks(rows: dict[str, dict], per_step: int) -> dict:
    """The three runs train the same preferences with the same objective, step by step."""
    units = {k: r["loss_units"] for k, r in rows.items()}
    steps = {k: r["steps"] for k, r in rows.items()}
    pair_tokens = {k: r["pair_tokens"] for k, r in rows.items()}
    n = min(len(r["losses"]) for r in rows.values())
    diff = max((abs(x - y) for k in ("a", "c") for x, y in zip(rows[k]["losses"][:n], rows["b"]["losses"][:n])),
               default=0.0)
    return {
        "same_steps": len(set(steps.values())) == 1,
        "same_pair_tokens": len(set(pair_tokens.values())) == 1,
        "same_loss_units_per_step": units["a"] == units["b"] == units["c"],
        "loss_units_per_step": units["b"],
        "full_steps_have_pairs": all(u == per_step for u in units["b"][:-1]),
        "max_abs_loss_diff_vs_b": diff,
        "truncated_examples": {k: r["truncated"] for k, r in rows.items()},
    }


def tables(rows: dict[str, dict], rat: dict) -> dict[str, str]:
    def ratio(key: str, field: str) -> str:
        value = 1.0 if key == "b" else rat[f"{key}/b"][field]
        return "-" if value is None else f"{value:.2f}x"

    def mib(n: int | None) -> str:
        return "-" if n is None else f"{n / 2**20:,.0f}"

    ref = ["| run | batches | tokens computed | pair-equivalent tokens | seconds | tokens/s | speed vs (b) | "
           "ideal (tokens) | ideal (FLOPs) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    train = ["| run | steps | examples/step | tokens computed | pair-equivalent tokens | train s | tokens/s | "
             "steady tokens/s | speed vs (b) | ideal (tokens) | ideal (FLOPs) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    memory = ["| run | peak RSS MiB (child) | before the reference pass | before the steps | during the steps "
              "(sampled) | child vs (b) | steps vs (b) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in rows.items():
        f = r["reference"]
        ref.append(f"| {r['name']} | {f['batches']} | {f['real_tokens']:,} | {f['pair_tokens']:,} | "
                   f"{f['seconds']:.1f} | {f['tokens_per_second']:,.0f} | {ratio(key, 'reference_measured')} | "
                   f"{ratio(key, 'reference_ideal_tokens')} | {ratio(key, 'reference_ideal_flops')} |")
        train.append(f"| {r['name']} | {r['steps']} | {max(r['examples_per_step'])} | {r['real_tokens']:,} | "
                     f"{r['pair_tokens']:,} | {r['train_seconds']:.1f} | {r['tokens_per_second']:,.0f} | "
                     f"{r['steady_tokens_per_second']:,.0f} | {ratio(key, 'train_measured')} | "
                     f"{ratio(key, 'train_ideal_tokens')} | {ratio(key, 'train_ideal_flops')} |")
        memory.append(f"| {r['name']} | {mib(r['peak_rss_bytes'])} | {mib(r['peak_rss_before_reference_bytes'])} | "
                      f"{mib(r['peak_rss_before_training_bytes'])} | {mib(r['training_peak_rss_bytes'])} | "
                      f"{ratio(key, 'memory')} | {ratio(key, 'memory_steps')} |")
    return {"reference": "\n".join(ref), "training": "\n".join(train), "memory": "\n".join(memory)}


def run_benchmark(model: str, work: Path, rows: list[dict], *, prompts_per_step: int = 2, repeat: int = 2,
                  threads: int = 1, isolate: bool = True, learning_rate: float = 1e-5, seed: int = 0,
                  out=print) -> dict:
    """Write the K-answer rows and their pairs to ``work``, run (a), (b), (c) ``repeat`` times interleaved,
    and return the summary: per-run rows, the ratios, the checks and the Markdown tables (also printed)."""
    work.mkdir(parents=True, exist_ok=True)
    ks = {len(r["completions"]) for r in rows}
    pairs_rows = expand_pairs(rows)
    if len(ks) != 1 or len(pairs_rows) != len(rows) * (k := ks.pop()) * (k - 1) // 2:
        raise ValueError("every row needs the same K answers with distinct scores")
    ranked = write_jsonl(rows, work / "ranked.jsonl")
    pairs = write_jsonl(pairs_rows, work / "pairs-expanded.jsonl")
    configs = run_configs(ranked, pairs, model, work, prompts_per_step, k * (k - 1) // 2, learning_rate, seed)
    tries: dict[str, list[dict]] = {key: [] for key in RUNS}
    for rnd in range(1, repeat + 1):  # interleaved: a noisy spell hits one round of every run, not one run
        for key in RUNS:
            out(f"[k-answers] round {rnd}/{repeat}: {RUNS[key]}")
            tries[key].append(one_run(key, configs[key], work, rnd, threads, isolate))
    summary = {key: summarize(key, t) for key, t in tries.items()}
    rat = ratios(summary)
    result = {"prompts": len(rows), "k": k, "pairs": len(pairs_rows), "prompts_per_step": prompts_per_step,
              "pairs_per_step": prompts_per_step * k * (k - 1) // 2, "repeat": repeat, "threads": threads,
              "isolated": isolate, "configs": {key: {n: v for n, v in c.items() if n not in ("model", "data")}
                                               for key, c in configs.items()},
              "runs": summary, "ratios": rat, "checks": checks(summary, prompts_per_step * k * (k - 1) // 2)}
    result["tables"] = tables(summary, rat)
    out(f"\n## K answers per prompt: {len(rows)} prompts x {k} answers = {len(pairs_rows)} pairs, "
        f"{summary['b']['steps']} steps of {prompts_per_step} prompts / {result['pairs_per_step']} pairs\n")
    out("### Reference pass (no grad, cached)\n")
    out(result["tables"]["reference"])
    out("\n### Training (one epoch)\n")
    out(result["tables"]["training"])
    for key in ("a", "c"):
        r = result["ratios"][f"{key}/b"]
        out(f"\n{key}/b round by round: training " + ", ".join(f"{v:.2f}x" for v in r["train_measured_rounds"])
            + "; reference pass " + ", ".join(f"{v:.2f}x" for v in r["reference_measured_rounds"]))
    out("\n### Memory (resident set size; the highest of the rounds)\n")
    out(result["tables"]["memory"])
    c = result["checks"]
    out(f"\nchecks: same steps {c['same_steps']}, same pair-equivalent tokens {c['same_pair_tokens']}, "
        f"same loss units per step {c['same_loss_units_per_step']} ({c['loss_units_per_step'][:3]}...), "
        f"max |loss - loss(b)| over the steps {c['max_abs_loss_diff_vs_b']:.2e}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kbench"))
    ap.add_argument("--results", type=Path, default=None, help="JSON results (default WORKDIR/k-answers.json)")
    ap.add_argument("--model", choices=("bench", "small"), default="small",
                    help="small (default): hidden 256, 4 layers, make_bench_data.py's tokenizer; bench: its ~27M "
                         "Llama (about 3x the time: two rounds take ~18 minutes on 2 cores)")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, nargs=2, default=(100, 400))
    ap.add_argument("--answer-tokens", type=int, nargs=2, default=(30, 120))
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds (a, b, c, a, b, c, ...)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.child:
        return child_main(a.child)

    import torch
    from transformers import AutoTokenizer

    from make_bench_data import build

    started, load_start = time.perf_counter(), os.getloadavg()
    work = a.workdir
    if not (work / "info.json").exists():
        build(work, pairs=4)  # the model and tokenizer (its own pairs are not used)
    info = json.loads((work / "info.json").read_text())
    model = info["model"] if a.model == "bench" else small_model(work, info["model"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = make_ranked_rows(tokenizer, a.prompts, a.k, tuple(a.prompt_tokens), tuple(a.answer_tokens), a.seed)
    result = run_benchmark(model, work, rows, prompts_per_step=a.prompts_per_step, repeat=a.repeat, threads=a.threads,
                           learning_rate=a.learning_rate, seed=a.seed)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    result["machine"] = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": a.threads,
                         "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    result["model"] = {"path": model, "kind": a.model, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
                       "vocab": config.vocab_size}
    result["data"] = {"prompt_tokens": list(a.prompt_tokens), "answer_tokens": list(a.answer_tokens), "seed": a.seed}
    result["seconds"] = time.perf_counter() - started
    results = a.results or work / "k-answers.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {results} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
