"""Estimate the peak memory of a training run before it starts.

The estimate is built from three plain descriptions, none of which needs weights:

* :class:`ModelShape`: the decoder's sizes, read from ``config.json`` (:func:`model_shape`);
* :class:`DataShape`: the longest packed row the run will compute and the completion tokens
  the LM head scores in it (:func:`data_shape`, from the tokenized examples);
* :class:`Setup`: the options that decide what is stored (:func:`setup_from_config`).

:func:`estimate` adds up named parts (weights, gradients, optimizer state, activations,
LM-head chunk, reference, ...) in bytes; each part is a formula of what prefopt keeps
alive at the peak, which is the backward of the last row of an optimizer step: weights,
their (almost complete) gradients and the optimizer state are all alive, plus that row's
saved activations. :func:`suggest` tries settings that lower the estimate and keeps
those that fit a memory budget.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from prefopt.runtime import KERNEL_CACHE_ENTRIES

MiB = 1 << 20
GiB = 1 << 30

# Mirrors prefopt.logprobs.HEAD_CHUNK_ELEMENTS (kept here so planning imports no torch).
HEAD_CHUNK_ELEMENTS = 1 << 24
# Memory a run uses beyond its tensors, measured once and the same for every model size:
# on the host, peak RSS minus RSS after imports of a run whose tensors are under 1 MiB (a 1-layer,
# hidden-32 Llama; benchmarks/plan_vs_measured.py prints it as its "runtime" row): thread pools,
# modules imported lazily during the run, the tokenizer and data, oneDNN's kernels. On a GPU: the
# CUDA context and kernels, outside PyTorch's allocator: 819 MiB measured on an H200 (torch 2.11 with
# CUDA 13.0, the device's used memory minus what the allocator reserved, benchmarks/gpu.py).
# On the host it has two halves: ~16 MiB of heap (anonymous pages) and ~29 MiB of the libraries'
# code pages first touched during the run (file-backed, counted in RSS; their number varies a
# little with what other processes have in the page cache).
HOST_RUNTIME_BYTES = 16 * MiB
HOST_CODE_BYTES = 29 * MiB
CUDA_RUNTIME_BYTES = 820 * MiB
# Low-precision matrix products on the host go through oneDNN, which keeps a compiled kernel and its work
# space per shape; prefopt.runtime.bounded_kernel_caches caps each of its two caches at 64 entries.
# Measured at ~0.9 (hidden 256) to ~1.6 MiB (hidden 512) per entry; a run fills them within its first rows.
HOST_KERNEL_CACHE_BYTES = KERNEL_CACHE_ENTRIES * MiB
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHARDINGS = ("ddp", "zero2", "zero3")


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = False
    experts: int = 1                 # MoE: experts per layer (1 = dense MLP)
    experts_per_token: int = 1
    name: str = "model"

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    def layer_linears(self) -> dict[str, tuple[int, int, int]]:
        """(in, out, count) of each linear of one decoder layer."""
        H, I = self.hidden, self.intermediate
        return {"q_proj": (H, self.q_dim, 1), "k_proj": (H, self.kv_dim, 1), "v_proj": (H, self.kv_dim, 1),
                "o_proj": (self.q_dim, H, 1), "gate_proj": (H, I, self.experts), "up_proj": (H, I, self.experts),
                "down_proj": (I, H, self.experts)}

    @property
    def layer_params(self) -> int:
        router = self.hidden * self.experts if self.experts > 1 else 0
        return sum(i * o * n for i, o, n in self.layer_linears().values()) + 2 * self.hidden + router

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Weights that autocast casts for a matmul (every linear and the LM head)."""
        return self.layers * sum(i * o * n for i, o, n in self.layer_linears().values()) + self.vocab * self.hidden

    def lora_params(self, r: int, targets: list[str] | tuple[str, ...] = ("all-linear",)) -> int:
        """Adapter parameters: r x (in + out) per adapted linear (peft's all-linear skips the LM head)."""
        every = "all-linear" in targets
        return self.layers * sum(r * (i + o) * n for name, (i, o, n) in self.layer_linears().items()
                                 if every or name in targets)


@dataclass(frozen=True)
class DataShape:
    row_tokens: int        # tokens of the longest row one forward computes
    row_scored: int        # completion tokens the LM head scores in one forward (at most)
    examples: int = 0
    rows_per_forward: int = 1
    one_row: bool = False  # the micro-batch's segments packed into a single row (prefopt.train.one_row)


@dataclass(frozen=True)
class Setup:
    dtype: str = "float32"
    pure_low_precision: bool = False
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ("all-linear",)
    gradient_checkpointing: bool = False
    lean_activations: bool = True
    lm_head_chunk_size: int = 1024
    full_lm_head: bool = False
    optimizer: str = "adamw"
    live_reference: bool = False     # a second frozen copy of the model during training
    num_processes: int = 1
    sharding: str = "ddp"            # over num_processes: ddp (nothing divided), zero2, zero3 (or FSDP)
    batch_size: int = 4
    grad_accum: int = 1
    host: bool = False               # training on the CPU: the host's RSS is the device memory
    dense_mask: bool = True          # a [rows, L, L] mask is built (not with FlexAttention's block masks)
    model_file_bytes: int = 0        # the checkpoint's size (host loading reads it into memory)

    @property
    def weight_dtype(self) -> str:
        """As prefopt.train.storage: low-precision full fine-tuning keeps float32 master weights."""
        if self.dtype == "float32" or self.pure_low_precision or self.lora_r > 0:
            return self.dtype
        return "float32"

    @property
    def autocast(self) -> bool:
        return self.dtype != "float32" and not self.pure_low_precision

    @property
    def sharded(self) -> bool:
        return self.num_processes > 1 and self.sharding in ("zero2", "zero3")

    def describe(self) -> str:
        what = f"LoRA r={self.lora_r}" if self.lora_r else "full fine-tuning"
        precision = self.dtype if not self.autocast else f"{self.dtype} autocast, {self.weight_dtype} weights"
        parts = [what, precision, self.optimizer, f"batch {self.batch_size}x{self.grad_accum}"]
        if self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.num_processes > 1:
            parts.append(f"{self.num_processes} processes, {self.sharding}")
        if self.live_reference:
            parts.append("live reference")
        return ", ".join(parts)


@dataclass
class Estimate:
    parts: dict[str, int]          # bytes of each named part alive at the peak
    peak: int
    notes: list[str]

    def largest(self, n: int = 6) -> list[tuple[str, int]]:
        return sorted(((k, v) for k, v in self.parts.items() if v > 0), key=lambda kv: -kv[1])[:n]

    def line(self) -> str:
        named = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.largest())
        return f"peak {format_bytes(self.peak)} ({named})"


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '80G', '512MiB', '80' (GiB) -> bytes (GB and GiB both read as 2**30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 24G, 512MiB)")
    scale = {"": GiB, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


# ---------------------------------------------------------------------------- the model


# What a GPU's memory holds beyond the plan. The plan counts live tensors (on an H200, 3 % under
# torch.cuda.max_memory_allocated at batch 32, 16 % over with checkpointing) and the context.
# PyTorch's caching allocator keeps freed blocks for reuse, and rows of varying length leave its
# blocks fragmented: its peak reservation ran
# 8.0 GiB above a 31.8 GiB tensor peak and 5.0 GiB above 11.6 GiB checkpointed (batch 32,
# docs/benchmarks.md). Before failing an allocation it gives its unused blocks back and retries, so
# only the fragmented part can cost the run; it is not a formula of the shapes, so it is said, not
# added.
ALLOCATOR_NOTE = ("on a GPU the peak is of live tensors plus the CUDA context; nvidia-smi shows more: PyTorch's "
                  "caching allocator reserved 25-43 % above the tensors on an H200 with rows of varying length, "
                  "which it gives back before running out, except what fragmentation holds; within ~10 % of the "
                  "device, PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps that small")


def head_chunk_tokens(max_tokens: int, vocab: int) -> int:
    return max(16, min(max_tokens, HEAD_CHUNK_ELEMENTS // max(vocab, 1)))


def estimate(model: ModelShape, data: DataShape, setup: Setup) -> Estimate:
    """Peak bytes and its parts (see the module docstring and README for the formulas)."""
    H, I, V, layers = model.hidden, model.intermediate, model.vocab, model.layers
    P = model.params
    w = DTYPE_BYTES[setup.weight_dtype]
    act = 2 if setup.autocast or setup.dtype != "float32" else 4   # what matmuls write under autocast
    N = max(1, setup.num_processes)
    shard_w = N if setup.sharded and setup.sharding == "zero3" else 1
    shard_go = N if setup.sharded else 1
    notes: list[str] = []
    parts: dict[str, int] = {}

    # weights: every parameter in its storage dtype (ZeRO-3/FSDP: a 1/N slice each)
    parts["weights"] = P * w // shard_w
    if setup.lora_r > 0:
        trained = model.lora_params(setup.lora_r, setup.lora_targets)
        tw = 4                                   # peft keeps adapters in float32
        parts["weights"] += trained * tw // shard_w
    else:
        trained, tw = P, w
    # gradients in the trained parameters' dtype; optimizer: AdamW two moments, RMSprop one
    parts["gradients"] = trained * tw // shard_go
    moments = 2 if setup.optimizer == "adamw" else 1
    parts["optimizer state"] = moments * trained * tw // shard_go
    if shard_w > 1:  # ZeRO-3/FSDP gathers a layer's weights to compute it (and prefetches the next)
        parts["gathered layers"] = 2 * model.layer_params * (act if setup.autocast else w)
    # autocast casts each trained float32 matmul weight to the low dtype once per forward and keeps
    # the copy for the backward (autocast's weight cache): one low-precision copy of the model
    if setup.autocast and setup.lora_r == 0 and w == 4:
        parts["autocast weight copies"] = model.matmul_params * act // shard_w

    # activations of one forward (one packed row when prefopt runs row by row)
    T = data.row_tokens
    kv = model.kv_dim
    moe = min(model.experts_per_token, model.experts)
    # saved per token per layer (lean activations): the two norms' inputs (2H, float32 residual
    # stream; their outputs are rebuilt in the backward), q after RoPE, k, v (q + 2 kv), attention's
    # output and o_proj's input (2 q), gate and up outputs (2I; lean SwiGLU recomputes silu and the
    # product); in the dtype the matmuls write (bf16 under autocast)
    lean_layer = 2 * H * 4 + (model.q_dim * 3 + 2 * kv + 2 * I * moe) * act
    if not setup.lean_activations:  # norm outputs, silu(gate), gate*up and the norms' intermediates
        lean_layer += 4 * H * 4 + 2 * I * moe * act
    if setup.gradient_checkpointing:
        saved = layers * T * H * 4 + T * (lean_layer + 2 * H * 4)  # layer inputs + one recomputed layer
    else:
        saved = layers * T * lean_layer
    if setup.lora_r > 0:
        # each adapter's lora_A keeps its input for its weight's gradient: under autocast a low-precision
        # copy per adapted linear (q, k, v, gate and up each cast the same norm output); in float32 the
        # tensors are shared: the two norm outputs (which lean activations would otherwise rebuild) and
        # down_proj's input (which lean SwiGLU would otherwise recompute); plus the r-wide intermediates
        every = "all-linear" in setup.lora_targets
        adapted = {n: (i, o, k) for n, (i, o, k) in model.layer_linears().items() if every or n in setup.lora_targets}
        if setup.autocast:
            extra = sum(i * min(k, moe) for i, _, k in adapted.values()) * act
        else:
            extra = (2 * H + (I * moe if "down_proj" in adapted else 0)) * 4
        extra += len(adapted) * setup.lora_r * act
        if adapted.keys() & {"gate_proj", "up_proj", "down_proj"}:
            # an adapted MLP is no longer three plain linears, so the lean SwiGLU steps aside and the
            # MLP keeps silu(gate) as well (gate*up, down_proj's input, is counted above)
            extra += I * moe * act
        per_layer = T * extra
        saved += per_layer if setup.gradient_checkpointing else layers * per_layer
    parts["activations"] = saved
    # working set of one layer's backward: grads of its widest intermediates, plus the row's mask
    rows = max(1, data.rows_per_forward)
    mask = T * (T // rows) if setup.dense_mask else 0   # the bool [rows, L, L] mask
    parts["backward working set"] = T * (2 * max(I * moe, H) * act + 2 * H * 4) + mask

    # LM head: the scored positions' hidden states, and float32 logits of one chunk (plus the
    # backward's buffer of the same size); --full-lm-head: [tokens, vocab] logits of the whole row
    S = max(1, data.row_scored)
    if setup.full_lm_head:
        parts["LM-head logits"] = 3 * T * V * 4
    else:
        # on a GPU the chunk grows with the free memory (see head_chunk_tokens): count the largest it may be
        C = min(head_chunk_tokens(setup.lm_head_chunk_size, V) if setup.host else setup.lm_head_chunk_size, S)
        parts["LM-head chunk"] = 2 * C * V * 4 + S * H * 4
    # reference: a live second copy in the weights' dtype (none with the cache, or LoRA's adapters off)
    if setup.live_reference:
        parts["reference"] = P * w // shard_w
    if setup.host:
        if setup.dtype != "float32":
            parts["oneDNN kernel caches"] = HOST_KERNEL_CACHE_BYTES
        parts["runtime (host heap)"] = HOST_RUNTIME_BYTES
        parts["runtime (library code pages)"] = HOST_CODE_BYTES
    else:
        parts["CUDA context"] = CUDA_RUNTIME_BYTES
        notes.append(ALLOCATOR_NOTE)
    peak = sum(parts.values())
    if setup.host and setup.model_file_bytes:
        # from_pretrained reads the checkpoint from an mmap while the model's own tensors fill: on the
        # host (CPU training) both count at once, before any training state exists
        load = P * w + setup.model_file_bytes
        if load > peak:
            notes.append(f"the peak is at loading ({format_bytes(load)}: the weights plus the checkpoint file)")
            parts["loading (checkpoint file)"] = load - peak
            peak = load
    return Estimate(parts=parts, peak=int(peak), notes=notes)


# ---------------------------------------------------------------------------- descriptions


def model_shape(config) -> ModelShape:
    """The sizes of a transformers config (text part of a multimodal one)."""
    c = getattr(config, "text_config", None) or config
    H = int(c.hidden_size)
    heads = int(getattr(c, "num_attention_heads", None) or max(1, H // 64))
    head_dim = int(getattr(c, "head_dim", None) or H // heads)
    experts = int(getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or 1)
    inter = getattr(c, "moe_intermediate_size", None) if experts > 1 else None
    return ModelShape(
        vocab=int(c.vocab_size), hidden=H, layers=int(c.num_hidden_layers), heads=heads,
        kv_heads=int(getattr(c, "num_key_value_heads", None) or heads), head_dim=head_dim,
        intermediate=int(inter or getattr(c, "intermediate_size", None) or 4 * H),
        tied=bool(getattr(config, "tie_word_embeddings", False)), experts=experts,
        experts_per_token=int(getattr(c, "num_experts_per_tok", None) or 1),
        name=str((getattr(c, "architectures", None) or [getattr(c, "model_type", "model")])[0]))


def load_model_shape(name: str, trust_remote_code: bool = False) -> ModelShape:
    """Read ``config.json`` of a model directory or hub name (an adapter directory: its base's)."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    adapter = Path(name) / "adapter_config.json"
    if adapter.is_file():
        name = json.loads(adapter.read_text())["base_model_name_or_path"]
    return model_shape(AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code))


def checkpoint_bytes(name: str) -> int:
    from pathlib import Path

    path = Path(name)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def split_rows_used(cfg, mode: str, sharded: bool, host: bool) -> bool:
    """Whether training runs row by row (prefopt.train.check_split, and split_rows' own condition:
    every example inside one row, which prefix sharing guarantees). On a GPU a micro-batch's rows
    run together (prefopt.train.rows_together), so the largest forward is the whole micro-batch."""
    from prefopt.train import check_split

    return check_split(cfg, mode, sharded, "cpu" if host else "cuda") and cfg.prefix_sharing and not cfg.plain_path


def data_shape(lengths: list[tuple[int, tuple[int, ...]]], *, batch_size: int, prefix_sharing: bool = True,
               packing: bool = True, row_by_row: bool = True, one_row: bool = False, seed: int = 42,
               shuffle: bool = True) -> DataShape:
    """The largest forward the run computes, from (prompt length, completion lengths) per example.

    Row by row, the longest row is the longest segment (rows are packed to the micro-batch's longest
    segment, so none is longer, and the batch holding the longest segment has a row of exactly it).
    A whole micro-batch is R rows x its longest row, taken over the first epoch's batches; with
    ``one_row`` (a GPU with FlexAttention, prefopt.train.one_row) a single row of all its segments.
    """
    from prefopt.batching import _pack

    def segments(p: int, comps: tuple[int, ...]) -> list[tuple[int, int]]:
        if prefix_sharing:
            return [(p + sum(comps), sum(comps))]
        return [(p + c, c) for c in comps]

    if row_by_row:
        segs = [s for p, c in lengths for s in segments(p, c)]
        return DataShape(row_tokens=max(t for t, _ in segs), row_scored=max(s for _, s in segs),
                         examples=len(lengths))
    import random

    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed).shuffle(order)
    best = (0, 0, 1)
    for start in range(0, len(order), batch_size):
        segs = [s for i in order[start:start + batch_size] for s in segments(*lengths[i])]
        seg_len = [t for t, _ in segs]
        if one_row:
            rows = [list(range(len(segs)))]
        else:
            rows = _pack(seg_len, max(seg_len)) if packing else [[i] for i in range(len(segs))]
        L = max(sum(seg_len[i] for i in row) for row in rows)
        if len(rows) * L > best[0] * best[2] or best[0] == 0:
            best = (L, sum(s for _, s in segs), len(rows))
    L, scored, R = best
    return DataShape(row_tokens=R * L, row_scored=scored, examples=len(lengths), rows_per_forward=R,
                     one_row=one_row)


def example_lengths(examples) -> list[tuple[int, tuple[int, ...]]]:
    return [(len(ex.prompt_ids), tuple(len(c) for c in ex.completions)) for ex in examples]


def setup_from_config(cfg, *, num_processes: int = 1, sharding: str | None = None, host: bool = False,
                      model_file_bytes: int = 0) -> Setup:
    from prefopt.losses import needs_reference
    from prefopt.train import job_mode

    sharding = sharding or ("zero3" if num_processes > 1 else "ddp")
    live = (not cfg.ref_cache or cfg.ref_sync != "none") and cfg.lora_r == 0 and \
        job_mode(cfg) != "sft" and needs_reference(cfg.loss_type, cfg.reference_free)
    return Setup(dtype=cfg.dtype, pure_low_precision=cfg.pure_low_precision, lora_r=cfg.lora_r,
                 lora_targets=tuple(cfg.lora_target_modules), gradient_checkpointing=cfg.gradient_checkpointing,
                 lean_activations=cfg.lean_activations, lm_head_chunk_size=cfg.lm_head_chunk_size,
                 full_lm_head=cfg.full_lm_head or cfg.plain_path, optimizer=cfg.optimizer, live_reference=live,
                 num_processes=num_processes, sharding=sharding, batch_size=cfg.batch_size,
                 grad_accum=cfg.grad_accum, host=host, model_file_bytes=model_file_bytes,
                 dense_mask=not gpu_block_masks(cfg, host))


def gpu_block_masks(cfg, host: bool) -> bool:
    """Whether block attention runs through FlexAttention's block masks (on a GPU, as
    prefopt.attention.segment_kernel chooses there): no dense mask, and the micro-batch in one row
    (prefopt.train.one_row, whose device and kernel this assumes)."""
    from prefopt.train import block_attention_packed

    return not host and block_attention_packed(cfg)


@dataclass
class Plan:
    """Everything :func:`estimate` needs, kept so that :func:`suggest` can vary it."""

    model: ModelShape
    lengths: list[tuple[int, tuple[int, ...]]]
    setup: Setup
    cfg: object

    def data(self, setup: Setup | None = None) -> DataShape:
        setup = setup or self.setup
        from prefopt.train import job_mode

        cfg = self.cfg
        rows = split_rows_used(cfg, job_mode(cfg), setup.sharded, setup.host)
        return data_shape(self.lengths, batch_size=setup.batch_size, prefix_sharing=cfg.prefix_sharing
                          and not cfg.plain_path, packing=cfg.packing and not cfg.plain_path, row_by_row=rows,
                          one_row=not rows and gpu_block_masks(cfg, setup.host), seed=cfg.seed, shuffle=cfg.shuffle)

    def estimate(self, setup: Setup | None = None) -> Estimate:
        setup = setup or self.setup
        return estimate(self.model, self.data(setup), setup)


def make_plan(cfg, examples, *, num_processes: int = 1, sharding: str | None = None, host: bool = False) -> Plan:
    return Plan(model=load_model_shape(cfg.model, cfg.trust_remote_code), lengths=example_lengths(examples),
                setup=setup_from_config(cfg, num_processes=num_processes, sharding=sharding, host=host,
                                        model_file_bytes=checkpoint_bytes(cfg.model) if host else 0), cfg=cfg)


def plan_line(cfg, examples, *, num_processes: int = 1, sharding: str | None = None, host: bool = False) -> str:
    """One line for the start of training: ``memory plan: peak ... (weights ..., ...)``."""
    return "memory plan: " + make_plan(cfg, examples, num_processes=num_processes, sharding=sharding,
                                       host=host).estimate().line()


# ---------------------------------------------------------------------------- suggestions


@dataclass
class Suggestion:
    change: str
    setup: Setup
    estimate: Estimate

    def fits(self, budget: int) -> bool:
        return self.estimate.peak <= budget


def suggest(plan: Plan, budget: int, max_processes: int = 64) -> list[Suggestion]:
    """Settings that lower the estimate, each alone and then combined, with their estimates; the
    list keeps those that fit ``budget`` (or, if none does, the lowest one)."""
    s = plan.setup
    tried: list[Suggestion] = []

    def add(change: str, new: Setup) -> Suggestion:
        sug = Suggestion(change, new, plan.estimate(new))
        tried.append(sug)
        return sug

    if s.batch_size > 1:
        b = s.batch_size
        while b > 1:
            b //= 2
            new = replace(s, batch_size=b, grad_accum=s.grad_accum * (s.batch_size // b))
            if add(f"--batch-size {b} --grad-accum {new.grad_accum} (same pairs per step)", new).fits(budget):
                break
    ckpt = replace(s, gradient_checkpointing=True)
    if not s.gradient_checkpointing:
        add("--gradient-checkpointing", ckpt)
    lora = replace(s, lora_r=16, live_reference=False)
    if s.lora_r == 0:
        add("--lora-r 16", lora)
        add("--lora-r 16 --gradient-checkpointing", replace(lora, gradient_checkpointing=True))
    # ZeRO-3/FSDP run the whole micro-batch at once (no row-by-row split), so also with one pair per micro-batch
    one = replace(s, batch_size=1, grad_accum=s.grad_accum * s.batch_size)
    variants = [(s, ""), (ckpt, " --gradient-checkpointing")]
    if s.batch_size > 1:
        variants.append((one, f" --batch-size 1 --grad-accum {one.grad_accum}"))
    for base, label in variants:
        n = max(2, s.num_processes * 2 if s.sharding == "zero3" else 2)
        while n <= max_processes:
            new = replace(base, num_processes=n, sharding="zero3")
            if add(f"--num-processes {n} with ZeRO-3 (or FSDP){label}", new).fits(budget):
                break
            n *= 2
    before = plan.estimate().peak
    useful = [t for t in tried if t.estimate.peak < before]
    fitting = [t for t in useful if t.fits(budget)]
    if fitting:
        # one per kind of change, the cheapest change first (smallest structural change that fits)
        seen, out = set(), []
        for t in fitting:
            kind = t.change.split()[0]
            if kind not in seen:
                seen.add(kind)
                out.append(t)
        return out
    return sorted(useful, key=lambda t: t.estimate.peak)[:1]


def run_line(run) -> str:
    """The one line ``prefopt train`` prints once its data is tokenized (a :class:`prefopt.train.Run`
    after ``load_data``): the plan of this very run, on its processes and engine."""
    from accelerate.utils import DistributedType

    from prefopt.sharding import zero_stage

    acc = run.accelerator
    if acc.distributed_type == DistributedType.FSDP or zero_stage(acc) == 3:
        sharding = "zero3"
    elif acc.distributed_type == DistributedType.DEEPSPEED:
        sharding = "zero2"
    else:
        sharding = "ddp"
    return plan_line(run.cfg, run.data.train, num_processes=acc.num_processes, sharding=sharding,
                     host=acc.device.type == "cpu")
