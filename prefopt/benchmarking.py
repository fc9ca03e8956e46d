"""Measuring real training steps: throughput, peak memory and model FLOP utilisation.

``prefopt bench`` runs the ordinary training loop (:func:`prefopt.train.train`) for a
few optimizer steps with a :class:`BenchHooks` observer attached, so every number
comes from prefopt's own code path: data loading, the reference (cached, live or
adapter-disabled), collation, the chunked LM head, backward, clipping and AdamW.

Counting conventions (the same ones ``benchmarks/bench_vs_trl.py`` uses for TRL):

* **tokens** -- ``len(prompt) + len(completion)`` for every completion of every example,
  i.e. the prompt counted once per completion, as a padded trainer feeds it
  (:func:`prefopt.batching.padded_token_count`). This is the work the user asked for,
  independent of how cleverly it is laid out, so tokens/s compare across trainers.
* **real tokens** -- tokens prefopt actually computed (prompt once per example with
  prefix sharing, padding excluded).
* **model FLOPs** -- from the model's shapes, for the tokens computed: ``2 * N_body``
  per real token (every matrix of the decoder layers), ``2 * d * V`` per scored token
  (the LM head runs on completion positions only), less the last layer's MLP where it is
  skipped (:func:`prefopt.layers.trim_last_mlp`), and ``4 * d_attn`` per attended
  (query, key) pair per layer (``QK^T`` and ``AV``), read off the attention mask. A
  training step costs three forwards (forward + backward); a live reference adds one
  forward. Embedding lookups cost nothing.
* **peak FLOP/s** -- on CPU a timed float32 matmul on this machine with the current
  thread count; on a GPU the datasheet's dense peak for the model's dtype when the
  device is known, else a timed matmul in that dtype.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prefopt.attention import text_config
from prefopt.batching import PackedBatch, padded_token_count
from prefopt.layers import trimmed_mlp

# Dense (no sparsity) datasheet peaks in FLOP/s, SXM parts: {name fragment: {dtype: peak}}.
GPU_PEAKS: dict[str, dict[torch.dtype, float]] = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 91.6e12},
    "A10G": {torch.bfloat16: 70e12, torch.float16: 70e12, torch.float32: 31.2e12},
}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    try:
        import psutil

        return time.time() - psutil.Process(os.getpid()).create_time()
    except ImportError:
        with open(f"/proc/{os.getpid()}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         size: int = 1024, seconds: float = 0.5) -> float:
    """Best FLOP/s of repeated ``size x size`` matmuls on ``device`` in ``dtype``."""
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        dt = time.perf_counter() - t
        best = max(best, 2 * size ** 3 / max(dt, 1e-12))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAKS.items():
            if fragment in name and dtype in peaks:
                return peaks[dtype], f"datasheet ({name}, {str(dtype).removeprefix('torch.')})"
        return measure_matmul_flops(dtype, device, size=4096), f"timed {dtype} matmul on {name}"
    return measure_matmul_flops(torch.float32, device), \
        f"timed float32 1024x1024 matmul, {torch.get_num_threads()} threads"


@dataclass
class ModelShape:
    """What the FLOP count needs from a model: decoder matrix parameters and attention width."""

    body_params: int      # parameters of the decoder layers (every matmul weight of the stack)
    hidden: int           # d, the LM head's input size
    vocab: int            # V
    layers: int
    attn_width: int       # heads * head_dim, the width of QK^T and AV
    total_params: int
    trainable_params: int
    skipped_params: int = 0  # the last MLP's, when it runs on the head's rows only (prefopt.layers)

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        config = text_config(model.config)
        embed = model.get_input_embeddings()
        head = model.get_output_embeddings()
        skip = {id(p) for p in embed.parameters()} | {id(p) for p in head.parameters()}
        # LoRA adapters add their own (small) matrices; peft keeps them inside the layers, so they count.
        body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        mlp = trimmed_mlp(model)
        return cls(body_params=body, hidden=config.hidden_size, vocab=head.weight.shape[0],
                   layers=config.num_hidden_layers, attn_width=heads * head_dim, total_params=total,
                   trainable_params=trainable,
                   skipped_params=sum(p.numel() for p in mlp.parameters()) if mlp is not None else 0)


def attended_pairs(batch: PackedBatch) -> int:
    """(query, key) pairs the mask allows among real tokens (padding only attends to itself)."""
    return int(batch.attention_mask.sum().item()) - (batch.slots - batch.real_tokens)


def forward_flops(shape: ModelShape, batch: PackedBatch) -> float:
    """Model FLOPs of one forward over ``batch`` (LM head on scored positions only)."""
    scored = int(batch.target_ids.numel())
    return (2.0 * shape.body_params * batch.real_tokens
            - 2.0 * shape.skipped_params * (batch.real_tokens - int(batch.head_rows.numel()))
            + 2.0 * shape.hidden * shape.vocab * scored
            + 4.0 * shape.attn_width * shape.layers * attended_pairs(batch))


@dataclass
class StepRecord:
    step: int
    seconds: float
    example_index: list[int]
    pairs: int
    tokens: int          # padded-trainer convention (prompt once per completion)
    real_tokens: int
    slots: int
    flops: float
    loss: float


@dataclass
class BenchHooks:
    """Observer passed to :func:`prefopt.train.train`: times every optimizer step."""

    save_final: bool = False
    shape: ModelShape | None = None
    reference_kind: str = "none"
    live_reference: bool = False
    examples: list = field(default_factory=list)
    records: list[StepRecord] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train_start: float = 0.0
    fast_paths: Any = None          # prefopt.fastpath.FastPaths: what the check decided for this model
    _last: float = 0.0

    def on_train_start(self, *, policy, reference, data, steps: int, device, fast_paths=None) -> None:
        self.fast_paths = fast_paths
        self.shape = ModelShape.of(policy)
        self.reference_kind = type(reference).__name__ if reference is not None else "none"
        self.live_reference = reference is not None and not hasattr(reference, "table")
        self.examples = data.train
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.train_start = self._last = time.perf_counter()

    def on_step(self, step: int, micro: list[PackedBatch], metrics: dict[str, float]) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        per_forward = sum(forward_flops(self.shape, b) for b in micro)
        flops = per_forward * (3 + (1 if self.live_reference else 0))
        tokens = sum(padded_token_count(self.examples[int(i)]) for b in micro for i in b.example_index)
        self.records.append(StepRecord(
            step=step, seconds=now - self._last, example_index=[int(i) for b in micro for i in b.example_index],
            pairs=sum(b.num_examples for b in micro), tokens=tokens,
            real_tokens=sum(b.real_tokens for b in micro), slots=sum(b.slots for b in micro), flops=flops,
            loss=float(metrics.get("loss", float("nan")))))
        self._last = time.perf_counter()  # the FLOP count above is not training time

    def token_digest(self) -> str:
        """Digest of the token ids trained on: ``[prompt_ids, completions]`` per example, step by step.

        Within a step the examples go in dataset order (rows may run in another order, which
        changes no sum). The same formula in ``benchmarks/trl_dpo_run.py`` shows both trainers
        saw the same tokens in the same steps.
        """
        h = hashlib.blake2b(digest_size=16)
        for r in self.records:
            for i in sorted(r.example_index):
                ex = self.examples[i]
                h.update(json.dumps([ex.prompt_ids, ex.completions]).encode())
        return h.hexdigest()


def gpu_memory_beyond_tensors(device: torch.device) -> dict[str, int | None]:
    """What a device's memory holds besides live tensors, for comparing with ``prefopt plan``: the
    allocator's peak reservation (its cache and fragmentation on top of the tensors) and the CUDA
    context and kernels, read as the device's used memory minus what the allocator reserved."""
    if device.type != "cuda":
        return {"peak_gpu_reserved_bytes": None, "cuda_context_bytes": None}
    free, total = torch.cuda.mem_get_info(device)
    return {"peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "cuda_context_bytes": total - free - torch.cuda.memory_reserved(device)}


def summarize(hooks: BenchHooks, *, setup_seconds: float, wall_seconds: float, peak: tuple[float, str],
              settings: dict[str, Any]) -> dict[str, Any]:
    """The bench result: totals over all steps, steady state (steps after the first), memory, MFU."""
    recs = hooks.records
    if not recs:
        raise ValueError("no training step was recorded")
    steady = recs[1:] or recs
    step_s = sum(r.seconds for r in recs)
    steady_s = sum(r.seconds for r in steady)
    tokens = sum(r.tokens for r in recs)
    pairs = sum(r.pairs for r in recs)
    flops = sum(r.flops for r in steady)
    peak_flops_value, peak_source = peak
    out: dict[str, Any] = {
        "steps": len(recs),
        "pairs": pairs,
        "tokens": tokens,
        "real_tokens": sum(r.real_tokens for r in recs),
        "slots": sum(r.slots for r in recs),
        "setup_seconds": setup_seconds,
        "train_seconds": step_s,
        "wall_seconds": wall_seconds,
        "tokens_per_second": tokens / step_s,
        "real_tokens_per_second": sum(r.real_tokens for r in recs) / step_s,
        "pairs_per_second": pairs / step_s,
        "steady_tokens_per_second": sum(r.tokens for r in steady) / steady_s,
        "steady_pairs_per_second": sum(r.pairs for r in steady) / steady_s,
        "wall_tokens_per_second": tokens / wall_seconds,
        "median_step_seconds": statistics.median(r.seconds for r in recs),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(hooks.device) if hooks.device.type == "cuda" else None,
        **gpu_memory_beyond_tensors(hooks.device),
        "model_flops_per_second": flops / steady_s,
        "peak_flops_per_second": peak_flops_value,
        "peak_flops_source": peak_source,
        "mfu": flops / steady_s / peak_flops_value,
        "total_params": hooks.shape.total_params,
        "trainable_params": hooks.shape.trainable_params,
        "reference": hooks.reference_kind,
        "token_digest": hooks.token_digest(),
        "fast_paths": hooks.fast_paths.describe() if hooks.fast_paths is not None else None,
        "fast_path_check_seconds": (None if hooks.fast_paths is None or hooks.fast_paths.cached
                                    else hooks.fast_paths.seconds),
        "losses": [r.loss for r in recs],
        "step_seconds": [r.seconds for r in recs],
        "settings": settings,
    }
    return out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:,.0f} MiB"


def format_table(result: dict[str, Any]) -> str:
    """A two-column human-readable table of a bench result."""
    rows = [
        ("steps / pairs", f"{result['steps']} / {result['pairs']}"),
        ("reference", result["reference"]),
        ("fast paths", result.get("fast_paths") or "-"),
        ("parameters (trained)", f"{result['total_params'] / 1e6:.2f}M ({result['trainable_params'] / 1e6:.2f}M)"),
        ("tokens (prompt per completion)", f"{result['tokens']:,}"),
        ("real tokens computed / slots", f"{result['real_tokens']:,} / {result['slots']:,}"),
        ("setup (load, data, reference)", f"{result['setup_seconds']:.2f} s"),
        ("training steps", f"{result['train_seconds']:.2f} s (median step {result['median_step_seconds']:.3f} s)"),
        ("tokens/s (steps)", f"{result['tokens_per_second']:,.0f}"),
        ("tokens/s (steady, after step 1)", f"{result['steady_tokens_per_second']:,.0f}"),
        ("tokens/s (whole process)", f"{result['wall_tokens_per_second']:,.0f}"),
        ("pairs/s", f"{result['pairs_per_second']:.2f}"),
        ("peak RSS", _fmt_bytes(result["peak_rss_bytes"])),
        ("peak GPU memory", _fmt_bytes(result["peak_gpu_bytes"])),
        ("model FLOP/s", f"{result['model_flops_per_second'] / 1e9:,.2f} GFLOP/s"),
        ("peak FLOP/s", f"{result['peak_flops_per_second'] / 1e9:,.2f} GFLOP/s ({result['peak_flops_source']})"),
        ("MFU", f"{100 * result['mfu']:.1f} %"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    return f"{line}\n{body}\n{line}"


def finite_or_none(x: Any) -> Any:
    """JSON has no NaN: map non-finite floats to None (recursively)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite_or_none(v) for v in x]
    return x
