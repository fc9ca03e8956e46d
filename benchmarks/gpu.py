"""prefopt against TRL's DPOTrainer on a GPU: a ~0.5B Qwen2-shaped model in bf16, nothing downloaded.

The model has Qwen2.5-0.5B's shapes (hidden 896, 24 layers, 14 query heads over 2 key/value heads,
MLP 4864, a tied 151,936-token vocabulary: 494M parameters) and random weights; a byte-level BPE
tokenizer is trained here on generated text (its ids are a subset of the model's vocabulary, so the
LM head still costs the full vocabulary); the pairs have prompts of 100-400 tokens and completions
of 50-300, chosen and rejected drawn independently. Both trainers keep float32 weights and compute
under bf16 autocast (prefopt's ``--dtype bfloat16``; TRL's ``bf16=True`` on a float32 model), with
their defaults otherwise (prefopt: cached reference, prefix sharing, packing, block attention --
FlexAttention on CUDA; TRL: a live reference model). Same pairs, same order, same batch size.

Printed for both: tokens/s over the steps after the first (a padded trainer's count: the prompt
once per completion), peak GPU memory (``torch.cuda.max_memory_allocated``) and MFU: the useful
FLOPs of those steps (prefopt's count: 6 x parameters per real token, the LM head on scored
positions, attention on the pairs the mask allows) over the seconds, over the GPU's dense bf16
peak. The same useful FLOPs divide both trainers' times, so the MFU ratio is the speed ratio.
Then prefopt's memory plan (the line ``prefopt train`` prints at its start) against what the
device held at the peak: the allocator's peak reservation plus the CUDA context.

Usage::

    python benchmarks/gpu.py --out gpu.json               # on a GPU machine, < 8 minutes
    python benchmarks/gpu.py --smoke --out smoke.json     # CPU, a tiny model, ~30 s (CI keeps it working)

TRL runs through ``benchmarks/trl_dpo_run.py`` with ``--trl-python`` (default: this interpreter), when
that interpreter can import ``trl``; otherwise only prefopt's figures are printed, and the reason.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_bench_data import BAD, GOOD, TextMaker  # noqa: E402


@dataclass(frozen=True)
class Scale:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tokenizer_vocab: int
    prompt: tuple[int, int]
    completion: tuple[int, int]
    pairs: int
    batch_size: int
    max_length: int


GPU = Scale(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tokenizer_vocab=8192,
            prompt=(100, 400), completion=(50, 300), pairs=384, batch_size=32, max_length=1024)
SMOKE = Scale(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, tokenizer_vocab=512,
              prompt=(10, 40), completion=(5, 30), pairs=16, batch_size=4, max_length=128)


def build_assets(work: Path, s: Scale) -> tuple[Path, Path, int]:
    """Model directory, pairs file and parameter count, built once in ``work``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefopt.tiny import save_tiny, train_tokenizer

    maker = TextMaker(0)
    tok = train_tokenizer([" ".join(maker.sentence(GOOD + BAD) for _ in range(4)) for _ in range(3000)],
                          vocab_size=s.tokenizer_vocab)
    config = Qwen2Config(vocab_size=max(s.vocab, len(tok)), hidden_size=s.hidden, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         intermediate_size=s.intermediate, max_position_embeddings=2 * s.max_length,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model_dir = save_tiny(model, tok, work / "model")
    del model
    rng = random.Random(1)
    rows = []
    for _ in range(s.pairs):
        rows.append({"prompt": maker.text_of_tokens(tok, rng.randint(*s.prompt)) + " Answer:",
                     "chosen": maker.text_of_tokens(tok, rng.randint(*s.completion), GOOD, lead_space=True),
                     "rejected": maker.text_of_tokens(tok, rng.randint(*s.completion), BAD, lead_space=True)})
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data, params


def run_prefopt(model: Path, data: Path, s: Scale, steps: int, dtype: str, out: Path, timeout: float,
                extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "prefopt.cli", "bench", "--model", str(model), "--data", str(data),
           "--steps", str(steps), "--batch-size", str(s.batch_size), "--max-length", str(s.max_length),
           "--max-prompt-length", str(s.max_length // 2), "--grad-accum", "1", "--beta", "0.1",
           "--learning-rate", "1e-6", "--lr-scheduler", "linear", "--warmup-steps", "0", "--weight-decay", "0",
           "--max-grad-norm", "1.0", "--no-shuffle", "--dtype", dtype, "--cache-dir", str(out.parent / "cache"),
           "--json", str(out), "--format", "json", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("prefopt bench failed:\n" + proc.stderr[-3000:])
    result = json.loads(out.read_text())
    result["plan_peak_bytes"] = planned_peak(proc.stdout + proc.stderr)
    return result


def planned_peak(output: str) -> int | None:
    """The peak of the ``memory plan: peak ...`` line that ``prefopt train`` prints at its start."""
    m = re.search(r"memory plan: peak ([0-9.]+) (GiB|MiB)", output)
    return None if m is None else int(float(m.group(1)) * (2**30 if m.group(2) == "GiB" else 2**20))


def plan_check(ours: dict) -> dict | None:
    """The plan against the device at the peak. The plan counts live tensors and the CUDA context, so
    ``ratio`` sets it against the allocator's peak of live tensors plus the context; ``ratio_reserved``
    against its peak reservation plus the context, what nvidia-smi shows (the caching allocator's reserve
    on top, which prefopt.plan says in a note and does not add: see plan.ALLOCATOR_NOTE)."""
    planned, reserved, context = ours.get("plan_peak_bytes"), ours.get("peak_gpu_reserved_bytes"), \
        ours.get("cuda_context_bytes")
    if not planned or not reserved or context is None:
        return None
    allocated = ours["peak_gpu_bytes"]
    return {"planned_bytes": planned, "measured_bytes": allocated + context, "ratio": planned / (allocated + context),
            "ratio_reserved": planned / (reserved + context), "allocated_peak_bytes": allocated,
            "reserved_peak_bytes": reserved, "cuda_context_bytes": context}


def trl_available(python: str) -> str | None:
    """None if ``python`` can import trl; otherwise the reason."""
    proc = subprocess.run([python, "-c", "import trl"], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"{python} cannot import trl"


def run_trl(python: str, model: Path, data: Path, s: Scale, steps: int, gpu: bool, out: Path,
            timeout: float) -> dict:
    cmd = [python, str(HERE / "trl_dpo_run.py"), "--model", str(model), "--data", str(data), "--steps", str(steps),
           "--out", str(out), "--batch-size", str(s.batch_size), "--max-length", str(s.max_length),
           "--learning-rate", "1e-6"] + (["--gpu"] if gpu else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError("TRL run failed:\n" + proc.stderr[-3000:])
    return json.loads(out.read_text())


def compare(ours: dict, trl: dict | None) -> dict:
    """tokens/s, peak memory and MFU of both, over the steps after the first."""
    def steady(step_seconds: list[float]) -> float:
        return sum(step_seconds[1:]) or sum(step_seconds)

    our_s = steady(ours["step_seconds"])
    useful = ours["model_flops_per_second"] * our_s           # FLOPs of the steps after the first
    tokens = ours["steady_tokens_per_second"] * our_s          # the same pairs in the same steps for TRL
    rows = {"prefopt": {"tokens_per_second": ours["steady_tokens_per_second"], "peak_gpu_bytes": ours["peak_gpu_bytes"],
                        "peak_rss_bytes": ours["peak_rss_bytes"], "mfu": ours["mfu"],
                        "fast_paths": ours["fast_paths"], "losses": ours["losses"]},
            "memory_plan": plan_check(ours)}
    if trl is not None:
        trl_s = steady(trl["step_seconds"])
        rows["trl"] = {"tokens_per_second": tokens / trl_s, "peak_gpu_bytes": trl.get("peak_gpu_bytes"),
                       "peak_rss_bytes": trl["peak_rss_bytes"], "mfu": useful / trl_s / ours["peak_flops_per_second"],
                       "losses": trl["losses"]}
        rows["ratios"] = {"speed": trl_s / our_s,
                          "gpu_memory": (ours["peak_gpu_bytes"] / trl["peak_gpu_bytes"]
                                         if ours["peak_gpu_bytes"] and trl.get("peak_gpu_bytes") else None),
                          "same_tokens": ours["token_digest"] == trl["token_digest"],
                          "loss_max_diff": max(abs(a - b) for a, b in zip(ours["losses"], trl["losses"]))}
    return rows


def fmt_bytes(n) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/prefopt-gpu-bench"))
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer (default 20; smoke 3)")
    ap.add_argument("--trl-python", default=sys.executable)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: keeps the script working without a GPU")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default 450)")
    a = ap.parse_args()

    import torch

    start = time.perf_counter()
    gpu = torch.cuda.is_available()
    if not gpu and not a.smoke:
        print("no GPU: nothing to measure (--smoke runs the script on the CPU)")
        return 0
    s = SMOKE if a.smoke else GPU
    steps = a.steps or (3 if a.smoke else 12)
    dtype = "bfloat16" if gpu else "float32"
    a.workdir.mkdir(parents=True, exist_ok=True)
    model, data, params = build_assets(a.workdir, s)
    device = torch.cuda.get_device_name(0) if gpu else "cpu"
    print(f"{device}: Qwen2-shaped model, {params / 1e6:.1f}M parameters, {s.pairs} pairs, batch {s.batch_size}, "
          f"{steps} steps, {dtype} (built in {time.perf_counter() - start:.0f} s)")
    left = lambda: a.budget - (time.perf_counter() - start)  # noqa: E731
    ours = run_prefopt(model, data, s, steps, dtype, a.workdir / "prefopt.json", timeout=max(30.0, left() * 0.4))
    # TRL checkpoints activations by default (DPOConfig.gradient_checkpointing=True): prefopt's memory
    # against it is also measured with checkpointing on
    ckpt, ckpt_skipped = None, None
    try:
        ckpt = run_prefopt(model, data, s, steps, dtype, a.workdir / "prefopt-ckpt.json",
                           timeout=max(30.0, left() * 0.4), extra=("--gradient-checkpointing",))
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        ckpt_skipped = str(e).splitlines()[0]
    why_not = trl_available(a.trl_python)
    trl = None
    if why_not is None:
        try:
            trl = run_trl(a.trl_python, model, data, s, steps, gpu, a.workdir / "trl.json", timeout=max(30.0, left()))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            why_not = str(e).splitlines()[0]
    result = {"device": device, "torch": torch.__version__, "parameters": params, "steps": steps, "dtype": dtype,
              "scale": s.__dict__, "trl_skipped": why_not, **compare(ours, trl),
              "checkpointed": compare(ckpt, trl) if ckpt else None, "checkpointed_skipped": ckpt_skipped,
              "seconds": time.perf_counter() - start}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'trainer':<8} {'tokens/s':>10} {'peak GPU':>10} {'peak RSS':>10} {'MFU':>7}")
    for name in ("prefopt", "trl"):
        if name in result:
            r = result[name]
            print(f"{name:<8} {r['tokens_per_second']:>10.0f} {fmt_bytes(r['peak_gpu_bytes']):>10} "
                  f"{fmt_bytes(r['peak_rss_bytes']):>10} {100 * r['mfu']:>6.1f}%")
    if trl is None:
        print(f"TRL not run: {why_not}")
    else:
        q = result["ratios"]
        mem = f"{q['gpu_memory']:.2f}x" if q["gpu_memory"] else "-"
        print(f"speed {q['speed']:.2f}x TRL, GPU memory {mem}, same tokens: {q['same_tokens']}, "
              f"losses within {q['loss_max_diff']:.2g}")
    if ckpt:
        c = result["checkpointed"]
        line = (f"prefopt with --gradient-checkpointing: {c['prefopt']['tokens_per_second']:.0f} tokens/s, "
                f"peak GPU {fmt_bytes(c['prefopt']['peak_gpu_bytes'])}, MFU {100 * c['prefopt']['mfu']:.1f}%")
        if "ratios" in c:
            mem = c["ratios"]["gpu_memory"]
            line += f"; {c['ratios']['speed']:.2f}x TRL, GPU memory " + (f"{mem:.2f}x" if mem else "-")
        print(line + (f"; plan {c['memory_plan']['ratio']:.2f} of measured" if c["memory_plan"] else ""))
    elif ckpt_skipped:
        print(f"prefopt with --gradient-checkpointing not measured: {ckpt_skipped}")
    plan = result["memory_plan"]
    if plan:
        print(f"memory plan {fmt_bytes(plan['planned_bytes'])} vs measured {fmt_bytes(plan['measured_bytes'])} "
              f"(live tensors {fmt_bytes(plan['allocated_peak_bytes'])} + CUDA context "
              f"{fmt_bytes(plan['cuda_context_bytes'])}): {plan['ratio']:.2f}; vs peak reserved "
              f"{fmt_bytes(plan['reserved_peak_bytes'])} + context: {plan['ratio_reserved']:.2f}")
    print(f"prefopt {result['prefopt']['fast_paths']}")
    print(f"wrote {a.out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
