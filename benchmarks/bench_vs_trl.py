"""prefopt vs TRL's DPOTrainer on the same model, data, settings and pairs, one process per run.

Every run is its own subprocess launched from here, so its peak RSS (``ru_maxrss`` of that
child, read with ``os.wait4``) and its wall time cover the whole training command: interpreter
start, imports, model load, tokenization, the reference (pass, cache or live model) and all
optimizer steps. CPU time (user + system) of the child is reported too: on a shared machine it
is the steadier of the two.

Both trainers: float32, AdamW (betas 0.9/0.999, eps 1e-8, no weight decay; TRL's default
fused kernel, prefopt's too), the same learning rate with linear decay and no warmup, gradient
clipping at 1.0, beta 0.1, sigmoid loss, batch 4 pairs, no accumulation, max length 512, no
shuffle, one pass over the same pairs in the same order, ``torch.set_num_threads(THREADS)``.
The token ids each trainer saw are hashed and compared.

Throughput counts, for both, ``len(prompt) + len(chosen) + len(prompt) + len(rejected)`` per
pair (see :func:`prefopt.batching.padded_token_count`) divided by the run's seconds.

Usage::

    python benchmarks/bench_vs_trl.py --workdir /tmp/prefopt-bench --trl-python /tmp/benchenv/bin/python \
        --pairs 200 --repeat 2 --ablation-pairs 48 --ablation-repeat 2

The model and pairs are built in WORKDIR by ``make_bench_data.py`` on the first run. Results go
to WORKDIR/results.json (``--results``) and are printed as Markdown tables; docs/benchmarks.md
holds a measured run.

``--trl-python`` is an interpreter with ``pip install -e '.[bench]'`` (TRL) done, ideally in its
own virtual environment; prefopt runs with the interpreter running this script.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ABLATIONS = [
    ("no reference cache", ["--no-ref-cache"]),
    ("no prefix sharing", ["--no-prefix-sharing"]),
    ("no packing", ["--no-packing"]),
    ("full LM head", ["--full-lm-head"]),
    ("no block attention", ["--no-block-attention"]),
    ("no lean activations", ["--no-lean-activations"]),
    ("last MLP on every row", ["--no-trim-last-layer"]),
]


def run_child(name: str, cmd: list[str], log_dir: Path, threads: int) -> dict:
    """Run one training command; return wall seconds, CPU seconds and peak RSS of that child."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    log = log_dir / f"{name.replace(' ', '_')}.log"
    print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {name} failed with exit code {proc.returncode}; see {log}")
    out = {"wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime,
           "peak_rss_bytes": usage.ru_maxrss * 1024, "log": str(log)}
    print(f"[bench] {name}: {wall:.1f} s wall, {out['cpu_seconds']:.1f} s CPU, "
          f"{out['peak_rss_bytes'] / 2**20:.0f} MiB peak RSS", flush=True)
    return out


def prefopt_cmd(py: str, model: str, data: str, steps: int, out: Path, cache: Path, a, extra: list[str]) -> list[str]:
    return [py, "-m", "prefopt.cli", "bench", "--model", model, "--data", data, "--steps", str(steps),
            "--batch-size", "4", "--grad-accum", "1", "--max-length", "512", "--max-prompt-length", "256",
            "--beta", str(a.beta), "--learning-rate", str(a.learning_rate), "--lr-scheduler", "linear",
            "--warmup-steps", "0", "--weight-decay", "0", "--max-grad-norm", "1.0", "--no-shuffle",
            "--dtype", "float32", "--num-threads", str(a.threads), "--cache-dir", str(cache),
            "--json", str(out), *extra]


def trl_cmd(py: str, model: str, data: str, steps: int, out: Path, a, precompute: bool) -> list[str]:
    return [py, str(HERE / "trl_dpo_run.py"), "--model", model, "--data", data, "--steps", str(steps),
            "--out", str(out), "--batch-size", "4", "--max-length", "512", "--beta", str(a.beta),
            "--learning-rate", str(a.learning_rate), "--max-grad-norm", "1.0", "--threads", str(a.threads),
            *(["--precompute"] if precompute else [])]


def measured(name: str, child: dict, result: dict) -> dict:
    row = {"name": name, **child, "tokens": result["tokens"], "pairs": result["pairs"], "steps": result["steps"],
           "token_digest": result["token_digest"], "losses": result["losses"],
           "train_seconds": result.get("train_seconds")}
    row["tokens_per_second"] = row["tokens"] / row["wall_seconds"]
    row["tokens_per_cpu_second"] = row["tokens"] / row["cpu_seconds"]
    return row


def run_set(label: str, model: str, data: str, steps: int, a, work: Path, with_trl: bool,
            ablations: bool, precompute: bool, repeat: int, extras: bool = False) -> list[dict]:
    runs = work / "runs" / label
    runs.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, list[str], Path, Path | None]] = []

    def add_prefopt(name: str, extra: list[str], reuse_cache_of: str | None = None):
        out = runs / f"{name.replace(' ', '_').replace(',', '')}.json"
        cache = runs / f"cache-{(reuse_cache_of or name).replace(' ', '_').replace(',', '')}"
        cmd = prefopt_cmd(a.prefopt_python, model, data, steps, out, cache, a, extra)
        plan.append((name, cmd, out, None if reuse_cache_of else cache))

    def add_trl(name: str, pre: bool):
        out = runs / f"{name.replace(' ', '_')}.json"
        plan.append((name, trl_cmd(a.trl_python, model, data, steps, out, a, pre), out, None))

    add_prefopt("prefopt", [])
    if with_trl:
        add_trl("TRL", False)
    if ablations:
        for name, flags in ABLATIONS:
            add_prefopt(f"prefopt, {name}", flags)
    if with_trl and precompute:
        add_trl("TRL precompute_ref_log_probs", True)
    if extras:
        # not the default configuration: what checkpointing trades, and a second run over the same data
        # (a resume, or a sweep over beta or the loss) that finds the reference log-probs in the cache
        add_prefopt("prefopt + gradient checkpointing", ["--gradient-checkpointing"])
        add_prefopt("prefopt, reference cache reused", [], reuse_cache_of="prefopt")
    rounds: dict[str, list[dict]] = {}
    for rnd in range(repeat):  # interleaved rounds: a noisy spell hits one round of every run, not one run
        for name, cmd, out, cache in plan:
            if cache is not None:  # emptied before every run: the reference pass is part of what is timed
                shutil.rmtree(cache, ignore_errors=True)
            child = run_child(f"{label}-{name}-round{rnd + 1}", cmd, runs, a.threads)
            rounds.setdefault(name, []).append(measured(name, child, json.loads(out.read_text())))
    rows = []
    for name, tries in rounds.items():
        # the same statistic for every run: fastest wall and CPU time, highest peak memory
        row = dict(min(tries, key=lambda r: r["wall_seconds"]))
        row["cpu_seconds"] = min(r["cpu_seconds"] for r in tries)
        row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in tries)
        row["tokens_per_cpu_second"] = row["tokens"] / row["cpu_seconds"]
        row["rounds"] = [{k: r[k] for k in ("wall_seconds", "cpu_seconds", "peak_rss_bytes")} for r in tries]
        rows.append(row)
    return rows


def fmt_table(rows: list[dict], base: str) -> str:
    ref = next(r for r in rows if r["name"] == base)
    lines = ["| run | wall s | tokens/s (wall) | CPU s | tokens/CPU-s | peak RSS MiB | speed vs " + base +
             " (wall / CPU) | memory vs " + base + " |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['wall_seconds']:.1f} | {r['tokens_per_second']:.0f} | {r['cpu_seconds']:.1f} | "
            f"{r['tokens_per_cpu_second']:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} | "
            f"{r['tokens_per_second'] / ref['tokens_per_second']:.2f}x / "
            f"{r['tokens_per_cpu_second'] / ref['tokens_per_cpu_second']:.2f}x | "
            f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}x |")
    return "\n".join(lines)


def fmt_ablation(rows: list[dict]) -> str:
    base = next(r for r in rows if r["name"] == "prefopt")
    lines = ["| switched off | wall s | CPU s | peak RSS MiB | default is faster by (wall / CPU) | "
             "memory vs default |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["name"].startswith("prefopt, "):
            continue
        lines.append(f"| {r['name'].removeprefix('prefopt, ')} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['wall_seconds'] / base['wall_seconds']:.2f}x / "
                     f"{r['cpu_seconds'] / base['cpu_seconds']:.2f}x | "
                     f"{r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x |")
    return "\n".join(lines)


def loss_report(rows: list[dict]) -> dict:
    base = next(r for r in rows if r["name"] == "prefopt")
    out = {}
    for r in rows:
        if r is base or not r["name"].startswith("TRL"):
            continue
        n = min(len(r["losses"]), len(base["losses"]))
        diffs = [abs(x - y) for x, y in zip(base["losses"][:n], r["losses"][:n])]
        out[r["name"]] = {"steps": n, "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / n,
                          "same_tokens": r["token_digest"] == base["token_digest"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="prefopt vs TRL DPOTrainer on a 2-core CPU")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prefopt-bench"))
    ap.add_argument("--pairs", type=int, default=200, help="pairs in the main comparison (one pass, batch 4)")
    ap.add_argument("--ablation-pairs", type=int, default=48, help="pairs in the ablation runs (0: skip them)")
    ap.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", "/tmp/benchenv/bin/python"))
    ap.add_argument("--prefopt-python", default=sys.executable)
    ap.add_argument("--results", type=Path, default=None, help="where to write the JSON (default WORKDIR/results.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved rounds of the main runs (best wall time kept)")
    ap.add_argument("--ablation-repeat", type=int, default=2, help="interleaved rounds of the ablation runs")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip the gradient-checkpointing and cache-reuse runs of the main comparison")
    ap.add_argument("--no-precompute", action="store_true", help="skip the TRL precompute_ref_log_probs run")
    a = ap.parse_args()

    import torch

    from make_bench_data import build

    work = a.workdir
    if not (work / "info.json").exists():
        build(work, pairs=max(a.pairs, a.ablation_pairs))
    info = json.loads((work / "info.json").read_text())
    lines = (work / "pairs.jsonl").read_text().splitlines()
    if len(lines) < max(a.pairs, a.ablation_pairs):
        raise SystemExit(f"{work} holds {len(lines)} pairs; remove it to rebuild with more")
    main_data = work / f"pairs-{a.pairs}.jsonl"
    main_data.write_text("\n".join(lines[:a.pairs]) + "\n")
    steps = -(-a.pairs // 4)

    result: dict = {"model": info, "threads": a.threads, "repeat": a.repeat, "ablation_repeat": a.ablation_repeat,
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "pairs": a.pairs, "steps": steps, "learning_rate": a.learning_rate, "beta": a.beta}
    rows = run_set("main", info["model"], str(main_data), steps, a, work, with_trl=True, ablations=False,
                   precompute=not a.no_precompute, repeat=a.repeat, extras=not a.no_extras)
    result["main"] = rows
    result["losses"] = loss_report(rows)
    if a.ablation_pairs:
        abl_data = work / f"pairs-{a.ablation_pairs}.jsonl"
        abl_data.write_text("\n".join(lines[:a.ablation_pairs]) + "\n")
        result["ablation_pairs"] = a.ablation_pairs
        result["ablation"] = run_set("ablation", info["model"], str(abl_data), -(-a.ablation_pairs // 4), a, work,
                                     with_trl=True, ablations=True, precompute=False, repeat=a.ablation_repeat)
    results = a.results or work / "results.json"
    results.write_text(json.dumps(result, indent=1) + "\n")

    print("\n## prefopt vs TRL (one pass over %d pairs, %d steps)\n" % (a.pairs, steps))
    print(fmt_table(rows, "TRL"))
    print("\n## losses per step\n")
    base = next(r for r in rows if r["name"] == "prefopt")
    for r in rows:
        if r["name"].startswith("TRL"):
            print(f"{r['name']}: {json.dumps(result['losses'][r['name']])}")
    print("prefopt:", " ".join(f"{x:.4f}" for x in base["losses"]))
    for r in rows:
        if r["name"].startswith("TRL"):
            print(f"{r['name']}:", " ".join(f"{x:.4f}" for x in r["losses"]))
    if a.ablation_pairs:
        print("\n## ablations (%d pairs)\n" % a.ablation_pairs)
        print(fmt_table(result["ablation"], "TRL"))
        print()
        print(fmt_ablation(result["ablation"]))
    print(f"\nresults: {results}")


if __name__ == "__main__":
    main()
