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
from torch.utils.data import DataLoader
from safetensors import SafetensorError

from prefopt import checkpoint as ckpt
from prefopt.batching import PackedBatch, collate, split_rows
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
    kto_loss,
    ld_logps,
    needs_reference,
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


def _collate_fn(examples, pad_id: int, cfg: TrainConfig):
    """Index list -> PackedBatch, laid out as the config says (prefix sharing, packing)."""
    return lambda idx: collate([examples[j] for j in idx], pad_token_id=pad_id, prefix_sharing=cfg.prefix_sharing,
                               packing=cfg.packing, plain=cfg.plain_path)


def batches(examples, order: list[int], batch_size: int, pad_id: int, cfg: TrainConfig):
    """Packed batches of ``examples`` in ``order`` (for the no-grad passes: reference, eval, scoring)."""
    return map(_collate_fn(examples, pad_id, cfg), _chunks(order, batch_size))


def _load_reference(cfg: TrainConfig, name: str, device) -> torch.nn.Module:
    """A separate frozen reference model with the run's fast paths (no backward runs through it, so
    checkpointing and compile do not matter here); :func:`settle_reference` proves them for it."""
    ref = load_causal_lm(name, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                         block_attention=cfg.block_attention, trust_remote_code=cfg.trust_remote_code)
    ref.to(device)
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


def check_split(cfg: TrainConfig, mode: str, sharded: bool) -> bool:
    """Whether the training loop runs micro-batches row by row (see :func:`row_parts`)."""
    return not (mode == "kto" or BATCH_COUPLED_LOSSES & set(cfg.loss_type) or sharded)


def settle_fast_paths(cfg: TrainConfig, model: torch.nn.Module, data: Examples, pad_id: int, *, device,
                      requested: dict[str, bool], with_grad: bool, split: bool, weights_digest: str | None = None,
                      share=None) -> tuple[TrainConfig, FastPaths]:
    """Prove the requested fast paths on ``model`` (see :mod:`prefopt.fastpath`), leave it patched as
    decided, and return the config with the decision in it. ``share`` makes every process take the
    main one's decision."""
    if not cfg.fast_path_check:
        fast = FastPaths(features=apply_patches(model, requested), architecture=type(model).__name__,
                         dtype=cfg.dtype)
        return replace(cfg, **settings_from(fast.features)), fast
    rows = check_rows(data.train + data.eval)
    cache_file = None
    if cfg.ref_cache:
        weights_digest = weights_digest or hash_weights(model)
        key = check_key(weights_digest, model, rows, requested, with_grad=with_grad, split=split,
                        chunk=cfg.lm_head_chunk_size, dtype=cfg.dtype)
        cache_file = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / "fastpath" / f"{key}.json"
    fast = cached_decide(model, rows, requested, cache_file=cache_file, pad_id=pad_id, with_grad=with_grad,
                         split=split, chunk_size=cfg.lm_head_chunk_size, device=device, dtype=DTYPES[cfg.dtype])
    if share is not None:
        fast = share(fast)
        fast.features = apply_patches(model, fast.features)
    return replace(cfg, **settings_from(fast.features)), fast


def announce(fast: FastPaths) -> str:
    return fast.describe() + (" [cached]" if fast.cached else f" [checked in {fast.seconds:.1f} s]")


def _share(accelerator):
    """Every process takes the main process's decision (the same rows give the same numbers, but a
    collective forward must not run in two layouts)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import broadcast_object_list

    return lambda fast: broadcast_object_list([fast])[0]


def build_reference(cfg, accelerator, policy, tokenizer, data: Examples, mode: str, num_completions: int,
                    explicit: set[str] = frozenset(), weights_digest: str | None = None):
    """Return (train_reference, eval_reference) or (None, None) for reference-free training.

    ``cfg`` carries the policy's proven fast paths; a separate reference model is checked on its own
    (without gradients) and scores in whatever layout it proves."""
    if mode == "sft" or not needs_reference(cfg.loss_type, cfg.reference_free):
        if cfg.ref_model and "ref_model" in explicit:
            log.warning("--ref-model is ignored: %s needs no reference model, so none is loaded",
                        "+".join(cfg.loss_type) + (" with --reference-free" if cfg.reference_free else ""))
        return None, None
    separate = cfg.ref_model is not None and cfg.ref_model != cfg.model
    pad_id = tokenizer.pad_token_id
    if cfg.ref_cache and cfg.ref_sync == "none":
        ref, ref_cfg = (settle_reference(cfg, accelerator, data, pad_id) if separate
                        else (policy, cfg))
        weights = weights_digest if not separate and weights_digest else hash_weights(ref)
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        batch = cfg.eval_batch_size or max(cfg.batch_size * 4, 8)
        extra = {"dtype": cfg.dtype, "ld_alpha": cfg.ld_alpha, "config": config_digest(ref), "env": versions(),
                 "buffers": hash_buffers(ref), "attn": getattr(ref.config, "_attn_implementation", None),
                 "fast_paths": settings_from(requested_features(ref_cfg)),
                 "trim_last_layer": trimmed_mlp(ref) is not None}
        score = _score_fn(ref_cfg, num_completions)
        tables = []
        for examples in (data.train, data.eval):
            if not examples:
                tables.append(None)
                continue
            key = cache_key(weights, hash_examples(examples), extra)
            path = cache_root / "ref_logps" / f"{key}.safetensors"
            with accelerator.main_process_first():
                table, hit = CachedReference.build(
                    ref, batches(examples, list(range(len(examples))), batch, pad_id, ref_cfg),
                    len(examples), num_completions, score, cache_file=path, device=accelerator.device)
            accelerator.print(f"reference log-probs: {'loaded from cache' if hit else 'computed and cached'} "
                              f"({len(examples)} examples) {path}")
            tables.append(table)
        if separate:
            del ref
        return tables[0], tables[1]
    if cfg.lora_r > 0 and not separate:
        live = AdapterDisabledReference(policy, _score_fn(cfg, num_completions))
        return live, live
    if not separate:
        live = ModelReference(_load_reference(cfg, cfg.model, accelerator.device), _score_fn(cfg, num_completions))
        apply_patches(live.model, requested_features(cfg))
        return live, live
    ref, ref_cfg = settle_reference(cfg, accelerator, data, pad_id)
    score = _score_fn(ref_cfg, num_completions)
    if all(requested_features(ref_cfg)[k] == requested_features(cfg)[k] for k in LAYOUT_FEATURES):
        live = ModelReference(ref, score)
        return live, live
    # the reference proved a different layout: it re-lays each batch out from the examples themselves
    return tuple(ModelReference(ref, _relaid(score, examples, pad_id, ref_cfg)) for examples in (data.train, data.eval))


def settle_reference(cfg: TrainConfig, accelerator, data: Examples, pad_id: int):
    """Load a separate reference model and prove the run's fast paths on it (no gradients)."""
    ref = _load_reference(cfg, cfg.ref_model, accelerator.device)
    ref_cfg, fast = settle_fast_paths(cfg, ref, data, pad_id, device=accelerator.device,
                                      requested=requested_features(cfg), with_grad=False, split=False,
                                      share=_share(accelerator))
    accelerator.print("reference " + announce(fast))
    return ref, ref_cfg


def _relaid(score, examples, pad_id: int, cfg: TrainConfig):
    layout = _collate_fn(examples, pad_id, cfg)

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
    return [g for g in ({"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}) if g["params"]]


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


def epoch_order(n: int, epoch: int, cfg: TrainConfig) -> list[int]:
    """The example order of one epoch: depends only on (seed, epoch), so a resume replays it."""
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
    (sorts over the batch), or DeepSpeed/FSDP (which count or shard per backward).
    """
    if (mode == "kto" or BATCH_COUPLED_LOSSES & set(cfg.loss_type)
            or accelerator.distributed_type in SHARDING_ENGINES):
        return [batch]
    return split_rows(batch)


def forward_loss(policy: CompletionLogpsModel, batch: PackedBatch, reference, cfg: TrainConfig, mode: str,
                 params: LossParams, mean_across_processes=None) -> tuple[torch.Tensor, LossOutput, PairLogps]:
    """Per-pair losses for one micro-batch (policy forward with grad, reference without).

    ``policy`` is the (possibly DDP/FSDP-wrapped) :class:`CompletionLogpsModel`.
    ``mean_across_processes`` averages KTO's KL estimate over every process's rows.
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
        kl = (pol[:, 1] - (ref_kl if ref_kl is not None else 0.0)).detach().mean()
        if mean_across_processes is not None:
            kl = mean_across_processes(kl)
        out = kto_loss(pol[:, 0], ref_own, batch.labels, pol[:, 1], ref_kl, params, kl=kl)
        return out.losses, out, pairs
    pairs = PairLogps(pol[:, 0], pol[:, 1], tok[:, 0], tok[:, 1])
    ref_pair = PairLogps(ref[:, 0], ref[:, 1], tok[:, 0], tok[:, 1]) if ref is not None else None
    weights = None
    if cfg.wpo_weighting:
        logw = seq.wpo_logw.view(-1, n_comp)
        weights = wpo_pair_weights(logw[:, 0], logw[:, 1])
    out = compute_loss(cfg.loss_type, cfg.loss_weights, pairs, ref_pair, params, sample_weights=weights)
    return out.losses, out, pairs


def record(stats: StepStats, out: LossOutput, policy: PairLogps, losses: torch.Tensor, mode: str,
           labels: torch.Tensor | None) -> None:
    n = losses.numel()
    stats.pairs += n
    stats.add("loss", losses.detach().sum())
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
    order = list(range(len(examples)))[accelerator.process_index::n]
    rounds = math.ceil(math.ceil(len(examples) / n) / batch_size)
    layout = _collate_fn(examples, pad_id, cfg)
    for k in range(rounds):
        chunk = order[k * batch_size:(k + 1) * batch_size]
        batch = layout(chunk or [0]).to(accelerator.device)
        losses, out, policy = forward_loss(model, batch, reference, cfg, mode, params)
        if chunk:
            record(stats, out, policy, losses, mode, batch.labels)
    model.train(was_training)
    return {f"eval/{k}": v for k, v in finish_stats(stats, accelerator, agree_on_names=True).items()}


# ---------------------------------------------------------------------------- the loop


# What fixes the data position of a checkpoint: the order of the examples and how many a step takes.
RUN_SETTINGS = {"batch_size": "--batch-size", "grad_accum": "--grad-accum", "num_processes": "the number of processes",
                "max_length": "--max-length", "max_prompt_length": "--max-prompt-length", "seed": "--seed",
                "shuffle": "--shuffle", "data": "the training data (its token ids)"}


def run_signature(cfg: TrainConfig, num_processes: int, data: Examples) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (see :func:`check_same_run`)."""
    return {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "num_processes": num_processes,
            "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "seed": cfg.seed,
            "shuffle": cfg.shuffle, "data": hash_examples(data.train)}


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


class FixedBatches:
    """A batch sampler that yields precomputed index lists (accelerate shards it across processes)."""

    def __init__(self, chunks: list[list[int]], batch_size: int):
        self.chunks, self.batch_size, self.drop_last = chunks, batch_size, False

    def __iter__(self):
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def _microbatches(examples, cfg, pad_id: int, accelerator, start_epoch: int, skip: int):
    """Endless stream of (epoch, micro-batch) for this process, skipping ``skip`` micro-batches first."""
    epoch = start_epoch
    while True:
        order = epoch_order(len(examples), epoch, cfg)
        loader = DataLoader(range(len(examples)), batch_sampler=FixedBatches(_chunks(order, cfg.batch_size),
                                                                             cfg.batch_size),
                            collate_fn=_collate_fn(examples, pad_id, cfg))
        loader = accelerator.prepare_data_loader(loader)
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
            skip = 0
        for batch in loader:
            yield epoch, batch
        epoch += 1


def train(cfg: TrainConfig, explicit: set[str] | None = None, *, hooks: Any = None) -> dict[str, Any]:
    """Train a policy as ``cfg`` says; returns the final metrics (also in OUTPUT_DIR/final/).

    ``hooks`` (used by ``prefopt bench``) is told when the loop starts (``on_train_start``) and after
    every optimizer step (``on_step``); with ``hooks.save_final`` false, final/ is not written.
    """
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

    # gradient_accumulation_steps reaches DeepSpeed's config; the accumulation itself is ours (see the loop)
    check_tracker(cfg.report_to)
    accelerator = Accelerator(log_with=None if cfg.report_to == "none" else cfg.report_to,
                              project_dir=cfg.output_dir, gradient_accumulation_steps=cfg.grad_accum,
                              step_scheduler_with_optimizer=False)  # our step counts are already per process
    out_dir = prepare_output_dir(cfg, accelerator)
    set_seed(cfg.seed)

    check_exists(cfg.model, "model")
    tokenizer = load_tokenizer(cfg.tokenizer_path or "", trust_remote_code=cfg.trust_remote_code,
                               chat_template=cfg.chat_template)
    data = prepare_examples(cfg, tokenizer, mode, out_dir if accelerator.is_main_process else None)
    accelerator.print(f"data: {data.summary}")
    pad_id = tokenizer.pad_token_id
    n_comp = len(data.train[0].completions)

    adapter = cfg.model is not None and is_adapter_dir(cfg.model)
    base_name = json.loads((Path(cfg.model) / "adapter_config.json").read_text())["base_model_name_or_path"] \
        if adapter else cfg.model
    policy = load_causal_lm(base_name, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                            block_attention=cfg.block_attention,
                            trust_remote_code=cfg.trust_remote_code, load_in_4bit=cfg.load_in_4bit)
    if adapter:
        if not cfg.ref_cache and cfg.ref_model is None:
            raise ConfigError("continuing an existing LoRA adapter uses its starting state as the reference, "
                              "which needs the reference cache: drop --no-ref-cache or give --ref-model")
        policy = load_adapter_model(policy, cfg.model, trainable=True)
    policy.to(accelerator.device)
    policy = prepare_kbit(policy, cfg.gradient_checkpointing)  # QLoRA: before the check and the reference
    sharded = accelerator.distributed_type in SHARDING_ENGINES  # they gather weights and own the optimizer state
    recomputing = cfg.gradient_checkpointing or cfg.compile  # they bring their own saved-tensor handling
    # ZeRO-3/FSDP gather weights in sub-module hooks, so no module is patched under them; checkpointing
    # would recompute the last layer without the trim's row list
    requested = requested_features(cfg, sharded=sharded, recomputing=recomputing)
    weights_digest = hash_weights(policy) if cfg.ref_cache and cfg.fast_path_check else None
    cfg, fast = settle_fast_paths(cfg, policy, data, pad_id, device=accelerator.device, requested=requested,
                                  with_grad=True, split=check_split(cfg, mode, sharded),
                                  weights_digest=weights_digest, share=_share(accelerator))
    accelerator.print(announce(fast))
    # The reference is settled before LoRA is added: at that point the policy *is* the reference.
    ref_train, ref_eval = build_reference(cfg, accelerator, policy, tokenizer, data, mode, n_comp, explicit,
                                          weights_digest=weights_digest)
    if cfg.lora_r > 0 and not adapter:
        policy = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target_modules=cfg.lora_target_modules, gradient_checkpointing=cfg.gradient_checkpointing)
        if isinstance(ref_train, AdapterDisabledReference):
            ref_train = ref_eval = AdapterDisabledReference(policy, ref_train.score)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(policy, "enable_input_require_grads"):
            policy.enable_input_require_grads()
    if cfg.compile:
        policy.get_decoder().compile()
    total, trainable = count_parameters(policy)
    accelerator.print(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trained; "
                      f"reference: {type(ref_train).__name__ if ref_train else 'none (reference-free)'}")

    steps, per_epoch = total_steps(cfg, len(data.train), accelerator.num_processes)
    model = policy  # the transformers / peft model; `policy` becomes its log-prob wrapper for accelerate
    policy = CompletionLogpsModel(model, cfg.lm_head_chunk_size, cfg.full_lm_head,
                                  router_aux=router_aux_wanted(cfg, model))
    optimizer = build_optimizer(cfg, policy)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * steps)
    scheduler = build_scheduler(cfg, optimizer, warmup, steps)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    if not sharded:
        flat_adamw_state(getattr(optimizer, "optimizer", optimizer))
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("prefopt", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                     for k, v in cfg.to_dict().items()})

    state = {"step": 0, "micro_batches": 0, "pairs_seen": 0, "nonfinite_steps": 0, "nonfinite_in_a_row": 0,
             "run": run_signature(cfg, accelerator.num_processes, data)}
    metrics_path = out_dir / "metrics.jsonl"
    if cfg.resume is not None:
        path = resume_path
        check_same_run(ckpt.read_state(path), state["run"], path)
        try:
            accelerator.load_state(str(path))
        except pickle.UnpicklingError:
            raise CheckpointError(f"--resume {path}: cannot load this checkpoint: its optimizer or scheduler state "
                                  "is damaged or holds more than plain tensors, and prefopt never unpickles arbitrary "
                                  "objects; resume from an earlier checkpoint directory or start again") from None
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
            raise CheckpointError(f"--resume {path}: cannot load this checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if not sharded:
            flat_adamw_state(getattr(optimizer, "optimizer", optimizer))  # the loaded state, back in one block
        state.update(ckpt.read_state(path))
        _truncate_metrics(metrics_path, state["step"], accelerator)
        ckpt.remove_newer(accelerator, out_dir, state["step"])  # they belong to the run being replaced
        accelerator.print(f"resumed from {path} at step {state['step']}")
    elif accelerator.is_main_process:
        metrics_path.write_text("")

    start_epoch, skip = divmod(state["micro_batches"], per_epoch)
    stream = _microbatches(data.train, cfg, pad_id, accelerator, start_epoch, skip)
    progress = _progress(cfg, accelerator, steps, state["step"])
    policy.train(fast.train_mode)  # eval mode only where the check found training mode random (said in the log)
    if hooks is not None:
        hooks.on_train_start(policy=model, reference=ref_train, data=data,
                             steps=steps, device=accelerator.device, fast_paths=fast)
    # a checkpoint taken mid logging window carries the window, so the next row averages the same steps
    window = StepStats(**state.pop("window")) if "window" in state else StepStats()
    last_log = time.perf_counter()
    final_metrics: dict[str, Any] = {}
    bco_running = bco_running_delta(cfg)
    rebuild_norms = cfg.lean_activations and not recomputing

    while state["step"] < steps:
        micro = []
        for _ in range(cfg.grad_accum):
            _, batch = next(stream)
            micro.append(batch)
        local_pairs = torch.tensor(float(sum(b.num_examples for b in micro)), device=accelerator.device)
        global_pairs = accelerator.reduce(local_pairs, reduction="sum").item()
        stats = StepStats()
        if bco_running:
            params = replace(params, bco_delta=state.get("bco_delta", 0.0))
        parts = [part for batch in micro for part in row_parts(batch, cfg, mode, accelerator)]
        for i, batch in enumerate(parts):
            # Gradients are all-reduced (DDP) or stepped (DeepSpeed) only after the window's last micro-batch.
            sync = i == len(parts) - 1
            accelerator.sync_gradients = sync
            with accelerator.no_sync(policy) if not sync else contextlib.nullcontext():
                with rebuild_norm_outputs() if rebuild_norms else contextlib.nullcontext():
                    losses, out, pol = forward_loss(policy, batch, ref_train, cfg, mode, params,
                                                    lambda t: accelerator.reduce(t, reduction="mean"))
                # Sum over the window's pairs / all pairs of the global batch. DDP averages over processes and
                # accelerate divides by grad_accum, so both factors are put back here.
                scale = accelerator.num_processes * cfg.grad_accum / global_pairs
                loss = losses.sum() * scale
                if "aux_loss" in out.metrics:  # each micro-batch's router loss, weighted by its share of pairs
                    loss = loss + cfg.router_aux_loss_coef * out.metrics["aux_loss"] * batch.num_examples * scale
                    out.metrics["aux_loss"] = out.metrics["aux_loss"].detach()
                accelerator.backward(loss)
            record(stats, out, pol, losses, mode, batch.labels)
            stats.real_tokens += batch.real_tokens
        grad_norm = accelerator.clip_grad_norm_(policy.parameters(),
                                                cfg.max_grad_norm if cfg.max_grad_norm else float("inf"))
        if grad_norm is None and hasattr(policy, "get_global_grad_norm"):  # DeepSpeed clips inside its step
            grad_norm = policy.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        step_metrics = finish_stats(stats, accelerator)
        step_metrics["grad_norm"] = grad_norm
        finite = math.isfinite(step_metrics["loss"]) and math.isfinite(grad_norm)
        if bco_running:
            step_metrics["bco/delta"] = params.bco_delta
            if finite:
                update_bco_delta(state, step_metrics["bco/reward_mean"])
        if finite:
            optimizer.step()
            state["nonfinite_in_a_row"] = 0
        else:
            state["nonfinite_steps"] += 1
            state["nonfinite_in_a_row"] += 1
            accelerator.print(f"step {state['step'] + 1}: non-finite loss or gradient; update skipped "
                              f"({state['nonfinite_in_a_row']} in a row)")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        if hooks is not None:
            hooks.on_step(state["step"], parts, step_metrics)
        state["micro_batches"] += len(micro)
        state["pairs_seen"] += int(global_pairs)
        if state["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
            raise TrainingError(
                f"{state['nonfinite_in_a_row']} non-finite steps in a row (step {state['step']}); stopping. "
                f"The newest checkpoint is the last good state. Lower --learning-rate, use --dtype bfloat16 "
                f"instead of float16, or check the data; raise --max-nonfinite-steps to tolerate more")

        _merge_window(window, stats, step_metrics, finite)
        if mode == "pairs" and finite and abs(step_metrics["loss"] - math.log(2)) < 1e-4 \
                and abs(step_metrics.get("rewards/margins", 0.0)) < 1e-6 and state["step"] > warmup:
            state["ln2_steps"] = state.get("ln2_steps", 0) + 1  # checkpointed: a resume keeps counting
            if state["ln2_steps"] == 20:
                log.warning("loss has stayed at ln 2 with zero margins for 20 steps after warmup: the policy is "
                            "not moving. Likely causes: a learning rate too small for the dtype, all parameters "
                            "frozen, chosen identical to rejected, or a reference that is the policy itself "
                            "being updated")
        else:
            state["ln2_steps"] = 0
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                                 acc=f"{step_metrics.get('rewards/accuracies', float('nan')):.2f}",
                                 margin=f"{step_metrics.get('rewards/margins', float('nan')):.3f}")

        if state["step"] % cfg.logging_steps == 0 or state["step"] == steps:
            now = time.perf_counter()
            row = _window_row(window, state, per_epoch, scheduler, accelerator, now - last_log)
            last_log = now
            window = StepStats()
            _log_row(row, metrics_path, accelerator)
            final_metrics = row
        if cfg.eval_steps and state["step"] % cfg.eval_steps == 0 and data.eval and state["step"] != steps:
            # on its own cadence, its own row; its time is left out of the next window's tokens/s
            started = time.perf_counter()
            eval_row = {"step": state["step"], **evaluate(policy, data.eval, ref_eval, cfg, mode, params,
                                                          accelerator, pad_id)}
            _log_row(eval_row, metrics_path, accelerator)
            final_metrics = {**final_metrics, **eval_row}
            last_log += time.perf_counter() - started
        if cfg.ref_sync != "none" and state["step"] % cfg.ref_sync_steps == 0:
            ref_train.sync(accelerator.unwrap_model(policy).model, cfg.ref_sync, cfg.ref_sync_alpha)
        if cfg.save_steps and state["step"] % cfg.save_steps == 0 and state["step"] != steps:
            saved = dict(state, window={"sums": window.sums, "pairs": window.pairs, "real_tokens": window.real_tokens})
            ckpt.save_checkpoint(accelerator, out_dir, state["step"], saved, cfg.save_total_limit)

    if progress is not None:
        progress.close()
    if not final_metrics and metrics_path.exists():  # resumed at the very end: the last logged row stands
        logged = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        final_metrics = next((r for r in reversed(logged) if "loss" in r), {})
    if data.eval:
        eval_row = {"step": state["step"], **evaluate(policy, data.eval, ref_eval, cfg, mode, params,
                                                      accelerator, pad_id)}
        _log_row(eval_row, metrics_path, accelerator)
        final_metrics.update(eval_row)
    if cfg.save_steps:
        ckpt.save_checkpoint(accelerator, out_dir, state["step"], dict(state), cfg.save_total_limit)
    if hooks is None or getattr(hooks, "save_final", True):
        save_final(cfg, accelerator, policy, tokenizer, out_dir, final_metrics, data)
    accelerator.end_training()
    return final_metrics


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
    tmp = path.with_name(path.name + ".tmp")  # a kill during the rewrite keeps the old file whole
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _progress(cfg: TrainConfig, accelerator, steps: int, start: int):
    if not cfg.progress or not accelerator.is_main_process:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True)


def save_final(cfg: TrainConfig, accelerator, policy, tokenizer, out_dir: Path, metrics: dict[str, Any],
               data: Examples) -> Path:
    """final/: safetensors weights + tokenizer, loadable with AutoModelForCausalLM, and a model card."""
    final = out_dir / "final"
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(policy).model
    if cfg.merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    state_dict = None
    if not cfg.merge_lora:  # gathered from every process under FSDP / ZeRO-3
        full = accelerator.get_state_dict(policy)
        state_dict = {k.removeprefix("model."): v for k, v in full.items()} if full is not None else None
    if accelerator.is_main_process:
        tmp = out_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save_pretrained(tmp, safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict is not None and cfg.lora_r == 0 else {}))
            tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(cfg, metrics, data))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ckpt._explain(e, final) from None
    accelerator.wait_for_everyone()
    return final


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
