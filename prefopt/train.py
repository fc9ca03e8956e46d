"""The training loop: DPO and its family (and SFT, and KTO) on accelerate.

One function, :func:`train`, reads top to bottom as the recipe: set up the run
directory, load data and models, settle the reference, then loop over optimizer steps.
Each step takes ``grad_accum`` micro-batches, normalises the loss over every pair of
the accumulated global batch (not per micro-batch), skips non-finite updates, logs the
metrics averaged over the window and across processes, and checkpoints atomically.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import pickle
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from safetensors import SafetensorError

from prefopt import checkpoint as ckpt
from prefopt.atomic import atomic_path
from prefopt.atomic import write_text as atomic_write_text
from prefopt.batching import PackedBatch, collate, prompt_groups, split_rows
from prefopt.config import TrainConfig, validate
from prefopt.errors import CheckpointError, ConfigError, TrainingError
from prefopt.inputs import Examples, prepare_examples
from prefopt.fastpath import (
    FastPaths,
    apply_patches,
    cached_decide,
    check_key,
    check_rows,
    config_digest,
    requested_features,
    settings_from,
    versions,
)
from prefopt.layers import rebuild_norm_outputs, trimmed_mlp
from prefopt.moe import moe_routing
from prefopt.logprobs import CompletionLogpsModel, SeqLogps, completion_logps
from prefopt.losses import (
    LossOutput,
    LossParams,
    PairLogps,
    check_loss_options,
    compute_loss,
    derive_pairs,
    k_pair_loss,
    kto_loss,
    ld_logps,
    needs_reference,
    plackett_luce_loss,
    wpo_pair_weights,
)
from prefopt.modeling import (
    DTYPES,
    apply_lora,
    check_exists,
    count_parameters,
    is_adapter_dir,
    load_adapter_model,
    load_causal_lm,
    load_tokenizer,
    prepare_kbit,
)
from prefopt.reference import (
    AdapterDisabledReference,
    CachedReference,
    ModelReference,
    cache_key,
    default_cache_dir,
    hash_buffers,
    hash_examples,
    hash_weights,
)
from prefopt.sharding import fill_engine_config, gathered_state_dict, process_group_handlers, true_dim, whole_model_loading, zero_stage

log = logging.getLogger("prefopt")

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")


# ---------------------------------------------------------------------------- setup


def job_mode(cfg: TrainConfig) -> str:
    """'sft' (one completion, no reference), 'kto' (unpaired) or 'pairs'."""
    if "kto" in cfg.loss_type:
        if len(cfg.loss_type) > 1:
            raise ConfigError("--loss-type: kto trains on unpaired data and cannot be combined with other losses")
        return "kto"
    if cfg.loss_type == ["sft"]:
        return "sft"
    return "pairs"


def loss_params(cfg: TrainConfig) -> LossParams:
    """The loss options of ``cfg``; an option left unset (None) keeps the loss's default."""
    names = LossParams.__dataclass_fields__
    return LossParams(**{k: v for k, v in cfg.to_dict().items() if k in names and v is not None})


def bco_running_delta(cfg: TrainConfig) -> bool:
    """BCO's reward shift is the running mean of the rewards (arXiv 2404.04656) unless given."""
    return "bco_pair" in cfg.loss_type and cfg.bco_delta is None


def update_bco_delta(state: dict, reward_mean: float) -> None:
    """Running mean over steps of each step's mean reward (chosen and rejected, all processes).

    Kept in the trainer state, so a checkpoint carries it and a resume continues it."""
    n = state.get("bco_count", 0) + 1
    delta = state.get("bco_delta", 0.0)
    state["bco_delta"] = delta + (reward_mean - delta) / n
    state["bco_count"] = n


def prepare_output_dir(cfg: TrainConfig, accelerator: Accelerator) -> Path:
    """Refuse to mix two runs in one directory unless told to overwrite or resume."""
    if not cfg.output_dir:
        raise ConfigError("--output-dir is required")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a directory")
    # config.yaml alone is a start that failed before training (bad data, missing model): retrying must work
    existing = [m for m in RUN_MARKERS if m != "config.yaml" and (out / m).exists()]
    if existing and cfg.resume is None:
        if not cfg.overwrite:
            raise ConfigError(f"--output-dir {out} already holds a run ({', '.join(existing)}); pass --resume latest "
                              "to continue it or --overwrite to replace it")
        if accelerator.is_main_process:
            for m in (*RUN_MARKERS, "rejected_rows.jsonl", "eval_results.json", "trackers"):
                p = out / m
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    accelerator.wait_for_everyone()  # every process has looked before the main one writes
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        except OSError as e:
            raise ConfigError(f"--output-dir {out}: cannot write there ({e.strerror})") from None
    accelerator.wait_for_everyone()
    return out


def _score_fn(cfg: TrainConfig, num_completions: int):
    """(model, batch) -> per-sequence log-probs, LD-DPO-weighted when asked."""

    def score(model, batch: PackedBatch) -> torch.Tensor:
        seq = completion_logps(model, batch, chunk_size=cfg.lm_head_chunk_size, full_head=cfg.full_lm_head)
        return effective_logps(seq, batch, cfg, num_completions)

    return score


def effective_logps(seq: SeqLogps, batch: PackedBatch, cfg: TrainConfig, num_completions: int) -> torch.Tensor:
    """Summed log-probs, or LD-DPO's (arXiv 2409.06411) length-desensitised sums for pairs."""
    if cfg.ld_alpha is None or num_completions != 2:
        return seq.logps
    public = torch.minimum(seq.tokens[0::2], seq.tokens[1::2]).repeat_interleave(2)
    return ld_logps(seq.token_logps, batch.token_seq, batch.token_pos, public, cfg.ld_alpha)


def _chunks(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _collate_fn(examples, pad_id: int, cfg: TrainConfig, device=None):
    """Index list -> PackedBatch, laid out as the config says (prefix sharing, packing), and on ``device``'s
    terms (:func:`one_row`)."""
    capacity = ONE_ROW if one_row(cfg, device) else None
    return lambda idx: collate([examples[j] for j in idx], pad_token_id=pad_id, prefix_sharing=cfg.prefix_sharing,
                               packing=cfg.packing, plain=cfg.plain_path, group_prompts=cfg.group_by_prompt,
                               capacity=capacity)


# A packed row's capacity that holds a whole micro-batch.
ONE_ROW = 1 << 62


def one_row(cfg: TrainConfig, device) -> bool:
    """Whether a micro-batch's segments are packed into a single row: on a GPU, with block attention
    through FlexAttention (:mod:`prefopt.flex`). Rows packed to the longest segment leave padding that
    the linear layers compute like any token (a quarter of the slots at batch 32 of gpu.py's lengths);
    one row has none beyond its last block, its block mask hides what crosses segments, and it is built
    without a dense mask. Anywhere else a row's dense mask would grow with the square of the batch.
    The fast-path check proves this layout too: with packing it also packs its rows into one."""
    from prefopt import flex
    from prefopt.attention import segment_kernel

    return rows_together(device) and block_attention_packed(cfg) and segment_kernel() == flex.NAME


def block_attention_packed(cfg: TrainConfig) -> bool:
    """The config's part of :func:`one_row`: packed rows through block attention on prefopt's masks."""
    return cfg.packing and cfg.block_attention and not cfg.plain_path


def grouped_order(examples, cfg: TrainConfig) -> list[int]:
    """Every example once, rows sharing a prompt next to each other (``--group-by-prompt``), for the
    no-grad passes; the plain index order otherwise."""
    if not cfg.group_by_prompt:
        return list(range(len(examples)))
    return [i for g in prompt_groups(examples) for i in g]


def batches(examples, order: list[int], batch_size: int, pad_id: int, cfg: TrainConfig, device=None):
    """Packed batches of ``examples`` in ``order`` (for the no-grad passes: reference, eval, scoring)."""
    return map(_collate_fn(examples, pad_id, cfg, device), _chunks(order, batch_size))


def _load_reference(run: "Run", name: str) -> torch.nn.Module:
    """A separate frozen reference model with the run's fast paths (no backward runs through it, so
    checkpointing and compile do not matter here); :func:`settle_reference` proves them for it. It
    is stored as the policy's weights are, and scores under the same autocast."""
    cfg = run.cfg
    with whole_model_loading(run.accelerator):
        ref = load_causal_lm(name, dtype=run.weight_dtype, attn_implementation=cfg.attn_implementation,
                             block_attention=cfg.block_attention, trust_remote_code=cfg.trust_remote_code)
    ref.to(run.accelerator.device)
    return ref


# The fast paths that shape the batch itself, which the policy and a live reference share.
LAYOUT_FEATURES = ("masks", "prefix_sharing", "packing")


def router_aux_wanted(cfg: TrainConfig, model: torch.nn.Module) -> bool:
    """--router-aux-loss-coef applies to mixture-of-experts models; elsewhere it is said to do nothing."""
    if cfg.router_aux_loss_coef <= 0:
        return False
    if moe_routing(model.config) is None:
        log.warning("--router-aux-loss-coef is ignored: %s has no expert router", type(model).__name__)
        return False
    return True


def check_split(cfg: TrainConfig, mode: str, sharded: bool, device=None) -> bool:
    """Whether the training loop runs micro-batches row by row (see :func:`row_parts`)."""
    return not (mode == "kto" or BATCH_COUPLED_LOSSES & set(cfg.loss_type) or sharded or rows_together(device))


def rows_together(device) -> bool:
    """On a GPU a micro-batch's packed rows run in one forward: one launch per row would leave the device
    idle, and the rows hold no more than the padded batch of a plain trainer (packing only shortens
    them). A CPU runs them one by one: no padding, one row's activations alive at a time."""
    return device is not None and torch.device(device).type == "cuda"


def settle_fast_paths(cfg: TrainConfig, model: torch.nn.Module, data: Examples, pad_id: int, *, device,
                      requested: dict[str, bool], with_grad: bool, split: bool, weights_digest: str | None = None,
                      accelerator=None, autocast: torch.dtype | None = None,
                      everyone: bool = False) -> tuple[TrainConfig, FastPaths]:
    """Prove the requested fast paths on ``model`` (see :mod:`prefopt.fastpath`), leave it patched as
    decided, and return the config with the decision in it.

    Over several processes the main one checks and the others take its decision (their copies may
    not even hold the weights yet, as with FSDP's low-memory loading); with ``everyone`` all check
    (ZeRO-3, where every forward is a collective) and still take the main one's decision."""
    multi = accelerator is not None and accelerator.num_processes > 1
    fast = None
    if not multi or everyone or accelerator.is_main_process:
        fast = _decide(cfg, model, data, pad_id, device=device, requested=requested, with_grad=with_grad,
                       split=split, weights_digest=weights_digest, autocast=autocast)
    if multi:
        from accelerate.utils import broadcast_object_list

        fast = broadcast_object_list([fast])[0]
        fast.features = apply_patches(model, fast.features)
    return replace(cfg, **settings_from(fast.features)), fast


def _decide(cfg, model, data, pad_id, *, device, requested, with_grad, split, weights_digest, autocast):
    if not cfg.fast_path_check:
        return FastPaths(features=apply_patches(model, requested), architecture=type(model).__name__,
                         dtype=cfg.dtype)
    rows = check_rows(data.train + data.eval)
    compute = autocast or DTYPES[cfg.dtype]
    cache_file = None
    if cfg.ref_cache:
        weights_digest = weights_digest or hash_weights(model)
        key = check_key(weights_digest, model, rows, requested, with_grad=with_grad, split=split,
                        chunk=cfg.lm_head_chunk_size, dtype=str(compute), autocast=str(autocast))
        cache_file = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / "fastpath" / f"{key}.json"
    return cached_decide(model, rows, requested, cache_file=cache_file, pad_id=pad_id, with_grad=with_grad,
                         split=split, chunk_size=cfg.lm_head_chunk_size, device=device, dtype=compute,
                         autocast=autocast)


def announce(fast: FastPaths) -> str:
    return fast.describe() + (" [cached]" if fast.cached else f" [checked in {fast.seconds:.1f} s]")


def _amp(score, accelerator):
    """``score`` under the run's autocast, so a reference computes in the policy's precision."""

    def scored(model, batch: PackedBatch) -> torch.Tensor:
        with accelerator.autocast():
            return score(model, batch)

    return scored


def _policy_score(cfg: TrainConfig, num_completions: int):
    """(prepared policy, batch) -> per-sequence log-probs, through the engine's own forward: under
    FSDP and ZeRO-3 only that gathers the weights, and under accelerate's mixed precision it is the
    forward wrapped in the run's autocast."""

    def score(policy, batch: PackedBatch) -> torch.Tensor:
        return effective_logps(policy(batch), batch, cfg, num_completions)

    return score


def build_reference(run: "Run") -> None:
    """Set ``run.ref_train`` and ``run.ref_eval`` (None for reference-free training).

    Runs after ``accelerator.prepare``: a cached reference of the policy's own starting weights is
    scored through the prepared policy itself (adapters off, when LoRA was just added), so it is
    computed in exactly the precision and layout the policy's step 0 is, each process scoring its
    share; a separate reference model is checked on its own (without gradients) and scores in
    whatever layout it proves, under the run's autocast."""
    cfg, accelerator, data = run.cfg, run.accelerator, run.data
    if run.mode == "sft" or not needs_reference(cfg.loss_type, cfg.reference_free):
        if cfg.ref_model and "ref_model" in run.explicit:
            log.warning("--ref-model is ignored: %s needs no reference model, so none is loaded",
                        "+".join(cfg.loss_type) + (" with --reference-free" if cfg.reference_free else ""))
        return
    separate = cfg.ref_model is not None and cfg.ref_model != cfg.model
    n_comp, pad_id = run.n_comp, run.pad_id
    fresh_lora = cfg.lora_r > 0 and not run.adapter
    if cfg.ref_cache and cfg.ref_sync == "none":
        if separate:
            ref, ref_cfg = settle_reference(run)
            model, score, weights, extra_model = ref, _amp(_score_fn(ref_cfg, n_comp), accelerator), \
                hash_weights(ref), ref
        else:
            ref_cfg = cfg
            model, score, weights, extra_model = run.policy, _policy_score(cfg, n_comp), run.weights_digest, \
                run.base_model
        extra = {"dtype": cfg.dtype, "weights_dtype": run.weight_dtype, "ld_alpha": cfg.ld_alpha,
                 "precision": run.precision_label, "config": config_digest(extra_model), "env": versions(),
                 "buffers": hash_buffers(extra_model), "attn": getattr(extra_model.config, "_attn_implementation", None),
                 "fast_paths": settings_from(requested_features(ref_cfg)),
                 "trim_last_layer": trimmed_mlp(extra_model) is not None}
        adapters_off = run.model.disable_adapter() if fresh_lora and not separate else contextlib.nullcontext()
        tables = []
        with adapters_off:
            for examples in (data.train, data.eval):
                tables.append(reference_table(run, model, score, examples, ref_cfg, weights, extra,
                                              collective=run.sharded and not separate) if examples else None)
        run.ref_train, run.ref_eval = tables
        return
    if fresh_lora and not separate:
        run.ref_train = run.ref_eval = AdapterDisabledReference(run.policy, _policy_score(cfg, n_comp),
                                                                adapters=run.model)
        return
    if not separate:
        live = ModelReference(_load_reference(run, cfg.model), _amp(_score_fn(cfg, n_comp), accelerator))
        apply_patches(live.model, requested_features(cfg))
        run.ref_train = run.ref_eval = live
        return
    ref, ref_cfg = settle_reference(run)
    score = _amp(_score_fn(ref_cfg, n_comp), accelerator)
    device = accelerator.device
    if all(requested_features(ref_cfg)[k] == requested_features(cfg)[k] for k in LAYOUT_FEATURES) and \
            one_row(ref_cfg, device) == one_row(cfg, device):
        run.ref_train = run.ref_eval = ModelReference(ref, score)
        return
    # the reference proved a different layout: it re-lays each batch out from the examples themselves
    run.ref_train, run.ref_eval = (ModelReference(ref, _relaid(score, examples, pad_id, ref_cfg, device))
                                   for examples in (data.train, data.eval))


def reference_table(run: "Run", model, score, examples, ref_cfg: TrainConfig, weights: str, extra: dict, *,
                    collective: bool) -> CachedReference:
    """The reference log-probs of ``examples``, from the cache or computed with each process scoring
    every N-th batch and all gathering the table. ``collective``: each forward is a collective
    (FSDP, ZeRO-3), so every process runs as many, whole batches, padded with a filler batch."""
    cfg, accelerator = run.cfg, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    key = cache_key(weights, run.digest(examples), extra)
    path = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / "ref_logps" / f"{key}.safetensors"
    size = cfg.eval_batch_size or max(cfg.batch_size * 4, 8)
    chunks = _chunks(grouped_order(examples, ref_cfg), size)
    layout = _collate_fn(examples, run.pad_id, ref_cfg, accelerator.device)
    hit = path.exists()
    if world > 1:
        from accelerate.utils import broadcast_object_list

        hit = broadcast_object_list([hit])[0]  # the main process's view: all must take the same branch
    table, hit = CachedReference.build(
        model, map(layout, chunks[rank::world]), len(examples), run.n_comp, score, cache_file=path,
        device=accelerator.device, split=not (collective or rows_together(accelerator.device)), forwards=math.ceil(len(chunks) / world) if collective else 0,
        filler=layout(chunks[0]) if collective else None, gather=_gather_rows if world > 1 else None, write=accelerator.is_main_process, hit=hit)
    accelerator.wait_for_everyone()  # the file is whole before any process goes on
    accelerator.print(f"reference log-probs: {'loaded from cache' if hit else 'computed and cached'} "
                      f"({len(examples)} examples) {path}")
    return table


def _gather_rows(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's (example index, log-probs), joined."""
    from accelerate.utils import gather_object

    parts = gather_object([(index, values)])
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def settle_reference(run: "Run"):
    """Load a separate reference model and prove the run's fast paths on it (no gradients)."""
    cfg, accelerator = run.cfg, run.accelerator
    ref = _load_reference(run, cfg.ref_model)
    ref_cfg, fast = settle_fast_paths(cfg, ref, run.data, run.pad_id, device=accelerator.device,
                                      requested=requested_features(cfg, zero3=zero_stage(accelerator) == 3),
                                      with_grad=False, split=False, accelerator=accelerator,
                                      autocast=run.autocast_dtype)
    accelerator.print("reference " + announce(fast))
    return ref, ref_cfg


def _relaid(score, examples, pad_id: int, cfg: TrainConfig, device):
    layout = _collate_fn(examples, pad_id, cfg, device)

    def relaid(model, batch: PackedBatch) -> torch.Tensor:
        again = layout(batch.example_index.tolist()).to(batch.input_ids.device)
        return score(model, again)

    return relaid


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_tracker(report_to: str) -> None:
    """Fail before any model is loaded when the chosen tracker's package is missing."""
    package = TRACKER_PACKAGES.get(report_to)
    if package is None:
        return
    import importlib.util

    if importlib.util.find_spec(package) is None and not (
            report_to == "tensorboard" and importlib.util.find_spec("tensorboardX") is not None):
        raise ConfigError(f"--report-to {report_to}: the '{package}' package is not installed "
                          f"(pip install {package})")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with weight decay on matrices (weights, embeddings) only.

    Decaying biases and norm scales pulls them towards zero for no regularisation benefit; like
    most trainers (nanoGPT's rule: decay tensors of two or more dimensions) they are left alone.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    # true_dim: ZeRO-3 hands each rank a flat 1-D slice of every weight
    return [g for g in ({"params": [p for p in params if true_dim(p) >= 2], "weight_decay": weight_decay},
                        {"params": [p for p in params if true_dim(p) < 2], "weight_decay": 0.0}) if g["params"]]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.learning_rate)
    # The fused kernel (CPU and CUDA) does the whole update in one pass over each tensor: same
    # AdamW, a fraction of the memory traffic of the per-tensor loop (which is torch's CPU default).
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def flat_adamw_state(optimizer: torch.optim.Optimizer) -> int:
    """Give AdamW its moment buffers now, as one allocation per device and dtype; return the count.

    torch creates them lazily in the first step, a pair of tensors per parameter, dropped into
    the heap holes that step's activations left. Twice the model's size of long-lived state
    scattered through glibc's heap keeps the space between the pieces from coalescing, so later
    activations grow the heap instead (benchmark: ~15 MiB of peak RSS). One block is also above
    malloc's mmap threshold, so it sits outside the heap altogether. The values are what torch
    would create (zeros and step 0; a state loaded from a checkpoint is copied in), so the
    update is unchanged: ``test_flat_adamw_state_changes_no_number`` compares with plain AdamW.
    Non-contiguous parameters, and optimizers other than AdamW, keep torch's own lazy state.
    """
    if type(optimizer) is not torch.optim.AdamW:
        return 0
    todo: dict[tuple[torch.device, torch.dtype], list[tuple[dict, torch.Tensor]]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.is_contiguous():
                todo.setdefault((p.device, p.dtype), []).append((group, p))
    names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    count = 0
    for (device, dtype), items in todo.items():
        width = sum(p.numel() * (3 if g["amsgrad"] else 2) for g, p in items)
        block = torch.zeros(width, device=device, dtype=dtype)
        offset = 0
        for group, p in items:
            state = optimizer.state[p]
            if "step" not in state:  # as torch.optim.Adam._init_group makes it
                on_device = group["fused"] or group["capturable"]
                step_dtype = torch.float32 if group["fused"] or torch.get_default_dtype() != torch.float64 \
                    else torch.float64
                state["step"] = torch.zeros((), dtype=step_dtype, device=p.device if on_device else "cpu")
            for name in names[:3 if group["amsgrad"] else 2]:
                view = block[offset:offset + p.numel()].view_as(p)
                if name in state:
                    view.copy_(state[name])
                state[name] = view
                offset += p.numel()
            count += 1
    return count


def lr_multiplier(kind: str, warmup: int, total: int, step: int) -> float:
    """The learning-rate factor at ``step``: linear warmup from 0 over ``warmup`` steps, then
    constant, linear decay to 0 at ``total``, or half a cosine to 0 at ``total``.

    The same curves as transformers' ``get_scheduler`` (a test checks it), written out because
    importing that function pulls in ``transformers.trainer_utils`` and with it all of peft
    (about 2 s of imports on this machine) on every run, LoRA or not.
    """
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / span)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span)))
    raise ValueError(f"unknown learning-rate schedule {kind!r}")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_multiplier, cfg.lr_scheduler, warmup, total))


def epoch_order(n: int, epoch: int, cfg: TrainConfig, groups: list[list[int]] | None = None) -> list[int]:
    """The example order of one epoch: depends only on (seed, epoch), so a resume replays it.

    ``groups`` (rows sharing a prompt, see :func:`prefopt.batching.prompt_groups`): the groups are
    shuffled, each kept whole, so a prompt's rows land in one micro-batch where they fit."""
    if groups is not None and len(groups) < n:
        order = epoch_order(len(groups), epoch, cfg)
        return [i for g in order for i in groups[g]]
    if not cfg.shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ---------------------------------------------------------------------------- one step


@dataclass
class StepStats:
    """Sums over the pairs of an accumulation window; divided by the pair count when logged."""

    sums: dict[str, float] = field(default_factory=dict)
    pairs: float = 0.0
    real_tokens: int = 0

    def add(self, name: str, total: torch.Tensor | float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(total)


# Losses that compare pairs with each other across the batch (AOT sorts margins over it).
BATCH_COUPLED_LOSSES = {"aot", "aot_unpaired", "aot_pair"}
# Engines that shard parameters and gather them in sub-module hooks, counting or reducing per backward.
SHARDING_ENGINES = (DistributedType.DEEPSPEED, DistributedType.FSDP)


def row_parts(batch: PackedBatch, cfg: TrainConfig, mode: str, accelerator: Accelerator) -> list[PackedBatch]:
    """Split a micro-batch into its packed rows when that changes no number.

    Forward + backward row by row keeps one row's activations alive instead of the whole
    micro-batch's and drops padding; gradients add up to the same sum, since each pair's
    loss depends on that pair only. Not for KTO (its KL estimate spans the batch), AOT
    (sorts over the batch), DeepSpeed/FSDP (which count or shard per backward), or on a GPU
    (:func:`rows_together`).
    """
    if not check_split(cfg, mode, accelerator.distributed_type in SHARDING_ENGINES, accelerator.device):
        return [batch]
    return split_rows(batch)


def forward_loss(policy: CompletionLogpsModel, batch: PackedBatch, reference, cfg: TrainConfig, mode: str,
                 params: LossParams, mean_across_processes=None) -> tuple[torch.Tensor, LossOutput, PairLogps]:
    """Per-pair losses for one micro-batch (policy forward with grad, reference without).

    ``policy`` is the (possibly DDP/FSDP-wrapped) :class:`CompletionLogpsModel`.
    ``mean_across_processes(sum, count)`` averages KTO's KL estimate over every process's rows.
    """
    seq = policy(batch, with_wpo=cfg.wpo_weighting)
    losses, out, pairs = _pair_losses(seq, batch, reference, cfg, mode, params, mean_across_processes)
    if seq.aux_loss is not None:  # MoE routers: added to the loss in the step, weighted by the batch's pairs
        out.metrics["aux_loss"] = seq.aux_loss
    return losses, out, pairs


def _pair_losses(seq: SeqLogps, batch: PackedBatch, reference, cfg: TrainConfig, mode: str, params: LossParams,
                 mean_across_processes=None) -> tuple[torch.Tensor, LossOutput, PairLogps]:
    n_comp = batch.num_completions
    pol = effective_logps(seq, batch, cfg, n_comp).view(-1, n_comp)
    tok = seq.tokens.view(-1, n_comp)
    ref = None
    if reference is not None:
        ref = reference.logps(batch).to(pol.device).view(-1, n_comp)
    if mode == "sft":
        pairs = PairLogps(pol[:, 0], pol[:, 0], tok[:, 0], tok[:, 0])
        out = compute_loss(["sft"], None, pairs, None, params)
        return out.losses, out, pairs
    if mode == "kto":
        pairs = PairLogps(pol[:, 0], pol[:, 1], tok[:, 0], tok[:, 1])
        ref_own, ref_kl = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
        terms = (pol[:, 1] - (ref_kl if ref_kl is not None else 0.0)).detach()
        kl = mean_across_processes(terms.sum(), terms.numel()) if mean_across_processes is not None \
            else terms.mean()
        out = kto_loss(pol[:, 0], ref_own, batch.labels, pol[:, 1], ref_kl, params, kl=kl)
        return out.losses, out, pairs
    if batch.scores is not None:
        return ranked_losses(pol, ref, tok, batch.scores.to(pol.device), cfg, params)
    pairs = PairLogps(pol[:, 0], pol[:, 1], tok[:, 0], tok[:, 1])
    ref_pair = PairLogps(ref[:, 0], ref[:, 1], tok[:, 0], tok[:, 1]) if ref is not None else None
    weights = None
    if cfg.wpo_weighting:
        logw = seq.wpo_logw.view(-1, n_comp)
        weights = wpo_pair_weights(logw[:, 0], logw[:, 1])
    out = compute_loss(cfg.loss_type, cfg.loss_weights, pairs, ref_pair, params, sample_weights=weights)
    return out.losses, out, pairs


# K-answer metrics that repeat what rewards/chosen (the best answer) and rewards/rejected (the worst) say.
_K_DUPLICATES = ("rewards/best", "rewards/worst", "rewards/margin")


def ranked_losses(pol: torch.Tensor, ref: torch.Tensor | None, tok: torch.Tensor, scores: torch.Tensor,
                   cfg: TrainConfig, params: LossParams) -> tuple[torch.Tensor, LossOutput, PairLogps]:
    """Per-prompt losses for K answers per prompt: Plackett-Luce, or a pairwise loss over the derived pairs.

    What the loop logs keeps the pairwise names: ``rewards/chosen`` and ``logps/chosen`` are the best
    answer's, ``rewards/rejected`` and ``logps/rejected`` the worst's (the first of those tied), and
    ``rewards/kendall_tau`` / ``rewards/pair_accuracy`` say how well the implicit rewards rank all K."""
    valid = ~torch.isnan(scores)
    filled = scores.nan_to_num(0.0)
    if cfg.loss_type == ["plackett_luce"]:
        k = plackett_luce_loss(pol, ref, filled, valid, params)
    else:
        k = k_pair_loss(pol, ref, filled, valid, params, pairing=cfg.k_pairing, loss_types=cfg.loss_type,
                        loss_weights=cfg.loss_weights, tokens=tok, weighting=cfg.k_weighting)
    rows = torch.arange(scores.shape[0], device=scores.device)
    best = filled.masked_fill(~valid, -math.inf).argmax(dim=1)    # argmax/argmin return the first extreme
    worst = filled.masked_fill(~valid, math.inf).argmin(dim=1)
    metrics = {n: v for n, v in k.metrics.items() if n not in _K_DUPLICATES}
    out = LossOutput(losses=k.losses, chosen_rewards=k.rewards[rows, best], rejected_rewards=k.rewards[rows, worst],
                     metrics=metrics)
    return k.losses, out, PairLogps(pol[rows, best], pol[rows, worst], tok[rows, best], tok[rows, worst])


def loss_units(batch: PackedBatch, cfg: TrainConfig) -> float:
    """What a batch's summed loss is divided by: its examples, or, for K-answer data with
    ``--k-weighting pair``, its derived pairs (so every pair of the global batch weighs the same)."""
    if batch.scores is None or cfg.k_weighting != "pair" or cfg.loss_type == ["plackett_luce"]:
        return float(batch.num_examples)
    valid = ~torch.isnan(batch.scores)
    return float(derive_pairs(batch.scores.nan_to_num(0.0), valid, cfg.k_pairing).num_pairs.sum())


def record(stats: StepStats, out: LossOutput, policy: PairLogps, losses: torch.Tensor, mode: str,
           labels: torch.Tensor | None, units: float | None = None) -> None:
    n = losses.numel()
    stats.pairs += n
    stats.add("loss", losses.detach().sum())
    stats.add("loss_units", n if units is None else units)  # the loss is per unit: a pair, or a K-answer prompt
    stats.add("logps/chosen", policy.chosen.detach().sum())
    stats.add("logps/rejected", policy.rejected.detach().sum())
    if mode == "kto":
        d = labels.bool()
        stats.add("kto/desirable", d.sum())
        stats.add("kto/undesirable", (~d).sum())
        # kto_loss returns the rewards of desirable rows and of undesirable rows separately
        stats.add("rewards/chosen@kto", out.chosen_rewards.sum())
        stats.add("rewards/rejected@kto", out.rejected_rewards.sum())
    elif mode == "pairs":
        margins = out.chosen_rewards - out.rejected_rewards
        stats.add("rewards/chosen", out.chosen_rewards.sum())
        stats.add("rewards/rejected", out.rejected_rewards.sum())
        stats.add("rewards/margins", margins.sum())
        stats.add("rewards/accuracies", (margins > 0).float().sum())
    for name, value in out.metrics.items():
        stats.add(name, value.detach().float() * n)


def finish_stats(stats: StepStats, accelerator: Accelerator, *, agree_on_names: bool = False) -> dict[str, float]:
    """Average the window's sums over all pairs of all processes.

    ``agree_on_names``: processes may hold different metrics (one that saw no row holds none), so the
    names are gathered first and every process reduces a tensor of the same length."""
    names = sorted(stats.sums)
    if agree_on_names and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        names = sorted({n for part in gather_object([names]) for n in part})
    local = torch.tensor([stats.pairs, *[stats.sums.get(k, 0.0) for k in names]], dtype=torch.float64,
                         device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").tolist()
    pairs = max(total[0], 1.0)
    out = {k: v / pairs for k, v in zip(names, total[1:])}
    if "loss_units" in out:
        out["loss"] = out["loss"] / max(out.pop("loss_units"), 1e-12)
    if "kto/desirable" in out:  # KTO rewards average over their own rows, not all rows
        d, u = out.pop("kto/desirable") * pairs, out.pop("kto/undesirable") * pairs
        out["rewards/chosen"] = out.pop("rewards/chosen@kto") * pairs / max(d, 1.0)
        out["rewards/rejected"] = out.pop("rewards/rejected@kto") * pairs / max(u, 1.0)
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, examples, reference, cfg: TrainConfig, mode: str, params: LossParams, accelerator,
             pad_id: int) -> dict[str, float]:
    """Loss and reward metrics over held-out examples (each process takes a share).

    Every process runs the same number of forwards (each one is a collective under FSDP and ZeRO-3):
    a process whose share is shorter runs its missing batches on the first example and records none."""
    was_training = model.training
    model.eval()
    stats = StepStats()
    batch_size = cfg.eval_batch_size or cfg.batch_size
    n = accelerator.num_processes
    order = grouped_order(examples, cfg)[accelerator.process_index::n]
    rounds = math.ceil(math.ceil(len(examples) / n) / batch_size)
    layout = _collate_fn(examples, pad_id, cfg, accelerator.device)
    for k in range(rounds):
        chunk = order[k * batch_size:(k + 1) * batch_size]
        batch = layout(chunk or [0]).to(accelerator.device)
        losses, out, policy = forward_loss(model, batch, reference, cfg, mode, params)
        if chunk:
            record(stats, out, policy, losses, mode, batch.labels, loss_units(batch, cfg))
    model.train(was_training)
    return {f"eval/{k}": v for k, v in finish_stats(stats, accelerator, agree_on_names=True).items()}


# ---------------------------------------------------------------------------- the loop


# What fixes the data position of a checkpoint: the order of the examples and how many a step takes.
RUN_SETTINGS = {"batch_size": "--batch-size", "grad_accum": "--grad-accum", "num_processes": "the number of processes",
                "max_length": "--max-length", "max_prompt_length": "--max-prompt-length", "seed": "--seed",
                "shuffle": "--shuffle", "group_by_prompt": "--group-by-prompt",
                "data": "the training data (its token ids)"}


def run_signature(cfg: TrainConfig, num_processes: int, train_digest: str) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (see :func:`check_same_run`)."""
    return {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "num_processes": num_processes,
            "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "seed": cfg.seed,
            "shuffle": cfg.shuffle, "group_by_prompt": cfg.group_by_prompt and cfg.prefix_sharing,
            "data": train_digest}


def check_same_run(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose data position would land elsewhere: a checkpoint counts micro-batches of
    this batch size, over this many processes, in this order of these examples."""
    before = saved.get("run")
    if before is None:  # a checkpoint written before prefopt recorded these
        return
    for key, name in RUN_SETTINGS.items():
        if key in before and before[key] != now[key]:
            shown = ("changed" if key == "data" else f"was {before[key]!r}, now {now[key]!r}")
            raise ConfigError(f"--resume {path}: {name} {shown}; the checkpoint's data position would land on "
                              "other examples. Resume with the checkpoint's settings or start a new run "
                              "(--overwrite or another --output-dir)")


def total_steps(cfg: TrainConfig, n_examples: int, num_processes: int) -> tuple[int, int]:
    """(optimizer steps, micro-batches per process per epoch)."""
    batches = math.ceil(n_examples / cfg.batch_size)
    per_process = math.ceil(batches / num_processes)
    if cfg.max_steps is not None:
        return cfg.max_steps, per_process
    return max(1, math.ceil(cfg.epochs * per_process / cfg.grad_accum)), per_process


def _microbatches(examples, cfg: TrainConfig, pad_id: int, accelerator, start_epoch: int, skip: int):
    """Endless stream of (micro-batch, real) for this process, skipping ``skip`` micro-batches first.

    Each epoch's batches are dealt round-robin over the processes (as accelerate's batch sampler
    shards them). A process whose share runs out before the others' gets a filler batch with
    ``real`` False: it runs the forward and backward every other process runs (each is a collective
    under DDP's last micro-batch, FSDP and ZeRO-3) and its loss is multiplied by zero, so nothing is
    trained twice (accelerate's even batches would repeat the first examples instead)."""
    layout = _collate_fn(examples, pad_id, cfg, accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    groups = prompt_groups(examples) if cfg.group_by_prompt and cfg.prefix_sharing else None
    epoch = start_epoch
    while True:
        chunks = _chunks(epoch_order(len(examples), epoch, cfg, groups), cfg.batch_size)
        mine = chunks[rank::world]
        for i in range(skip, math.ceil(len(chunks) / world)):
            real = i < len(mine)
            yield layout(mine[i] if real else chunks[0]).to(accelerator.device), real
        skip = 0
        epoch += 1


# ---------------------------------------------------------------------------- the run, in stages


@dataclass
class Run:
    """What the stages of :func:`train` share, filled in stage by stage."""

    cfg: TrainConfig
    explicit: set[str]
    mode: str
    params: LossParams
    accelerator: Accelerator
    out_dir: Path
    resume_path: Path | None
    weight_dtype: str                       # how the weights are stored (float32 under mixed precision)
    adapter: bool                           # continuing an existing LoRA adapter
    tokenizer: Any = None
    data: Examples | None = None
    base_model: torch.nn.Module | None = None   # the transformers model, before LoRA
    model: torch.nn.Module | None = None        # what is trained: the transformers or peft model
    policy: torch.nn.Module | None = None       # its CompletionLogpsModel, as accelerate prepared it
    fast: FastPaths | None = None
    weights_digest: str | None = None
    ref_train: Any = None
    ref_eval: Any = None
    optimizer: Any = None
    scheduler: Any = None
    steps: int = 0
    per_epoch: int = 0
    warmup: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)

    def digest(self, examples) -> str:
        """The token ids' digest of the train or eval examples, taken once (the reference cache's key
        and the resume check both need the training data's)."""
        if id(examples) not in self.digests:
            self.digests[id(examples)] = hash_examples(examples)
        return self.digests[id(examples)]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def n_comp(self) -> int:
        return len(self.data.train[0].completions)

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: they gather weights in hooks and own the optimizer state."""
        return self.accelerator.distributed_type in SHARDING_ENGINES

    @property
    def zero3(self) -> bool:
        return zero_stage(self.accelerator) == 3

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype accelerate's autocast computes in (None: none); DeepSpeed casts the weights instead."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.accelerator.mixed_precision))

    @property
    def precision_label(self) -> str:
        return f"{self.weight_dtype}/{self.accelerator.mixed_precision}/{self.accelerator.distributed_type}"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"


def storage(cfg: TrainConfig, adapter: bool) -> tuple[str, str | None]:
    """(dtype the weights are stored in, the mixed precision to ask accelerate for).

    bfloat16 or float16 training keeps float32 master weights and optimizer state and computes under
    autocast (the usual recipe): stored in bf16, a weight moves only when the update exceeds about
    1/256 of it, so at DPO's learning rates almost nothing would. A frozen base (LoRA, QLoRA) needs
    no master copy and stays in the low dtype; peft keeps the adapters in float32. float32 leaves
    the choice to the launcher (an accelerate config's ``mixed_precision``)."""
    if cfg.dtype == "float32":
        return "float32", None
    mixed = {"bfloat16": "bf16", "float16": "fp16"}[cfg.dtype]
    if cfg.pure_low_precision:
        return cfg.dtype, "no"
    if cfg.lora_r > 0 or cfg.load_in_4bit or adapter:
        return cfg.dtype, mixed
    return "float32", mixed


def start(cfg: TrainConfig, explicit: set[str] | None) -> Run:
    """Check the options, start accelerate, claim the output directory."""
    validate(cfg)
    explicit = set(explicit or ())
    mode = job_mode(cfg)
    params = loss_params(cfg)
    for warning in check_loss_options(cfg.loss_type, cfg.loss_weights, explicit, params):
        log.warning(warning)
    if cfg.ref_sync != "none" and not needs_reference(cfg.loss_type, cfg.reference_free):
        raise ConfigError("--ref-sync updates a reference model, but the chosen loss uses none")
    if not cfg.model:
        raise ConfigError("--model is required: a local model directory or a hub name")
    # an impossible --resume fails before anything is written or loaded
    resume_path = ckpt.resolve_resume(cfg.output_dir, cfg.resume) if cfg.resume and cfg.output_dir else None
    check_tracker(cfg.report_to)
    check_exists(cfg.model, "model")
    adapter = is_adapter_dir(cfg.model)
    weight_dtype, mixed = storage(cfg, adapter)
    _fresh_accelerate_state()
    # gradient_accumulation_steps reaches DeepSpeed's config; the accumulation itself is ours (see the step)
    accelerator = Accelerator(log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_dir=cfg.output_dir, gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision=mixed, kwargs_handlers=process_group_handlers(),
                              step_scheduler_with_optimizer=False)  # our step counts are already per process
    ckpt.check_process_group(accelerator)  # before anything is written: N lone trainers would share one directory
    fill_engine_config(accelerator, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm)
    if cfg.ref_sync != "none" and accelerator.distributed_type in SHARDING_ENGINES:
        raise ConfigError(f"--ref-sync {cfg.ref_sync}: TR-DPO copies the policy's weights into the reference, which "
                          f"under {accelerator.distributed_type.value} are slices on each process; it runs under "
                          "DDP or on one process")
    if cfg.pure_low_precision and cfg.dtype != "float32" and cfg.lora_r == 0 and not adapter:
        log.warning("--pure-low-precision: weights and optimizer state are stored in %s with no float32 copy; an "
                    "update smaller than about %s of a weight rounds away (AdamW's update is about the learning "
                    "rate, %g, per step: below ~1e-4 most weights never move)",
                    cfg.dtype, "1/256" if cfg.dtype == "bfloat16" else "1/2048", cfg.learning_rate)
    out_dir = prepare_output_dir(cfg, accelerator)
    set_seed(cfg.seed)
    return Run(cfg=cfg, explicit=explicit, mode=mode, params=params, accelerator=accelerator, out_dir=out_dir,
               resume_path=resume_path, weight_dtype=weight_dtype, adapter=adapter)


def _fresh_accelerate_state() -> None:
    """accelerate keeps one state per process and refuses a second Accelerator with another mixed
    precision; a single process that trains several times (a sweep, ``prefopt demo``, the tests)
    starts each run afresh. Under a launcher the state is the launch's and is kept."""
    if ckpt.launched_processes() == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)


def load_data(run: Run) -> None:
    cfg = run.cfg
    run.tokenizer = load_tokenizer(cfg.tokenizer_path or "", trust_remote_code=cfg.trust_remote_code,
                                   chat_template=cfg.chat_template)
    run.data = prepare_examples(cfg, run.tokenizer, run.mode,
                                run.out_dir if run.accelerator.is_main_process else None)
    run.accelerator.print(f"data: {run.data.summary}")
    check_ranked(cfg, run.data)


def check_ranked(cfg: TrainConfig, data: Examples) -> None:
    """Refuse the options that only make sense for one chosen/rejected pair per row on K-answer data.

    LD-DPO and WPO are defined on a pair's two completions, and the AOT losses sort per-pair
    values over the batch, which a per-prompt reduction cannot give them."""
    if not data.train or data.train[0].scores is None:
        return
    if cfg.ld_alpha is not None:
        raise ConfigError("--ld-alpha weights the tokens beyond the shorter of a pair's two completions; "
                          f"the data holds K answers per prompt ({data.fmt}), so it cannot be used")
    if cfg.wpo_weighting:
        raise ConfigError("--wpo-weighting weights one chosen/rejected pair by its probability; the data holds "
                          f"K answers per prompt ({data.fmt}), so it cannot be used")
    coupled = sorted(BATCH_COUPLED_LOSSES & set(cfg.loss_type))
    if coupled:
        raise ConfigError(f"--loss-type {', '.join(coupled)} sorts per-pair values over the batch and cannot be "
                          f"reduced per prompt; the data holds K answers per prompt ({data.fmt})")


def load_model(run: Run) -> None:
    """Load the policy and prove its fast paths (ZeRO-3: after prepare, see :func:`prepare`)."""
    cfg, accelerator = run.cfg, run.accelerator
    base_name = json.loads((Path(cfg.model) / "adapter_config.json").read_text())["base_model_name_or_path"] \
        if run.adapter else cfg.model
    model = load_causal_lm(base_name, dtype=run.weight_dtype, attn_implementation=cfg.attn_implementation,
                           block_attention=cfg.block_attention,
                           trust_remote_code=cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit)
    if run.adapter:
        if not cfg.ref_cache and cfg.ref_model is None:
            raise ConfigError("continuing an existing LoRA adapter uses its starting state as the reference, "
                              "which needs the reference cache: drop --no-ref-cache or give --ref-model")
        model = load_adapter_model(model, cfg.model, trainable=True)
    if not run.zero3:  # ZeRO-3 placed its slices itself
        model.to(accelerator.device)
    model = prepare_kbit(model, cfg.gradient_checkpointing)  # QLoRA: before the check and the reference
    run.base_model = run.model = model
    if cfg.ref_cache:
        run.weights_digest = policy_digest(run, model)
    if not run.zero3:
        settle_policy(run, model)


def policy_digest(run: Run, model: torch.nn.Module) -> str:
    """The starting weights' digest (the cache keys' core), taken where the weights are whole: on the
    main process (FSDP's low-memory loading leaves the others empty until prepare), or under ZeRO-3
    on every process, one gathered weight at a time."""
    accelerator = run.accelerator
    if run.zero3:
        return hash_weights(model)  # on every process: each gather is a collective
    digest = hash_weights(model) if accelerator.is_main_process else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        digest = broadcast_object_list([digest])[0]
    return digest


def settle_policy(run: Run, model: torch.nn.Module) -> None:
    cfg = run.cfg
    recomputing = cfg.gradient_checkpointing or cfg.compile  # they bring their own saved-tensor handling
    # FSDP/DeepSpeed gather weights in sub-module hooks, so no module is patched under them; checkpointing
    # would recompute the last layer without the trim's row list. Under ZeRO-3 the check runs without
    # gradients: its backward would fire the engine's reduce hooks (and no patched module is left there)
    requested = requested_features(cfg, sharded=run.sharded, recomputing=recomputing, zero3=run.zero3)
    run.cfg, run.fast = settle_fast_paths(
        cfg, model, run.data, run.pad_id, device=run.accelerator.device, requested=requested,
        with_grad=not run.zero3, split=check_split(cfg, run.mode, run.sharded, run.accelerator.device), weights_digest=run.weights_digest,
        accelerator=run.accelerator, autocast=run.autocast_dtype, everyone=run.zero3)
    run.accelerator.print(announce(run.fast))


def prepare(run: Run) -> None:
    """LoRA, checkpointing, the optimizer and schedule; accelerate wraps them for its engine."""
    cfg, accelerator = run.cfg, run.accelerator
    model = run.model
    if cfg.lora_r > 0 and not run.adapter:
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           target_modules=cfg.lora_target_modules, gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    run.model = model
    total, trainable = count_parameters(model)
    accelerator.print(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trained")
    run.steps, run.per_epoch = total_steps(cfg, len(run.data.train), accelerator.num_processes)
    policy = CompletionLogpsModel(model, cfg.lm_head_chunk_size, cfg.full_lm_head,
                                  router_aux=router_aux_wanted(cfg, model))
    optimizer = build_optimizer(cfg, policy)
    run.warmup = cfg.warmup_steps or int(cfg.warmup_ratio * run.steps)
    scheduler = build_scheduler(cfg, optimizer, run.warmup, run.steps)
    run.policy, run.optimizer, run.scheduler = accelerator.prepare(policy, optimizer, scheduler)
    if not run.sharded:
        flat_adamw_state(getattr(run.optimizer, "optimizer", run.optimizer))
    if run.zero3:  # the engine now gathers weights in its hooks: the check can run
        settle_policy(run, model)
        unwrapped = accelerator.unwrap_model(run.policy)
        unwrapped.full_head = run.cfg.full_lm_head


def compile_policy(run: Run) -> None:
    """After the reference pass: that runs without gradients and would compile a second graph."""
    if run.cfg.compile:
        run.model.get_decoder().compile()


def resume(run: Run) -> None:
    """Start the trainer state, or load it and the engine's from the checkpoint being resumed."""
    cfg, accelerator = run.cfg, run.accelerator
    run.state = {"step": 0, "micro_batches": 0, "pairs_seen": 0, "nonfinite_steps": 0, "nonfinite_in_a_row": 0,
                 "run": run_signature(cfg, accelerator.num_processes, run.digest(run.data.train))}
    if cfg.resume is None:
        if accelerator.is_main_process:
            run.metrics_path.write_text("")
        return
    path = run.resume_path
    check_same_run(ckpt.read_state(path), run.state["run"], path)
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError:
        raise CheckpointError(f"--resume {path}: cannot load this checkpoint: its optimizer or scheduler state "
                              "is damaged or holds more than plain tensors, and prefopt never unpickles arbitrary "
                              "objects; resume from an earlier checkpoint directory or start again") from None
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"--resume {path}: cannot load this checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not run.sharded:
        flat_adamw_state(getattr(run.optimizer, "optimizer", run.optimizer))  # the loaded state, back in one block
    run.state.update(ckpt.read_state(path))
    _truncate_metrics(run.metrics_path, run.state["step"], accelerator)
    ckpt.remove_newer(accelerator, run.out_dir, run.state["step"])  # they belong to the run being replaced
    accelerator.print(f"resumed from {path} at step {run.state['step']}")


def _kl_mean(accelerator, real: bool):
    """KTO's KL estimate averaged over every process's rows (a filler batch's count for nothing)."""

    def mean(total: torch.Tensor, count: int) -> torch.Tensor:
        both = torch.stack([total.float(), torch.tensor(float(count) if real else 0.0, device=total.device)])
        if not real:
            both = both * 0
        both = accelerator.reduce(both, reduction="sum")
        return both[0] / both[1].clamp_min(1.0)

    return mean


def step(run: Run, stream) -> tuple[dict[str, float], StepStats, list[PackedBatch], bool, int]:
    """One optimizer step over ``grad_accum`` micro-batches: (metrics, sums, parts, applied, pairs).

    The loss is summed over every pair of the accumulated global batch and divided by their number,
    not averaged per micro-batch. A non-finite loss or gradient skips the update; DeepSpeed steps
    inside its backward and skips a non-finite update itself, so there the engine is asked."""
    cfg, accelerator, policy = run.cfg, run.accelerator, run.policy
    params = run.params
    if bco_running_delta(cfg):
        params = replace(params, bco_delta=run.state.get("bco_delta", 0.0))
    micro = [next(stream) for _ in range(cfg.grad_accum)]
    local_pairs = torch.tensor(float(sum(loss_units(b, cfg) for b, real in micro if real)), device=accelerator.device)
    global_pairs = accelerator.reduce(local_pairs, reduction="sum").item()
    stats = StepStats()
    parts = [(part, real) for batch, real in micro for part in row_parts(batch, cfg, run.mode, accelerator)]
    rebuild_norms = cfg.lean_activations and not (cfg.gradient_checkpointing or cfg.compile)
    for i, (batch, real) in enumerate(parts):
        # Gradients are all-reduced (DDP) or stepped (DeepSpeed) only after the window's last micro-batch.
        sync = i == len(parts) - 1
        accelerator.sync_gradients = sync
        with accelerator.no_sync(policy) if not sync else contextlib.nullcontext():
            with rebuild_norm_outputs() if rebuild_norms else contextlib.nullcontext():
                losses, out, pol = forward_loss(policy, batch, run.ref_train, cfg, run.mode, params,
                                                _kl_mean(accelerator, real))
            # Sum over the window's pairs / all pairs of the global batch. DDP averages over processes and
            # accelerate (or DeepSpeed) divides by grad_accum, so both factors are put back here.
            scale = accelerator.num_processes * cfg.grad_accum / global_pairs if real else 0.0
            loss = losses.sum() * scale
            if "aux_loss" in out.metrics:  # each micro-batch's router loss, weighted by its share of pairs
                loss = loss + cfg.router_aux_loss_coef * out.metrics["aux_loss"] * loss_units(batch, cfg) * scale
                out.metrics["aux_loss"] = out.metrics["aux_loss"].detach()
            accelerator.backward(loss)
        if real:
            record(stats, out, pol, losses, run.mode, batch.labels, loss_units(batch, cfg))
            stats.real_tokens += batch.real_tokens
    grad_norm = accelerator.clip_grad_norm_(policy.parameters(),
                                            cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
    engine_steps = accelerator.distributed_type == DistributedType.DEEPSPEED
    if grad_norm is None and hasattr(policy, "get_global_grad_norm"):  # DeepSpeed clips inside its step
        grad_norm = policy.get_global_grad_norm()
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    metrics = finish_stats(stats, accelerator, agree_on_names=True)
    metrics["grad_norm"] = grad_norm
    if engine_steps:
        applied = bool(policy.was_step_applied()) and math.isfinite(metrics["loss"])
    else:
        applied = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if applied:
            run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return metrics, stats, [p for p, _ in parts], applied, int(global_pairs)


def after_step(run: Run, metrics: dict[str, float], applied: bool, pairs: int, micro: int) -> None:
    """Count the step, handle a non-finite one and watch for a policy that does not move."""
    state, cfg = run.state, run.cfg
    if bco_running_delta(cfg):
        metrics["bco/delta"] = state.get("bco_delta", 0.0)
        if applied:
            update_bco_delta(state, metrics["bco/reward_mean"])
    if applied:
        state["nonfinite_in_a_row"] = 0
    else:
        state["nonfinite_steps"] += 1
        state["nonfinite_in_a_row"] += 1
        run.accelerator.print(f"step {state['step'] + 1}: non-finite loss or gradient; update skipped "
                              f"({state['nonfinite_in_a_row']} in a row)")
    state["step"] += 1
    state["micro_batches"] += micro
    state["pairs_seen"] += pairs
    if state["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
        raise TrainingError(
            f"{state['nonfinite_in_a_row']} non-finite steps in a row (step {state['step']}); stopping. "
            f"The newest checkpoint is the last good state. Lower --learning-rate, use --dtype bfloat16 "
            f"instead of float16, or check the data; raise --max-nonfinite-steps to tolerate more")
    if run.mode == "pairs" and applied and abs(metrics["loss"] - math.log(2)) < 1e-4 \
            and abs(metrics.get("rewards/margins", 0.0)) < 1e-6 and state["step"] > run.warmup:
        state["ln2_steps"] = state.get("ln2_steps", 0) + 1  # checkpointed: a resume keeps counting
        if state["ln2_steps"] == 20:
            log.warning("loss has stayed at ln 2 with zero margins for 20 steps after warmup: the policy is "
                        "not moving. Likely causes: a learning rate too small for the dtype, all parameters "
                        "frozen, chosen identical to rejected, or a reference that is the policy itself "
                        "being updated")
    else:
        state["ln2_steps"] = 0


def checkpoint(run: Run, window: StepStats | None = None) -> None:
    """checkpoints/step-N, atomically; a mid-window one carries the window's sums."""
    saved = dict(run.state)
    if window is not None:
        saved["window"] = {"sums": window.sums, "pairs": window.pairs, "real_tokens": window.real_tokens}
    ckpt.save_checkpoint(run.accelerator, run.out_dir, run.state["step"], saved, run.cfg.save_total_limit)


def loop(run: Run, hooks: Any = None) -> dict[str, Any]:
    """Steps until the last, logging, evaluating, syncing the reference and checkpointing on their
    cadences; returns the last logged metrics."""
    cfg, accelerator, state = run.cfg, run.accelerator, run.state
    start_epoch, skip = divmod(state["micro_batches"], run.per_epoch)
    stream = _microbatches(run.data.train, cfg, run.pad_id, accelerator, start_epoch, skip)
    progress = _progress(cfg, accelerator, run.steps, state["step"])
    run.policy.train(run.fast.train_mode)  # eval mode only where the check found training mode random (logged)
    if hooks is not None:
        hooks.on_train_start(policy=run.model, reference=run.ref_train, data=run.data,
                             steps=run.steps, device=accelerator.device, fast_paths=run.fast)
    # a checkpoint taken mid logging window carries the window, so the next row averages the same steps
    window = StepStats(**state.pop("window")) if "window" in state else StepStats()
    last_log = time.perf_counter()
    final_metrics: dict[str, Any] = {}
    while state["step"] < run.steps:
        metrics, stats, parts, applied, pairs = step(run, stream)
        after_step(run, metrics, applied, pairs, cfg.grad_accum)
        if hooks is not None:
            hooks.on_step(state["step"], parts, metrics)
        _merge_window(window, stats, metrics, applied)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                 acc=f"{metrics.get('rewards/accuracies', float('nan')):.2f}",
                                 margin=f"{metrics.get('rewards/margins', float('nan')):.3f}")
        last = state["step"] == run.steps
        if state["step"] % cfg.logging_steps == 0 or last:
            now = time.perf_counter()
            row = _window_row(window, state, run.per_epoch, run.scheduler, accelerator, now - last_log)
            last_log = now
            window = StepStats()
            _log_row(row, run.metrics_path, accelerator)
            final_metrics = row
        if cfg.eval_steps and state["step"] % cfg.eval_steps == 0 and run.data.eval and not last:
            # on its own cadence, its own row; its time is left out of the next window's tokens/s
            started = time.perf_counter()
            final_metrics = {**final_metrics, **evaluate_and_log(run)}
            last_log += time.perf_counter() - started
        if cfg.ref_sync != "none" and state["step"] % cfg.ref_sync_steps == 0:
            run.ref_train.sync(accelerator.unwrap_model(run.policy).model, cfg.ref_sync, cfg.ref_sync_alpha)
        if cfg.save_steps and state["step"] % cfg.save_steps == 0 and not last:
            checkpoint(run, window)
    if progress is not None:
        progress.close()
    return final_metrics


def evaluate_and_log(run: Run) -> dict[str, Any]:
    row = {"step": run.state["step"], **evaluate(run.policy, run.data.eval, run.ref_eval, run.cfg, run.mode,
                                                 run.params, run.accelerator, run.pad_id)}
    _log_row(row, run.metrics_path, run.accelerator)
    return row


def finish(run: Run, final_metrics: dict[str, Any], hooks: Any = None) -> dict[str, Any]:
    """The last evaluation and checkpoint, and final/."""
    if not final_metrics and run.metrics_path.exists():  # resumed at the very end: the last logged row stands
        logged = [json.loads(line) for line in run.metrics_path.read_text().splitlines() if line.strip()]
        final_metrics = next((r for r in reversed(logged) if "loss" in r), {})
    if run.data.eval:
        final_metrics.update(evaluate_and_log(run))
    if run.cfg.save_steps:
        checkpoint(run)
    if hooks is None or getattr(hooks, "save_final", True):
        save_final(run.cfg, run.accelerator, run.policy, run.tokenizer, run.out_dir, final_metrics, run.data)
    run.accelerator.end_training()
    return final_metrics


def announce_plan(run: Run) -> None:
    """One line with ``prefopt plan``'s estimate of this run's peak memory. An estimate that cannot be
    made (a config the planner does not know, such as Gemma 4's per-layer shapes) is said, and training
    goes on: the line is advice, the run is what was asked for."""
    from prefopt import plan

    try:
        run.accelerator.print(plan.run_line(run))
    except Exception as e:  # noqa: BLE001 -- any failure of an estimate must not stop the training it describes
        log.warning("memory plan: no estimate for this model (%s: %s)", type(e).__name__, e)


def train(cfg: TrainConfig, explicit: set[str] | None = None, *, hooks: Any = None) -> dict[str, Any]:
    """Train a policy as ``cfg`` says; returns the final metrics (also in OUTPUT_DIR/final/).

    ``hooks`` (used by ``prefopt bench``) is told when the loop starts (``on_train_start``) and after
    every optimizer step (``on_step``); with ``hooks.save_final`` false, final/ is not written.
    """
    run = start(cfg, explicit)
    load_data(run)
    announce_plan(run)    # the memory estimate, before anything large is loaded
    load_model(run)       # and prove its fast paths
    prepare(run)          # LoRA, optimizer, accelerate's engine
    build_reference(run)  # through the prepared policy: the precision and layout of its step 0
    run.accelerator.print(f"reference: {type(run.ref_train).__name__ if run.ref_train else 'none (reference-free)'}")
    compile_policy(run)
    resume(run)
    final_metrics = loop(run, hooks)
    return finish(run, final_metrics, hooks)


def _merge_window(window: StepStats, stats: StepStats, step_metrics: dict[str, float], finite: bool) -> None:
    """Accumulate a step's averaged metrics into the logging window (non-finite steps counted apart)."""
    window.real_tokens += stats.real_tokens
    if not finite:
        return
    window.pairs += 1
    for k, v in step_metrics.items():
        window.add(k, v)


def _window_row(window: StepStats, state, per_epoch: int, scheduler, accelerator,
                seconds: float) -> dict[str, Any]:
    steps = max(window.pairs, 1.0)
    row: dict[str, Any] = {"step": state["step"], "epoch": round(state["micro_batches"] / per_epoch, 4)}
    for k, v in window.sums.items():
        row[k] = v / steps
    row["learning_rate"] = scheduler.get_last_lr()[0]
    tokens = accelerator.reduce(torch.tensor(float(window.real_tokens), device=accelerator.device),
                                reduction="sum").item()
    row["tokens_per_second"] = tokens / max(seconds, 1e-9)
    row["pairs_seen"] = state["pairs_seen"]
    row["nonfinite_steps"] = state["nonfinite_steps"]
    return row


def _log_row(row: dict[str, Any], path: Path, accelerator) -> None:
    if accelerator.is_main_process:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                    step=row["step"])


def _truncate_metrics(path: Path, step: int, accelerator) -> None:
    """On resume, drop metric rows logged after the checkpoint so the file reads as one clean run."""
    if not accelerator.is_main_process or not path.exists():
        return
    def before(line: str) -> bool:  # a line cut short by a kill is dropped, not fatal
        try:
            return json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            return False

    kept = [line for line in path.read_text().splitlines() if line.strip() and before(line)]
    atomic_write_text(path, "".join(line + "\n" for line in kept))  # a kill during the rewrite keeps the old file


def _progress(cfg: TrainConfig, accelerator, steps: int, start: int):
    if not cfg.progress or not accelerator.is_main_process:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True)


def save_final(cfg: TrainConfig, accelerator, policy, tokenizer, out_dir: Path, metrics: dict[str, Any],
               data: Examples) -> Path:
    """final/: one ordinary ``save_pretrained`` directory (full weights, a LoRA adapter, or the merged
    model) + tokenizer and a model card, written atomically by the main process.

    The weights come from ``accelerator.get_state_dict``, which every process calls: under FSDP and
    ZeRO-3 it gathers the shards (peft's own ``state_dict()`` would be a collective on one rank only).
    A LoRA merge under those engines is done on a fresh unsharded copy, from the gathered adapters."""
    final = out_dir / "final"
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(policy).model
    if zero_stage(accelerator) == 3:
        full = gathered_state_dict(accelerator.unwrap_model(policy), keep=accelerator.is_main_process)
    else:
        full = accelerator.get_state_dict(policy)
    state_dict = {k.removeprefix("model."): v for k, v in full.items()} if full else None
    lora = hasattr(model, "peft_config")
    sharded = accelerator.distributed_type in SHARDING_ENGINES
    if accelerator.is_main_process:
        if lora and cfg.merge_lora:
            model = (merged_copy(cfg, accelerator, model, state_dict) if sharded else model.merge_and_unload())
            state_dict = None if not sharded else model.state_dict()
        try:
            with atomic_path(final, directory=True) as tmp:
                model.save_pretrained(tmp, safe_serialization=True,
                                      **({"state_dict": state_dict} if state_dict is not None else {}))
                tokenizer.save_pretrained(tmp)
                (tmp / "README.md").write_text(model_card(cfg, metrics, data))
        except OSError as e:
            raise ckpt._explain(e, final) from None
    accelerator.wait_for_everyone()
    return final


def merged_copy(cfg: TrainConfig, accelerator, peft_model, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base model with the trained adapters merged in, built whole on this process from the
    gathered weights (the sharded model's own parameters are slices)."""
    from peft import get_peft_model, set_peft_model_state_dict

    with whole_model_loading(accelerator):  # on this process alone: ZeRO-3's partitioned loading would wait for the others
        base = load_causal_lm(peft_model.peft_config["default"].base_model_name_or_path or cfg.model,
                              dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    copy = get_peft_model(base, peft_model.peft_config["default"])
    adapters = {k: v for k, v in state_dict.items() if "lora_" in k}
    set_peft_model_state_dict(copy, {k.replace(".default", ""): v for k, v in adapters.items()})
    return copy.merge_and_unload()


def model_card(cfg: TrainConfig, metrics: dict[str, Any], data: Examples) -> str:
    shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}
    settings = {k: v for k, v in cfg.to_dict().items() if k in (
        "loss_type", "beta", "label_smoothing", "learning_rate", "optimizer", "lr_scheduler", "batch_size",
        "grad_accum", "max_steps", "epochs", "max_length", "max_prompt_length", "dtype", "lora_r", "seed")}
    return (
        f"# {Path(cfg.output_dir).name}\n\n"
        f"Trained with prefopt ({'+'.join(cfg.loss_type)}).\n\n"
        f"- base model: `{cfg.model}`\n- reference: `{cfg.ref_model or cfg.model}`\n"
        f"- data: `{cfg.data}` ({data.summary})\n\n"
        f"## Settings\n\n```yaml\n{yaml.safe_dump(settings, sort_keys=False)}```\n\n"
        f"## Final metrics\n\n```json\n{json.dumps(shown, indent=1)}\n```\n"
    )
