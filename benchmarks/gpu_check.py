"""The GPU check: what to run, in one go, whenever a GPU machine is lent.

Nothing is downloaded. A Qwen2-shaped model (~150M parameters: hidden 896, 8 layers, 14 heads over 2
key/value heads, MLP 4864, tied 32k embeddings) is built from a transformers config with random
weights, a byte-level BPE tokenizer is trained with :func:`prefopt.tiny.train_tokenizer`, and
synthetic preference pairs are generated (chosen completions use "good" words, rejected ones "bad"
words, as in the tests' ``make_pairs``). The final norm's scale is raised so the untrained model's
logits have a trained model's spread (std ~5 instead of ~0.1): near-uniform logits would make
every precision look exact.

Sections, each with its own time budget (a section that runs over is stopped and said so; one
that crashes is reported and the others still run):

1. device: torch / transformers / accelerate (/ deepspeed) versions, GPUs and their memory. Without
   CUDA and without ``--smoke``: prints "no GPU: nothing to check" and exits 0.
2. parity: completion log-probs of the same rows on the same weights, against plain float32 (each
   sequence alone, the model's own forward and head): the fast path in float32, the plain and the
   fast path under bf16 autocast with float32 weights (what ``--dtype bfloat16`` trains with), and
   with the weights themselves in bf16 (``--pure-low-precision``): per-token max/mean difference
   and per-sequence relative difference. Then prefopt's fast-path check
   (:func:`prefopt.fastpath.decide`) for float32, bf16 autocast and bf16 weights: which fast paths
   it kept, which it switched off and why.
3. training: DPO runs through :func:`prefopt.train.train` (reference cache on, constant learning
   rate) in float32, bfloat16 (float32 master weights under autocast, the default) and bfloat16
   with ``pure_low_precision``, at a DPO learning rate (1e-6) and a large one (1e-4), same data and
   seed: step-1 loss (must be ln 2 within 1e-3: policy == reference), final loss, reward accuracy
   and margin, the fraction of weights final/ holds changed from the initial ones, tokens/s (steps
   after the first) and peak GPU memory. The point: bf16 weights at 1e-6 change almost no weight
   (an update below ~1/256 of a weight rounds away); mixed precision changes nearly all.
4. multi_gpu: with 2+ GPUs, ``accelerate launch --multi_gpu --num_processes 2 -m prefopt.cli
   train`` (DDP) against one GPU with twice the gradient accumulation (the same global batches):
   per-step losses must agree within bf16 tolerance. With DeepSpeed installed, also ZeRO-3 over
   two GPUs (a temporary accelerate config). Skipped, with the reason, otherwise.
   ``--multi-cpu`` runs this section over two CPU processes (gloo) instead, to test it off-GPU.

Usage::

    python benchmarks/gpu_check.py --out gpu_check.json          # on the GPU machine, < 8 minutes
    python benchmarks/gpu_check.py --smoke --out smoke.json       # CPU, tiny model, < ~60 s (CI)

Exit status: 0 when every check passed (or there is no GPU to check), 1 when a check failed or a
section crashed. The table goes to stdout; training runs' own output goes to WORKDIR/logs.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing is downloaded, ever
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LN2 = math.log(2)
SECTIONS = ("device", "parity", "training", "multi_gpu")


@dataclass(frozen=True)
class Scale:
    """Model, data and time sizes of one mode."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    min_vocab: int            # the model's vocabulary is padded up to this (real models' heads are large)
    tokenizer_vocab: int
    prompt_words: tuple[int, int]
    completion_words: tuple[int, int]
    max_length: int
    max_prompt_length: int
    batch_size: int
    steps: int
    parity_pairs: int
    multi_steps: int
    budgets: dict[str, float]  # seconds per section
    total: float               # hard cap on the whole check, seconds


GPU = Scale(hidden=896, layers=8, heads=14, kv_heads=2, intermediate=4864, min_vocab=32768, tokenizer_vocab=4096,
            prompt_words=(16, 160), completion_words=(8, 120), max_length=512, max_prompt_length=256,
            batch_size=16, steps=30, parity_pairs=16, multi_steps=10,
            budgets={"device": 15, "parity": 75, "training": 240, "multi_gpu": 150}, total=460)
SMOKE = Scale(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96, min_vocab=0, tokenizer_vocab=300,
              prompt_words=(3, 8), completion_words=(2, 5), max_length=64, max_prompt_length=32,
              batch_size=4, steps=3, parity_pairs=8, multi_steps=3,
              budgets={"device": 10, "parity": 30, "training": 90, "multi_gpu": 120}, total=240)

# Learning rates of the training section: DPO's usual one, and one large enough to move bf16 weights.
SMALL_LR, LARGE_LR = 1e-6, 1e-4
# (run name, --dtype, --pure-low-precision); the bf16 pair first: their comparison is the point
DTYPE_RUNS = (("bf16-mixed", "bfloat16", False), ("bf16-pure", "bfloat16", True), ("float32", "float32", False))
STEP1_TOL = 1e-3
# Per-step DPO losses of two-process runs against one process over the same global batches. DDP
# differs from accumulation only in the order of float32 gradient sums (on CPU, bit-identical). ZeRO-3
# under bf16 computes with bf16 weights where autocast keeps float32 norms, embeddings and residual:
# a DPO reward is beta x a difference of two sums of hundreds of log-probs, each off by bf16's
# rounding, so its losses wander from autocast's by bf16 noise (measured on CPU: 0.03 after 3 steps
# at 1e-5; float32 agrees to 1.3e-6), plus a share of how far the run has moved from ln 2.
MULTI_TOL = {("ddp", "bfloat16"): 2e-2, ("zero3", "bfloat16"): 3e-2, ("ddp", "float32"): 1e-3,
             ("zero3", "float32"): 1e-3}
ZERO3_BF16_MOVED_SHARE = 0.25


def multi_tolerance(engine: str, dtype: str, single: list[float]) -> float:
    tol = MULTI_TOL[(engine, dtype)]
    if engine == "zero3" and dtype == "bfloat16":
        tol += ZERO3_BF16_MOVED_SHARE * max((abs(x - LN2) for x in single), default=0.0)
    return tol
# The logits' standard deviation the final norm is scaled to (an untrained model's is ~0.1).
LOGIT_STD = 5.0

GOOD = ["sunny", "bright", "warm", "gentle", "kind", "happy", "calm", "clear"]
BAD = ["stormy", "dark", "cold", "harsh", "cruel", "sad", "angry", "grey"]
FILLER = ["the", "a", "day", "sky", "morning", "road", "town", "river", "field", "house", "and", "was", "over",
          "under", "near", "with", "old", "new", "long", "small", "hill", "tree", "bridge", "market", "evening",
          "boat", "garden", "window", "street", "lake", "stone", "wind", "light", "path", "wall", "door", "song",
          "letter", "train", "station", "of", "to", "in", "by", "from", "then", "they", "we", "she", "he"]


# ---------------------------------------------------------------------------- plumbing


class SectionTimeout(BaseException):
    """Raised by the alarm when a section runs past its budget (a BaseException, so that no
    ``except Exception`` inside prefopt -- the fast-path check catches those -- swallows it)."""


def _alarm(signum, frame):
    raise SectionTimeout()


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Context:
    args: argparse.Namespace
    scale: Scale
    smoke: bool
    work: Path
    device: Any = None
    started: float = field(default_factory=time.perf_counter)
    checks: list[Check] = field(default_factory=list)
    model_dir: Path | None = None
    data_file: Path | None = None
    model_info: dict = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.scale.total - self.elapsed()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)


def clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become null, tuples lists, paths strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def say(text: str = "") -> None:
    print(text, flush=True)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_group(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, output to ``log``; on timeout (or any interruption) kill
    that group -- the launcher and the workers it started -- and return (None, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
            rc = None
    return rc, time.perf_counter() - start


# ---------------------------------------------------------------------------- model and data


def make_pairs(n: int, seed: int, scale: Scale) -> list[dict]:
    """Prompts of filler words; chosen completions of GOOD words, rejected ones of BAD words, lengths
    drawn independently (as real pairs differ in length)."""
    rng = random.Random(seed)
    lo, hi = scale.completion_words

    def words(pool, k):
        return " " + " ".join(rng.choice(pool) for _ in range(k))

    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(FILLER) for _ in range(rng.randint(*scale.prompt_words))) + ":"
        # completions mix in a few filler words, so that the two differ in more than their vocabulary
        chosen = words(GOOD + FILLER[:6], rng.randint(lo, hi))
        rejected = words(BAD + FILLER[:6], rng.randint(lo, hi))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def build_assets(ctx: Context) -> None:
    """Tokenizer, model and data in WORKDIR (once per check)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefopt.tiny import save_tiny, train_tokenizer

    s = ctx.scale
    n_pairs = max(s.batch_size * s.steps, s.batch_size * 2 * s.multi_steps, s.parity_pairs)
    pairs = make_pairs(n_pairs, seed=1, scale=s)
    corpus = [r["prompt"] + r["chosen"] for r in make_pairs(400, seed=123, scale=s)] + \
             [r["prompt"] + r["rejected"] for r in make_pairs(400, seed=124, scale=s)]
    tok = train_tokenizer(corpus, vocab_size=s.tokenizer_vocab)
    config = Qwen2Config(vocab_size=max(len(tok), s.min_vocab), hidden_size=s.hidden, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         intermediate_size=s.intermediate, max_position_embeddings=max(1024, s.max_length * 2),
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # logits of a trained model's spread: std ~ norm scale * 0.02 * sqrt(hidden)
        model.model.norm.weight.fill_(LOGIT_STD / (config.initializer_range * math.sqrt(s.hidden)))
    ctx.model_dir = save_tiny(model, tok, ctx.work / "model")
    ctx.data_file = ctx.work / "pairs.jsonl"
    ctx.data_file.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    ctx.model_info = {"architecture": "Qwen2ForCausalLM", "parameters": sum(p.numel() for p in model.parameters()),
                      "hidden": s.hidden, "layers": s.layers, "heads": s.heads, "kv_heads": s.kv_heads,
                      "intermediate": s.intermediate, "vocab": config.vocab_size, "tokenizer_vocab": len(tok),
                      "tied_embeddings": True, "pairs": len(pairs)}
    del model


def train_config(ctx: Context, name: str, **kw):
    from prefopt.config import TrainConfig

    s = ctx.scale
    base = dict(model=str(ctx.model_dir), data=str(ctx.data_file), output_dir=str(ctx.work / "runs" / name),
                overwrite=True, cache_dir=str(ctx.work / "cache"), max_length=s.max_length,
                max_prompt_length=s.max_prompt_length, batch_size=s.batch_size, grad_accum=1, max_steps=s.steps,
                lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
                loss_type=["sigmoid"], ref_cache=True, logging_steps=1, save_steps=None, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


class StepHooks:
    """Observer for :func:`prefopt.train.train`: every step's metrics, seconds and real tokens."""

    save_final = True

    def __init__(self):
        self.steps: list[dict] = []
        self.device = None
        self.fast_paths = None
        self.reference = None

    def _sync(self):
        import torch

        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_start(self, *, policy, reference, data, steps, device, fast_paths=None):
        import torch

        self.device = torch.device(device)
        self.fast_paths = fast_paths
        self.reference = type(reference).__name__ if reference is not None else None
        self._sync()
        self._last = time.perf_counter()

    def on_step(self, step, parts, metrics):
        self._sync()
        now = time.perf_counter()
        self.steps.append({"step": step, "seconds": now - self._last, "tokens": sum(p.real_tokens for p in parts),
                           **{k: float(v) for k, v in metrics.items()}})
        self._last = time.perf_counter()


def fresh_accelerate_state() -> None:
    """accelerate keeps one state per process and refuses a second Accelerator with another mixed
    precision; each in-process run starts afresh (prefopt may do this itself; twice is harmless)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def run_training(ctx: Context, cfg) -> tuple[StepHooks, float]:
    from prefopt.train import train

    logs = ctx.work / "logs"
    logs.mkdir(exist_ok=True)
    hooks = StepHooks()
    fresh_accelerate_state()
    start = time.perf_counter()
    with open(logs / f"{Path(cfg.output_dir).name}.log", "w") as f, contextlib.redirect_stdout(f):
        train(cfg, hooks=hooks)
    return hooks, time.perf_counter() - start


def safetensors_of(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def changed_fraction(initial: dict, final_dir: Path) -> dict:
    """How many weight entries final/ holds that differ from the initial ones (the initial weights
    rounded to final/'s dtype first: a bf16 run starts from those)."""
    final = safetensors_of(final_dir)
    keys = sorted(set(initial) & set(final))
    changed = total = 0
    for k in keys:
        a, b = initial[k].to(final[k].dtype), final[k]
        changed += int((a != b).sum())
        total += a.numel()
    return {"fraction": changed / max(total, 1), "changed": changed, "total": total,
            "dtype": str(next(iter(final.values())).dtype).removeprefix("torch.") if final else None,
            "keys_only_initial": sorted(set(initial) - set(final)), "keys_only_final": sorted(set(final) - set(initial))}


# ---------------------------------------------------------------------------- 1. device


def deepspeed_version() -> str | None:
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return None
    try:
        return importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def section_device(ctx: Context) -> dict:
    import accelerate
    import torch
    import transformers

    import prefopt

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                            "prefopt": getattr(prefopt, "__version__", "?"), "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    info["deepspeed"] = deepspeed_version()   # not imported here: that takes seconds and sets up an accelerator
    gpus = []
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(Exception):
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": total / 2**30, "free_gib": free / 2**30,
                         "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    info["gpus"] = gpus
    info["device"] = str(ctx.device)
    info["model"] = ctx.model_info
    say(table(["item", "value"], [[k, v] for k, v in info.items() if k not in ("gpus", "model")]))
    if gpus:
        say(table(["gpu", "name", "memory GiB", "free GiB", "capability"],
                  [[g["index"], g["name"], g["memory_gib"], g["free_gib"], g["capability"]] for g in gpus]))
    say("model: " + ", ".join(f"{k} {v}" for k, v in ctx.model_info.items()))
    return info


# ---------------------------------------------------------------------------- 2. parity


def diff_stats(got, want) -> dict:
    """Per-token max/mean |difference| (nats) and per-sequence relative difference of the sums."""
    import torch

    real = ~torch.isnan(want)
    same = torch.equal(torch.isnan(got), torch.isnan(want))
    d = (got[real] - want[real]).abs()
    seq_got, seq_want = got.nan_to_num().sum(1), want.nan_to_num().sum(1)
    rel = (seq_got - seq_want).abs() / seq_want.abs().clamp_min(1.0)
    return {"token_max": float(d.max()) if same else float("nan"), "token_mean": float(d.mean()) if same else float("nan"),
            "seq_rel_max": float(rel.max()), "seq_rel_mean": float(rel.mean()), "same_tokens": same,
            "finite": bool(torch.isfinite(got[real]).all())}


def section_parity(ctx: Context) -> dict:
    import torch

    from prefopt.config import TrainConfig
    from prefopt.fastpath import NOISE_RATIO, ORDER, TOLERANCES, apply_patches, check_rows, decide, measure, plain_model, \
        requested_features
    from prefopt.inputs import prepare_examples
    from prefopt.modeling import load_causal_lm, load_tokenizer

    s, dev = ctx.scale, ctx.device
    cfg = train_config(ctx, "parity")
    tok = load_tokenizer(str(ctx.model_dir))
    examples = prepare_examples(cfg, tok, "pairs", None).train
    rows = [replace(ex, index=i) for i, ex in enumerate(examples[:s.parity_pairs])]
    requested = requested_features(TrainConfig())
    plain = dict.fromkeys(ORDER, False)
    common = dict(pad_id=tok.pad_token_id, train_mode=False, with_grad=False, split=False, chunk_size=1024, device=dev)
    n_tokens = sum(len(c) for ex in rows for c in ex.completions)

    def tables(model, autocast):
        with plain_model(model):
            p = measure(model, rows, features=plain, autocast=autocast, **common).token_logps
        applied = apply_patches(model, requested)
        f = measure(model, rows, features=applied, autocast=autocast, **common).token_logps
        return p, f, applied

    model = load_causal_lm(str(ctx.model_dir), dtype="float32").to(dev)
    truth, fast32, applied32 = tables(model, None)
    plain_ac, fast_ac, applied_ac = tables(model, torch.bfloat16)
    m16 = load_causal_lm(str(ctx.model_dir), dtype="bfloat16").to(dev)
    plain16, fast16, applied16 = tables(m16, None)
    result: dict[str, Any] = {"pairs": len(rows), "tokens": n_tokens, "reference": "float32, plain path",
                              "compared": {}}
    cmp = result["compared"]
    cmp["fast float32"] = diff_stats(fast32, truth)
    cmp["plain bf16 autocast"] = diff_stats(plain_ac, truth)
    cmp["fast bf16 autocast"] = diff_stats(fast_ac, truth)
    cmp["plain bf16 weights"] = diff_stats(plain16, truth)
    cmp["fast bf16 weights"] = diff_stats(fast16, truth)
    # the fast path's own error at each precision: against the plain path at that precision
    cmp["fast vs plain, bf16 autocast"] = diff_stats(fast_ac, plain_ac)
    cmp["fast vs plain, bf16 weights"] = diff_stats(fast16, plain16)
    result["applied"] = {"float32": applied32, "bf16 autocast": applied_ac, "bf16 weights": applied16}
    say(f"completion log-probs of {len(rows)} pairs ({n_tokens} tokens) against float32 on the plain path "
        "(token: |difference| in nats; seq rel: |sum difference| / max(|sum|, 1))")
    say(table(["path", "token max", "token mean", "seq rel max", "seq rel mean", "finite"],
              [[k, v["token_max"], v["token_mean"], v["seq_rel_max"], v["seq_rel_mean"], v["finite"]]
               for k, v in cmp.items()]))

    # prefopt's fast-path check, as a training run calls it (with gradients, rows split)
    check_rows_ = check_rows(examples)
    decided = {}
    for label, m, dtype, autocast in (("float32", model, torch.float32, None),
                                      ("bf16 autocast", model, torch.bfloat16, torch.bfloat16),
                                      ("bf16 weights", m16, torch.bfloat16, None)):
        fast = decide(m, check_rows_, requested, pad_id=tok.pad_token_id, with_grad=True, split=True,
                      chunk_size=1024, device=dev, dtype=dtype, autocast=autocast)
        decided[label] = {"kept": [k for k in ORDER if fast.features.get(k)],
                          "off": dict(fast.off), "train_mode": fast.train_mode, "seconds": fast.seconds,
                          "describe": fast.describe()}
    result["fast_path_check"] = decided
    say("fast-path check (prefopt.fastpath.decide, with gradients, rows split as in training):")
    say(table(["precision", "kept", "switched off (why)", "train mode", "s"],
              [[k, ",".join(v["kept"]) or "none (plain path)",
                "; ".join(f"{n}: {r}" for n, r in v["off"].items()) or "-", v["train_mode"], v["seconds"]]
               for k, v in decided.items()]))
    del model, m16
    free_memory()

    f32, bf = TOLERANCES[torch.float32], TOLERANCES[torch.bfloat16]
    for k, v in cmp.items():
        ctx.check(f"parity: {k} finite, same tokens", v["finite"] and v["same_tokens"])
    v = cmp["fast float32"]
    ctx.check("parity: fast path = plain path in float32", v["token_max"] <= f32.token_max and
              v["token_mean"] <= f32.token_mean, f"token max {v['token_max']:.3g}, mean {v['token_mean']:.3g}")
    v = cmp["fast vs plain, bf16 autocast"]
    # as prefopt.fastpath.compare judges it: within bf16's fixed tolerance of the plain path, or no
    # further from float32 than the plain path (two bf16 layouts differ by bf16's own noise)
    fast32, own32 = cmp["fast bf16 autocast"], cmp["plain bf16 autocast"]
    as_exact = (fast32["token_mean"] <= NOISE_RATIO.token_mean * own32["token_mean"] + f32.token_mean
                and fast32["token_max"] <= NOISE_RATIO.token_max * own32["token_max"] + f32.token_max)
    ctx.check("parity: fast path = plain path under bf16 autocast (bf16 tolerance, or as close to float32)",
              (v["token_max"] <= bf.token_max and v["token_mean"] <= bf.token_mean) or as_exact,
              f"token max {v['token_max']:.3g}, mean {v['token_mean']:.3g}; from float32 mean "
              f"{fast32['token_mean']:.3g} vs plain {own32['token_mean']:.3g}")
    v, own = cmp["fast bf16 autocast"], cmp["plain bf16 autocast"]
    # bf16 rounds each logit (a logit of 8-16 by up to 0.03): a few hundredths of a nat a token is
    # bf16 itself, which the model's own forward under autocast shows; the fast path must add little
    ctx.check("parity: bf16 autocast close to float32 (token mean <= 0.1, sequences within 5%)",
              v["token_mean"] <= 0.1 and v["seq_rel_max"] <= 0.05,
              f"token mean {v['token_mean']:.3g}, seq rel max {v['seq_rel_max']:.3g}")
    ctx.check("parity: the fast path under autocast is no further from float32 than the model's own forward",
              v["token_mean"] <= 1.25 * own["token_mean"] + 1e-3 and v["seq_rel_max"] <= 1.5 * own["seq_rel_max"] + 1e-3,
              f"token mean {v['token_mean']:.3g} vs {own['token_mean']:.3g}, "
              f"seq rel max {v['seq_rel_max']:.3g} vs {own['seq_rel_max']:.3g}")
    for label, v in decided.items():
        want = [k for k in ORDER if requested[k]]
        ctx.check(f"fast-path check keeps every fast path ({label})", v["kept"] == want,
                  "; ".join(f"{n}: {r}" for n, r in v["off"].items()))
    return result


# ---------------------------------------------------------------------------- 3. training


def section_training(ctx: Context, budget: float) -> dict:
    import torch

    on_gpu = ctx.device.type == "cuda"
    initial = safetensors_of(ctx.model_dir)
    plan = [(name, dtype, pure, lr) for lr in (SMALL_LR, LARGE_LR) for name, dtype, pure in DTYPE_RUNS]
    runs, skipped = [], []
    start = time.perf_counter()
    longest = 0.0
    for name, dtype, pure, lr in plan:
        label = f"{name} lr={lr:g}"
        spent = time.perf_counter() - start
        if spent + 1.2 * longest > budget:
            skipped.append({"run": label, "reason": f"section budget: {spent:.0f} s of {budget:.0f} s spent, "
                                                     f"a run takes ~{longest:.0f} s"})
            continue
        cfg = train_config(ctx, f"{name}-lr{lr:g}", dtype=dtype, pure_low_precision=pure, learning_rate=lr)
        free_memory()
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        hooks, seconds = run_training(ctx, cfg)
        longest = max(longest, seconds)
        peak = torch.cuda.max_memory_allocated(ctx.device) if on_gpu else None
        steps = hooks.steps
        steady = steps[1:] or steps
        changed = changed_fraction(initial, Path(cfg.output_dir) / "final")
        last = steps[-1] if steps else {}
        runs.append({
            "run": label, "dtype": dtype, "pure_low_precision": pure, "learning_rate": lr, "steps": len(steps),
            "step1_loss": steps[0]["loss"] if steps else float("nan"),
            "final_loss": last.get("loss", float("nan")),
            "reward_accuracy": last.get("rewards/accuracies", float("nan")),
            "reward_margin": last.get("rewards/margins", float("nan")),
            "losses": [r["loss"] for r in steps], "margins": [r.get("rewards/margins") for r in steps],
            "changed_fraction": changed["fraction"], "changed": changed,
            "tokens_per_second": sum(r["tokens"] for r in steady) / max(sum(r["seconds"] for r in steady), 1e-9),
            "peak_gpu_memory_gib": peak / 2**30 if peak is not None else None, "seconds": seconds,
            "reference": hooks.reference,
            "fast_paths": hooks.fast_paths.describe() if hooks.fast_paths is not None else None})
        del hooks
        free_memory()
    say(f"DPO (sigmoid, beta 0.1), {ctx.scale.steps} steps of {ctx.scale.batch_size} pairs, constant lr, "
        "reference cache; changed = fraction of final/'s weight entries that differ from the initial ones")
    say(table(["run", "step-1 loss", "final loss", "reward acc", "margin", "changed", "tokens/s", "peak GiB", "s"],
              [[r["run"], r["step1_loss"], r["final_loss"], r["reward_accuracy"], r["reward_margin"],
                r["changed_fraction"], r["tokens_per_second"], r["peak_gpu_memory_gib"], r["seconds"]]
               for r in runs]))
    for s in skipped:
        say(f"skipped {s['run']}: {s['reason']}")

    for r in runs:
        ctx.check(f"training {r['run']}: step-1 loss = ln 2 within {STEP1_TOL:g}",
                  abs(r["step1_loss"] - LN2) <= STEP1_TOL, f"{r['step1_loss']:.6f}")
        ctx.check(f"training {r['run']}: every loss finite", all(math.isfinite(x) for x in r["losses"]))
        if r["changed"]["keys_only_initial"] or r["changed"]["keys_only_final"]:
            ctx.check(f"training {r['run']}: final/ holds the initial weights' names", False,
                      f"only initial {r['changed']['keys_only_initial']}, only final {r['changed']['keys_only_final']}")
    by = {r["run"]: r for r in runs}
    mixed, pure = by.get(f"bf16-mixed lr={SMALL_LR:g}"), by.get(f"bf16-pure lr={SMALL_LR:g}")
    if mixed and pure:
        ctx.check(f"training lr={SMALL_LR:g}: bf16 weights change fewer weights than mixed precision "
                  "(less than half as many)", pure["changed_fraction"] < 0.5 * mixed["changed_fraction"],
                  f"pure {pure['changed_fraction']:.4f}, mixed {mixed['changed_fraction']:.4f}")
        ctx.check(f"training lr={SMALL_LR:g}: mixed precision changes most weights",
                  mixed["changed_fraction"] > 0.5, f"{mixed['changed_fraction']:.4f}")
    return {"runs": runs, "skipped": skipped, "steps": ctx.scale.steps, "batch_size": ctx.scale.batch_size}


# ---------------------------------------------------------------------------- 4. two processes


def logged_losses(out_dir: Path) -> list[float]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])]


def section_multi(ctx: Context, budget: float, n_gpus: int) -> dict:
    on_cpu = ctx.args.multi_cpu
    if not on_cpu and n_gpus < 2:
        why = "smoke mode runs on the CPU" if ctx.smoke else f"{n_gpus} GPU: the two-process runs need 2 or more"
        return {"status": "skipped", "reason": f"{why} (--multi-cpu runs this section on two CPU processes)"}
    start = time.perf_counter()
    s = ctx.scale
    dtype = ctx.args.multi_dtype
    common = dict(dtype=dtype, learning_rate=1e-5, max_steps=s.multi_steps, batch_size=s.batch_size // 2 or 1)
    # a cache of this section's own, empty: each two-process run must compute its reference (see below)
    cache = ctx.work / "cache-multi"
    shutil.rmtree(cache, ignore_errors=True)
    # the reference: one process, twice the accumulation -- the same global batches as two processes
    cfg = train_config(ctx, "single-accum2", grad_accum=2, cache_dir=str(cache), **common)
    _, single_s = run_training(ctx, cfg)
    single = logged_losses(Path(cfg.output_dir))
    free_memory()
    result: dict[str, Any] = {"device": "cpu (gloo)" if on_cpu else "cuda", "steps": s.multi_steps,
                              "batch_size_per_process": common["batch_size"], "single": {"losses": single,
                                                                                          "seconds": single_s},
                              "runs": {}}
    flags = ["--model", str(ctx.model_dir), "--data", str(ctx.data_file), "--dtype", dtype,
             "--learning-rate", str(common["learning_rate"]), "--lr-scheduler", "constant", "--warmup-steps", "0",
             "--weight-decay", "0", "--max-grad-norm", "1.0", "--beta", "0.1", "--max-length", str(s.max_length),
             "--max-prompt-length", str(s.max_prompt_length), "--batch-size", str(common["batch_size"]),
             "--grad-accum", "1", "--max-steps", str(s.multi_steps), "--logging-steps", "1", "--save-steps", "none",
             "--no-progress", "--seed", "0", "--overwrite"]
    env = {**os.environ, "PREFOPT_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("ACCELERATE_USE_CPU", None)   # it would override a config file's engine (ZeRO-3 would run as DDP)
    env["CUDA_VISIBLE_DEVICES"] = "" if on_cpu else os.environ.get("CUDA_VISIBLE_DEVICES", "0,1")
    # DDP on CPU processes needs accelerate told so; DeepSpeed on CPU finds no GPU and takes gloo itself
    engine_env = {"ddp": {"ACCELERATE_USE_CPU": "true"} if on_cpu else {}, "zero3": {}}
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    engines: list[tuple[str, list[str]]] = [("ddp", ["--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                                     "--mixed_precision", "no", "--dynamo_backend", "no"])]
    if deepspeed_version() is None:
        result["runs"]["zero3"] = {"status": "skipped", "reason": "DeepSpeed is not installed (pip install -e '.[deepspeed]')"}
    else:
        import yaml

        zero3 = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "machine_rank": 0,
                 "num_machines": 1, "num_processes": 2, "main_training_function": "main",
                 "mixed_precision": "bf16" if dtype == "bfloat16" else "no",
                 "rdzv_backend": "static", "same_network": True, "use_cpu": False,
                 "deepspeed_config": {"zero_stage": 3, "offload_optimizer_device": "none",
                                      "offload_param_device": "none", "zero3_init_flag": True}}
        yaml_path = ctx.work / "zero3.yaml"
        yaml_path.write_text(yaml.safe_dump(zero3))
        engines.append(("zero3", ["--config_file", str(yaml_path)]))
    port = 29500 + os.getpid() % 1000
    for engine, launch_flags in engines:
        spent = time.perf_counter() - start
        left = budget - spent - 5
        if left < 30:
            result["runs"][engine] = {"status": "skipped", "reason": f"section budget: {spent:.0f} s of {budget:.0f} s spent"}
            continue
        out = ctx.work / "runs" / f"{engine}-2proc"
        cmd = [*launch, *launch_flags, "--main_process_port", str(port), "-m", "prefopt.cli", "train", *flags,
               "--output-dir", str(out)]
        port += 1
        rc, seconds = run_group(cmd, {**env, **engine_env[engine]}, left, ctx.work / "logs" / f"{engine}-2proc.log")
        losses = logged_losses(out)
        run: dict[str, Any] = {"command": " ".join(cmd), "exit_code": rc, "seconds": seconds, "losses": losses,
                               "log": str(ctx.work / "logs" / f"{engine}-2proc.log")}
        if rc is None:
            run.update(status="timed out", reason=f"killed after {seconds:.0f} s (section budget)")
        elif rc != 0:
            tail = (ctx.work / "logs" / f"{engine}-2proc.log").read_text().splitlines()[-8:]
            run.update(status="failed", reason="\n".join(tail))
        else:
            # prefopt's reference cache is keyed by the distributed type, among the rest, and every run
            # here shares all the rest: one whose reference came from the cache ran as an engine
            # already seen (an environment variable overriding a config file makes ZeRO-3 plain DDP)
            text = (ctx.work / "logs" / f"{engine}-2proc.log").read_text()
            ran_as_new = "reference log-probs: computed" in text
            run["engine_verified"] = ran_as_new
            ctx.check(f"multi {engine}: ran as its own engine (its reference log-probs were computed, not "
                      "found cached by an earlier run)", ran_as_new,
                      "" if ran_as_new else "the log says the reference came from the cache")
            n = min(len(losses), len(single))
            diff = max((abs(a - b) for a, b in zip(losses, single)), default=float("nan"))
            tol = multi_tolerance(engine, dtype, single)
            run.update(status="ok", max_loss_diff=diff, tolerance=tol)
            ctx.check(f"multi {engine}: {n} step losses equal one process with accumulation 2 within {tol:.3g}",
                      n == len(single) == s.multi_steps and diff <= tol, f"max |diff| {diff:.3g} over {n} steps")
            ctx.check(f"multi {engine}: step-1 loss = ln 2 within {STEP1_TOL:g}",
                      bool(losses) and abs(losses[0] - LN2) <= STEP1_TOL, f"{losses[0] if losses else None}")
        if run["status"] in ("failed", "timed out"):
            ctx.check(f"multi {engine}: two-process run", False, run["reason"].splitlines()[-1] if run["reason"] else "")
        result["runs"][engine] = run
    say(f"two processes ({result['device']}), {s.multi_steps} steps, --dtype {dtype}, {common['batch_size']} pairs "
        "per process, against one process with --grad-accum 2")
    rows = [["one process, accum 2", "ok", len(single), single[0] if single else None, single[-1] if single else None,
             None, single_s]]
    for engine, r in result["runs"].items():
        ls = r.get("losses") or []
        rows.append([f"{engine}, 2 processes", r.get("status"), len(ls), ls[0] if ls else None, ls[-1] if ls else None,
                     r.get("max_loss_diff"), r.get("seconds")])
    say(table(["run", "status", "steps", "step-1 loss", "final loss", "max |diff|", "s"], rows))
    for engine, r in result["runs"].items():
        if r.get("status") != "ok":
            say(f"{engine}: {r.get('status')}: {r.get('reason')}")
    result["status"] = "ok"
    return result


# ---------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps: proves the script works (CI)")
    p.add_argument("--out", metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--workdir", metavar="DIR", help="where the model, data and runs go (default: a temporary "
                   "directory, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (device always runs)")
    p.add_argument("--steps", type=int, help="training steps per run (default: 30 on GPU, 3 with --smoke)")
    p.add_argument("--budget", type=float, help="hard cap on the whole check in seconds (default: 460 on GPU, "
                   "240 with --smoke); each section also has its own")
    p.add_argument("--multi-cpu", action="store_true", help="run the two-process section on two CPU processes "
                   "(gloo) instead of two GPUs")
    p.add_argument("--multi-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="--dtype of the two-process section's runs (default: bfloat16)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    wanted = {x.strip() for x in args.sections.split(",") if x.strip()} | {"device"}
    unknown = wanted - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.smoke and os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        os.environ["ACCELERATE_USE_CPU"] = "true"   # smoke runs on the CPU even on a GPU machine
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # "Loading weights" bars would break up the tables
    if args.threads:
        torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.smoke:
        say("no GPU: nothing to check")
        if args.out:
            Path(args.out).write_text(json.dumps({"mode": "gpu", "ok": True, "sections": {}, "checks": [],
                                                  "reason": "no GPU: nothing to check"}, indent=1))
        return 0
    scale = SMOKE if args.smoke else GPU
    if args.steps:
        scale = replace(scale, steps=args.steps)
    if args.budget:
        scale = replace(scale, total=args.budget)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="prefopt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    ctx = Context(args=args, scale=scale, smoke=args.smoke, work=work,
                  device=torch.device("cpu" if args.smoke or not has_cuda else "cuda:0"))
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    report: dict[str, Any] = {"mode": "smoke" if args.smoke else "gpu", "workdir": str(work), "sections": {}}
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        say(f"== prefopt GPU check ({report['mode']}), work directory {work}")
        build_assets(ctx)
        report["setup_seconds"] = ctx.elapsed()
        n_gpus = torch.cuda.device_count() if has_cuda and not args.smoke else 0
        for name in SECTIONS:
            say()
            say(f"== {name}")
            if name not in wanted:
                report["sections"][name] = {"status": "skipped", "reason": "not in --sections"}
                say("skipped: not in --sections")
                continue
            budget = min(scale.budgets[name], ctx.left())
            if budget < 5:
                report["sections"][name] = {"status": "skipped",
                                            "reason": f"total budget exhausted ({ctx.elapsed():.0f} s of {scale.total:.0f} s)"}
                say(f"skipped: {report['sections'][name]['reason']}")
                continue
            started = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, budget)
            try:
                if name == "device":
                    out = section_device(ctx)
                elif name == "parity":
                    out = section_parity(ctx)
                elif name == "training":
                    out = section_training(ctx, budget * 0.9)
                else:
                    out = section_multi(ctx, budget * 0.95, n_gpus)
                out.setdefault("status", "ok")
                if out["status"] == "skipped":
                    say(f"skipped: {out['reason']}")
            except SectionTimeout:
                out = {"status": "timed out", "reason": f"stopped at its budget of {budget:.0f} s"}
                ctx.check(f"{name}: finished within its budget", False, out["reason"])
                say(f"timed out: {out['reason']}")
            except Exception as e:  # noqa: BLE001 -- report it and go on with the other sections
                out = {"status": "error", "reason": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                ctx.check(f"{name}: ran without an error", False, out["reason"])
                say(out["traceback"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            out["seconds"] = time.perf_counter() - started
            report["sections"][name] = out
            free_memory()
    finally:
        signal.signal(signal.SIGALRM, old)
        report["elapsed_seconds"] = ctx.elapsed()
        report["checks"] = [c.__dict__ for c in ctx.checks]
        report["ok"] = all(c.ok for c in ctx.checks)
        say()
        say("== checks")
        if ctx.checks:
            say(table(["check", "result", "detail"], [[c.name, "PASS" if c.ok else "FAIL", c.detail] for c in ctx.checks]))
        say(f"{sum(c.ok for c in ctx.checks)}/{len(ctx.checks)} checks passed in {ctx.elapsed():.1f} s")
        if args.out:
            Path(args.out).write_text(json.dumps(clean(report), indent=1))
            say(f"wrote {args.out}")
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
