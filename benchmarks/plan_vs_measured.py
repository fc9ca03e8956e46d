"""Compare `prefopt plan`'s peak-memory estimate with the peak RSS of real CPU training runs.

Each configuration runs `prefopt train` for a few optimizer steps in a fresh subprocess. The
child imports everything the run needs (prefopt.train, torch, transformers, accelerate, peft),
records its RSS then (the *baseline*: interpreter, libraries, allocator arenas; no tensor
exists yet), trains, and reports ``ru_maxrss``. ``measured = peak RSS - baseline`` is what the
run itself allocated, which is what the plan estimates (the baseline is a fixed cost of the
host process that a GPU's memory does not pay; it is printed alongside). The estimate is
computed in this parent process with ``prefopt.plan`` (``host=True``: CPU training, so
reading the checkpoint at load time counts) from the model's config.json and the tokenized
data, with no per-configuration fitting.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/plan_vs_measured.py [--workdir DIR] [--jobs 1] [--steps 2]``
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so", "pe", "da", "gu", "ri", "zo", "be", "fa", "ho"]

# name, hidden, layers, intermediate, heads, vocab, batch, dtype, lora_r, checkpointing
CONFIGS = [
    ("runtime (h32-L1-v2k)", 32, 1, 64, 4, 2048, 2, "float32", 0, False),
    ("h256-L4-v8k-b2-fp32", 256, 4, 688, 4, 8192, 2, "float32", 0, False),
    ("h256-L4-v8k-b8-fp32", 256, 4, 688, 4, 8192, 8, "float32", 0, False),
    ("h512-L4-v16k-b2-fp32", 512, 4, 1376, 8, 16384, 2, "float32", 0, False),
    ("h512-L4-v16k-b2-fp32-ckpt", 512, 4, 1376, 8, 16384, 2, "float32", 0, True),
    ("h512-L4-v16k-b2-fp32-lora", 512, 4, 1376, 8, 16384, 2, "float32", 16, False),
    ("h256-L8-v32k-b2-fp32", 256, 8, 688, 4, 32000, 2, "float32", 0, False),
    ("h256-L8-v32k-b8-fp32-ckpt", 256, 8, 688, 4, 32000, 8, "float32", 0, True),
    ("h256-L4-v8k-b2-bf16", 256, 4, 688, 4, 8192, 2, "bfloat16", 0, False),
    ("h256-L4-v8k-b2-bf16-lora", 256, 4, 688, 4, 8192, 2, "bfloat16", 16, False),
    # "-long": longer pairs (rows of ~850 tokens), where activations are a large share of the peak
    ("h512-L4-v16k-b2-fp32-long", 512, 4, 1376, 8, 16384, 2, "float32", 0, False),
    ("h512-L4-v16k-b2-fp32-ckpt-long", 512, 4, 1376, 8, 16384, 2, "float32", 0, True),
    ("h512-L4-v16k-b2-fp32-lora-long", 512, 4, 1376, 8, 16384, 2, "float32", 16, False),
]

CHILD = r"""
import json, os, resource, sys, threading, time
PAGE = os.sysconf('SC_PAGE_SIZE')
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * PAGE
def anon():  # resident minus file-backed/shared pages: the process's own allocations
    f = open('/proc/self/statm').read().split()
    return (int(f[1]) - int(f[2])) * PAGE
peak_anon = [0]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], anon())
        time.sleep(0.002)
from prefopt.runtime import keep_freed_memory, malloc_for_blas_buffers
keep_freed_memory(); malloc_for_blas_buffers()
import torch, transformers, accelerate, peft, safetensors
import prefopt.train, prefopt.cli
base, base_anon = rss(), anon()
threading.Thread(target=sample, daemon=True).start()
rc = prefopt.cli.main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak_anon[0] = max(peak_anon[0], anon())
print("PLANBENCH " + json.dumps({"rc": rc, "baseline": base, "peak_rss": peak, "baseline_anon": base_anon,
                                 "peak_anon": peak_anon[0]}))
"""


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n))


def make_data(path: Path, pairs: int, seed: int = 0, long: bool = False) -> None:
    rng = random.Random(seed)
    prompt, completion = ((150, 260), (100, 180)) if long else ((20, 160), (10, 120))
    with open(path, "w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": words(rng, rng.randint(*prompt)),
                                "chosen": " " + words(rng, rng.randint(*completion)),
                                "rejected": " " + words(rng, rng.randint(*completion))}) + "\n")


def make_model(root: Path, tok_dir: Path, hidden: int, layers: int, inter: int, heads: int, vocab: int) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = root / f"model-h{hidden}-L{layers}-v{vocab}"
    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=inter, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train_flags(model: Path, data: Path, out: Path, cache: Path, batch: int, dtype: str, lora: int, ckpt: bool,
                steps: int) -> list[str]:
    flags = ["--model", str(model), "--data", str(data), "--output-dir", str(out), "--cache-dir", str(cache),
             "--batch-size", str(batch), "--dtype", dtype, "--max-steps", str(steps), "--no-progress",
             "--save-steps", "none", "--max-length", "1024", "--max-prompt-length", "512", "--logging-steps", "1",
             "--no-fast-path-check"]
    if lora:
        flags += ["--lora-r", str(lora)]
    if ckpt:
        flags += ["--gradient-checkpointing"]
    return flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time (each single-threaded); more than one shares the page cache, which "
                         "moves the small runs' RSS by tens of MiB")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--only", nargs="*", help="names of configurations to run")
    ap.add_argument("--json", dest="json_file")
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="prefopt-planbench-"))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "pairs.jsonl"
    make_data(data, args.pairs)
    long_data = root / "pairs-long.jsonl"
    make_data(long_data, max(4, args.pairs // 2), long=True)
    from prefopt.tiny import train_tokenizer

    tok_dir = root / "tokenizer"
    if not tok_dir.exists():
        rng = random.Random(1)
        train_tokenizer([words(rng, 200) for _ in range(300)], vocab_size=2048).save_pretrained(tok_dir)

    from prefopt import plan as P
    from prefopt.config import build_config
    from prefopt.inputs import prepare_examples
    from prefopt.modeling import load_tokenizer
    from prefopt.train import job_mode

    jobs = []
    for name, hidden, layers, inter, heads, vocab, batch, dtype, lora, ckpt in CONFIGS:
        if args.only and name not in args.only:
            continue
        model = make_model(root, tok_dir, hidden, layers, inter, heads, vocab)
        flags = train_flags(model, long_data if name.endswith("-long") else data, root / "runs" / name, root / "cache" / name, batch, dtype, lora, ckpt,
                            args.steps)
        cfg, _ = build_config({k.lstrip("-").replace("-", "_"): v for k, v in _pairs(flags)})
        examples = prepare_examples(cfg, load_tokenizer(str(model)), job_mode(cfg), None).train
        plan = P.make_plan(cfg, examples, host=True)
        est = plan.estimate()
        jobs.append((name, ["train", *flags, "--overwrite"], est, plan.data()))

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PREFOPT_LOG="WARNING")

    def run(job):
        name, argv, est, shape = job
        shutil.rmtree(root / "cache" / name, ignore_errors=True)  # a first run: the reference pass included
        proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("PLANBENCH ")), None)
        if proc.returncode != 0 or line is None:
            return name, None, est, shape, (proc.stderr or proc.stdout)[-2000:]
        return name, json.loads(line[len("PLANBENCH "):]), est, shape, ""

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run, jobs))
    MiB = 1 << 20
    print(f"{'configuration':<28} {'row':>5} {'baseline':>9} {'peak RSS':>9} {'measured':>9} {'anon':>7} "
          f"{'estimate':>9} {'est/meas':>8} {'est/anon':>8}  largest parts of the estimate")
    rows = []
    for name, res, est, shape, err in results:
        if res is None:
            print(f"{name:<28} FAILED: {err.strip().splitlines()[-1] if err.strip() else '?'}")
            continue
        measured = res["peak_rss"] - res["baseline"]
        anon = res["peak_anon"] - res["baseline_anon"]
        ratio = est.peak / measured
        parts = ", ".join(f"{k} {v / MiB:.0f}" for k, v in est.largest(4))
        print(f"{name:<28} {shape.row_tokens:>5} {res['baseline'] / MiB:>8.0f}M {res['peak_rss'] / MiB:>8.0f}M "
              f"{measured / MiB:>8.0f}M {anon / MiB:>6.0f}M {est.peak / MiB:>8.0f}M {ratio:>8.2f} {(est.peak - P.HOST_CODE_BYTES) / anon:>8.2f}  "
              f"{parts}"
              f"{'' if abs(ratio - 1) <= 0.2 else '  (outside 20 %)'}")
        rows.append({"config": name, "row_tokens": shape.row_tokens, "baseline": res["baseline"],
                     "peak_rss": res["peak_rss"], "measured": measured, "measured_anon": anon, "estimate": est.peak, "ratio": ratio,
                     "parts": est.parts})
    within = sum(abs(r["ratio"] - 1) <= 0.2 for r in rows)
    within_anon = sum(abs((r["estimate"] - P.HOST_CODE_BYTES) / r["measured_anon"] - 1) <= 0.2 for r in rows)
    print(f"{within}/{len(rows)} configurations within 20 % (measured = peak RSS - RSS after imports); "
          f"{within_anon}/{len(rows)} against anon (estimate less its code pages vs the sampled peak of RSS minus file-backed pages, minus that after imports)")
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _pairs(flags: list[str]):
    i = 0
    while i < len(flags):
        key = flags[i]
        if i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            value = flags[i + 1]
            i += 2
        else:
            value, i = True, i + 1
        name = key[2:]
        if name.startswith("no-"):
            yield "--" + name[3:], False
            continue
        yield key, _typed(name, value)


def _typed(name: str, value):
    if value is True:
        return True
    typ = {"batch-size": int, "max-steps": int, "max-length": int, "max-prompt-length": int, "logging-steps": int,
           "lora-r": int}.get(name)
    if name == "save-steps":
        return None
    return typ(value) if typ else value


if __name__ == "__main__":
    sys.exit(main())
