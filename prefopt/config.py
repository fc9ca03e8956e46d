"""One typed, validated configuration for training.

Every option is a field of :class:`TrainConfig`. The CLI builds its flags from the
fields (``beta`` -> ``--beta``), a YAML file given with ``--config`` uses the same
names with underscores, flags win over the file, and an unknown key is an error that
names the closest valid one. Validation happens here, before any model is loaded, so
a typo costs a second rather than a model load.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefopt.errors import ConfigError


def opt(default: Any, help: str, choices: tuple | None = None, group: str = "training", **kw) -> Any:
    """A config field with its CLI help text, allowed values and help-section group."""
    meta = {"help": help, "choices": choices, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # model
    model: str | None = opt(None, "policy model: a local directory or a hub name (from_pretrained)", group="model")
    ref_model: str | None = opt(None, "reference model (default: the policy's starting weights)", group="model")
    tokenizer: str | None = opt(None, "tokenizer (default: the policy model's)", group="model")
    chat_template: str | None = opt(None, "Jinja chat template file for conversational data (overrides the "
                                    "tokenizer's)", group="model")
    dtype: str = opt("float32", "compute dtype; bfloat16/float16 train with float32 master weights and optimizer "
                     "state under autocast (frozen LoRA/QLoRA bases are stored in it)",
                     ("float32", "bfloat16", "float16"), group="model")
    pure_low_precision: bool = opt(False, "store trained weights and optimizer state in --dtype itself (no float32 "
                                   "master copy): half the memory, but small updates round away", group="model")
    attn_implementation: str = opt("sdpa", "attention kernel; prefix sharing and packing need custom masks",
                                   ("sdpa", "eager"), group="model")
    trust_remote_code: bool = opt(False, "run code shipped with the model (off unless you trust its author)",
                                  group="model")
    # data
    data: str | None = opt(None, "training preferences: .jsonl/.json/.csv/.parquet, a save_to_disk dir or a hub name",
                           group="data")
    eval_data: str | None = opt(None, "held-out preferences (same formats)", group="data")
    eval_fraction: float = opt(0.0, "hold out this fraction of --data for evaluation when no --eval-data",
                               group="data")
    data_split: str = opt("train", "split to read from a dataset directory or hub dataset", group="data")
    prompt_field: str = opt("prompt", "name of the prompt field", group="data")
    chosen_field: str = opt("chosen", "name of the chosen-completion field", group="data")
    rejected_field: str = opt("rejected", "name of the rejected-completion field", group="data")
    completions_field: str = opt("completions", "K-answer data: name of the field listing a prompt's answers",
                                 group="data")
    scores_field: str = opt("scores", "K-answer data: name of the field with one score per answer", group="data")
    rating_field: str = opt("overall_score", "UltraFeedback-shaped data: the rating of each completion object "
                            "(a key or a dotted path, e.g. annotations.helpfulness.Rating)", group="data")
    max_length: int = opt(1024, "max tokens of prompt + one completion", group="data")
    max_prompt_length: int | None = opt(512, "max prompt tokens (the prompt keeps its end); default 512, "
                                        "or half of --max-length when that is 512 or less", group="data")
    on_invalid: str = opt("error", "invalid rows: stop before training, or skip them and write them to "
                          "OUTPUT_DIR/rejected_rows.jsonl", ("error", "skip"), group="data")
    all_assistant_turns: bool = opt(False, "multi-turn completions: train on each assistant turn after the "
                                    "turns chosen and rejected share, the user and tool turns between them kept "
                                    "as masked context (default: the whole completion is trained)", group="data")
    # output
    output_dir: str | None = opt(None, "where checkpoints, metrics.jsonl and final/ go", group="output")
    overwrite: bool = opt(False, "replace a different run already in --output-dir", group="output")
    resume: str | None = opt(None, "'latest' or a checkpoint directory to continue from", group="output")
    # loss
    loss_type: list[str] = opt(["sigmoid"], "loss(es); several are summed with --loss-weights", group="loss")
    loss_weights: list[float] | None = opt(None, "one weight per --loss-type", group="loss")
    beta: float = opt(0.1, "strength of the KL penalty towards the reference (DPO's beta)", group="loss")
    label_smoothing: float = opt(0.0, "assumed label-flip rate epsilon (cDPO, robust, ...)", group="loss")
    ipo_length_normalize: bool = opt(False, "IPO on length-averaged log-probs instead of sums", group="loss")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin", group="loss")
    rpo_alpha: float | None = opt(None, "add rpo_alpha x NLL of the chosen completion (RPO)", group="loss")
    reference_free: bool = opt(False, "treat the reference as uniform: no reference model at all", group="loss")
    f_divergence: str = opt("reverse_kl", "f-DPO divergence", ("reverse_kl", "forward_kl", "js", "alpha"),
                            group="loss")
    f_alpha: float = opt(0.5, "alpha of the alpha-divergence", group="loss")
    desirable_weight: float = opt(1.0, "KTO weight of desirable examples", group="loss")
    undesirable_weight: float = opt(1.0, "KTO weight of undesirable examples", group="loss")
    cpo_alpha: float = opt(1.0, "weight of CPO's NLL term", group="loss")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature of its log-ratio modulation", group="loss")
    bco_delta: float | None = opt(None, "BCO reward shift delta (default: the running mean of the rewards, "
                                  "as in the paper)", group="loss")
    wpo_weighting: bool = opt(False, "weight pairs by their probability under the policy (WPO)", group="loss")
    ld_alpha: float | None = opt(None, "LD-DPO: weight of tokens beyond the shorter completion's length",
                                 group="loss")
    k_pairing: str = opt("all", "K-answer data: the pairs a pairwise loss trains on (every ordered pair of "
                         "unequal score, the best against each worse answer, or the best against the worst)",
                         ("all", "best_vs_rest", "best_vs_worst"), group="loss")
    k_weighting: str = opt("prompt", "K-answer data: each prompt's pairs share one weight (prompt), or every "
                           "pair counts the same (pair)", ("prompt", "pair"), group="loss")
    ref_sync: str = opt("none", "TR-DPO reference updates", ("none", "soft", "hard"), group="loss")
    ref_sync_alpha: float = opt(0.6, "TR-DPO soft update mix", group="loss")
    ref_sync_steps: int = opt(512, "TR-DPO: update the reference every N optimizer steps", group="loss")
    # optimisation
    learning_rate: float = opt(1e-6, "peak learning rate")
    optimizer: str = opt("adamw", "optimizer (the DPO paper used rmsprop)", ("adamw", "rmsprop"))
    weight_decay: float = opt(0.0, "decoupled weight decay (matrices only; biases and norm scales are not decayed)")
    lr_scheduler: str = opt("linear", "schedule after warmup", ("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warmup steps (wins over --warmup-ratio)")
    warmup_ratio: float = opt(0.0, "warmup as a fraction of the total optimizer steps")
    batch_size: int = opt(4, "pairs per device per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_steps: int | None = opt(None, "optimizer steps (wins over --epochs)")
    epochs: float = opt(1.0, "passes over the training data")
    max_grad_norm: float | None = opt(1.0, "clip gradients to this total norm (none to disable)")
    seed: int = opt(42, "seed for initialisation, shuffling and dropout")
    shuffle: bool = opt(True, "shuffle the training pairs each epoch")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward to save memory",
                                       group="speed")
    compile: bool = opt(False, "torch.compile the decoder", group="speed")
    # speed and memory
    ref_cache: bool = opt(True, "precompute reference log-probs once and cache them on disk", group="speed")
    cache_dir: str | None = opt(None, "reference log-prob cache (default: $PREFOPT_CACHE or ~/.cache/prefopt)",
                                group="speed")
    prefix_sharing: bool = opt(True, "compute each pair's prompt once: [prompt | chosen | rejected]",
                               group="speed")
    packing: bool = opt(True, "pack several pairs into one row instead of padding", group="speed")
    group_by_prompt: bool = opt(True, "rows of pairs that share a prompt go into one micro-batch and one segment "
                                "[prompt | c1 | r1 | c2 | r2 ...], the prompt computed once (shuffled by prompt)",
                                group="speed")
    lean_activations: bool = opt(True, "keep fewer activations for the backward: RMSNorm and SwiGLU MLPs recompute "
                                 "their element-wise intermediates, norm outputs are rebuilt in the backward "
                                 "(bit-identical)", group="speed")
    trim_last_layer: bool = opt(True, "run the last layer's MLP only at the positions the LM head reads "
                                "(off under --gradient-checkpointing and --compile)", group="speed")
    block_attention: bool = opt(True, "attention per segment, skipping the blocks the mask hides "
                                "(SDPA models; --no-block-attention: one masked SDPA call per row)", group="speed")
    lm_head_chunk_size: int = opt(1024, "tokens per LM-head chunk at most (fewer for large vocabularies: on the "
                                  "CPU a chunk's float32 logits stay under 64 MiB, on a GPU under 1/16 of its "
                                  "free memory)", group="speed")
    full_lm_head: bool = opt(False, "the model's own LM head over every position instead of the fused head "
                             "(chosen by the fast-path check for heads it cannot reproduce)", group="speed")
    plain_path: bool = opt(False, "every sequence on its own with a 2-D padding mask and the model's own head: "
                           "no prefix sharing, packing or custom masks (what the check falls back to)",
                           group="speed")
    fast_path_check: bool = opt(True, "before training or scoring, check every fast path against the model's "
                                "plain forward on a few rows and switch off any that differs (cached)",
                                group="speed")
    router_aux_loss_coef: float = opt(0.0, "mixture-of-experts models: weight of the router's load-balancing loss "
                                      "over real tokens, logged as aux_loss (0 = off, as in other trainers)",
                                      group="model")
    lora_r: int = opt(0, "LoRA rank (0 = full fine-tuning)", group="lora")
    lora_alpha: float = opt(16.0, "LoRA scaling alpha", group="lora")
    lora_dropout: float = opt(0.0, "LoRA dropout", group="lora")
    lora_target_modules: list[str] = opt(["all-linear"], "modules that get adapters", group="lora")
    load_in_4bit: bool = opt(False, "QLoRA: load the base in 4-bit (needs bitsandbytes and a GPU)", group="lora")
    merge_lora: bool = opt(False, "write merged weights to final/ instead of the adapter", group="lora")
    # evaluation, logging, checkpoints
    eval_steps: int | None = opt(None, "evaluate every N optimizer steps (and always at the end)", group="logging")
    eval_batch_size: int | None = opt(None, "pairs per device for eval and the reference pass", group="logging")
    logging_steps: int = opt(10, "log metrics every N optimizer steps", group="logging")
    save_steps: int | None = opt(500, "checkpoint every N optimizer steps", group="logging")
    save_total_limit: int | None = opt(None, "keep only the newest N checkpoints", group="logging")
    report_to: str = opt("none", "experiment tracker", ("none", "tensorboard", "wandb", "mlflow"), group="logging")
    max_nonfinite_steps: int = opt(10, "stop after this many non-finite steps in a row", group="logging")
    progress: bool = opt(True, "show a progress bar", group="logging")

    # ---- derived helpers -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model  # type: ignore[return-value]


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _closest(name: str) -> str:
    match = difflib.get_close_matches(name, list(FIELDS), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check a YAML value against the field's type, converting ints to floats where floats are wanted."""
    optional, base = _unwrap_optional(typing.get_type_hints(TrainConfig)[name])
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: '{name}' cannot be null")
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        if not isinstance(value, list):
            value = [value]
        return [_coerce_scalar(name, v, item, where) for v in value]
    return _coerce_scalar(name, value, base, where)


def _unwrap_optional(hint) -> tuple[bool, Any]:
    """(is it Optional, the type inside): ``int | None`` -> (True, int); ``list[str]`` -> (False, list[str])."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        return True, next(a for a in args if a is not type(None))
    return False, hint


def _coerce_scalar(name: str, value: Any, typ: type, where: str) -> Any:
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-6 (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: '{name}' must be {typ.__name__}, got {value!r}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict of validated field values."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option names to values")
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"{path}: unknown option '{key}'{_closest(name)}")
        out[name] = _coerce(name, value, str(path))
    return out


def add_arguments(parser: argparse.ArgumentParser, exclude: set[str] = frozenset()) -> None:
    """Add one flag per config field; defaults are suppressed so we can tell what was given."""
    groups: dict[str, Any] = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        optional, base = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{meta['help']} (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(base) is list:
            group.add_argument(flag, nargs="+", metavar=f.name.upper(), **kw)
            continue
        typ = _optional(base) if optional else base
        group.add_argument(flag, type=typ, choices=meta["choices"], metavar=None if meta["choices"] else
                           f.name.upper(), **kw)


def _optional(typ: type):
    """Parse 'none' as None for optional numeric flags (e.g. --max-grad-norm none)."""

    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return typ(text)

    parse.__name__ = typ.__name__
    return parse


def build_config(flags: dict[str, Any], config_file: str | None = None) -> tuple[TrainConfig, set[str]]:
    """Merge defaults < YAML file < flags; return the config and the set of explicitly given keys."""
    values: dict[str, Any] = {}
    if config_file:
        values.update(load_yaml(config_file))
    values.update({k: v for k, v in flags.items() if k in FIELDS})
    for name, value in values.items():  # "--loss-type sigmoid,sft" means the same as "sigmoid sft"
        if isinstance(value, list):
            values[name] = _coerce(name, [p.strip() for v in value for p in
                                          (v.split(",") if isinstance(v, str) else [v]) if p != ""], "config")
    cfg = TrainConfig(**values)
    if "max_prompt_length" not in values and cfg.max_prompt_length is not None \
            and cfg.max_prompt_length >= cfg.max_length:
        cfg.max_prompt_length = cfg.max_length // 2  # the default follows a short --max-length down
    validate(cfg)
    return cfg, set(values)


def validate(cfg: TrainConfig) -> None:
    """Reject impossible settings before any model is loaded."""

    def need(cond: bool, option: str, message: str) -> None:
        if not cond:
            raise ConfigError(f"--{option.replace('_', '-')}: {message}")

    need(cfg.beta > 0 and math.isfinite(cfg.beta), "beta", f"must be > 0, got {cfg.beta}")
    need(0 <= cfg.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {cfg.label_smoothing}")
    need(0 <= cfg.eval_fraction < 1, "eval_fraction", f"must be in [0, 1), got {cfg.eval_fraction}")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {cfg.lora_dropout}")
    need(0 <= cfg.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {cfg.warmup_ratio}")
    need(0 <= cfg.ref_sync_alpha <= 1, "ref_sync_alpha", f"must be in [0, 1], got {cfg.ref_sync_alpha}")
    need(cfg.learning_rate > 0, "learning_rate", f"must be > 0, got {cfg.learning_rate}")
    need(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    need(cfg.router_aux_loss_coef >= 0 and math.isfinite(cfg.router_aux_loss_coef), "router_aux_loss_coef",
         f"must be >= 0, got {cfg.router_aux_loss_coef}")
    for name in ("batch_size", "grad_accum", "logging_steps", "lm_head_chunk_size", "max_nonfinite_steps",
                 "ref_sync_steps"):
        need(getattr(cfg, name) >= 1, name, f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit", "eval_batch_size"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, name, f"must be >= 1 (or omitted), got {value}")
    need(cfg.epochs > 0, "epochs", f"must be > 0, got {cfg.epochs}")
    need(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    need(cfg.lora_r >= 0, "lora_r", f"must be >= 0, got {cfg.lora_r}")
    need(cfg.max_grad_norm is None or cfg.max_grad_norm > 0, "max_grad_norm", "must be > 0 or none")
    need(cfg.max_length >= 2, "max_length", f"must be >= 2, got {cfg.max_length}")
    if cfg.max_prompt_length is not None:
        need(1 <= cfg.max_prompt_length < cfg.max_length, "max_prompt_length",
             f"must be at least 1 and below --max-length ({cfg.max_length}) so a completion still fits, "
             f"got {cfg.max_prompt_length}")
    if cfg.ld_alpha is not None:
        need(0 <= cfg.ld_alpha <= 1, "ld_alpha", f"must be in [0, 1], got {cfg.ld_alpha}")
    if "kto" in cfg.loss_type:
        # Both act on a pair (chosen vs rejected); KTO's second completion is only the
        # mismatched KL partner, so LD would cut the completion at that partner's length
        # and WPO would weight a row by an unrelated completion.
        need(cfg.ld_alpha is None, "ld_alpha", "LD-DPO weights the tokens beyond the shorter of a pair's two "
             "completions; KTO (--loss-type kto) trains unpaired completions, so it cannot be combined with it")
        need(not cfg.wpo_weighting, "wpo_weighting", "WPO weights chosen/rejected pairs by their probability; "
             "KTO (--loss-type kto) trains unpaired completions, so it cannot be combined with it")
    if cfg.loss_weights is not None:
        need(len(cfg.loss_weights) == len(cfg.loss_type), "loss_weights",
             f"gives {len(cfg.loss_weights)} weights for {len(cfg.loss_type)} loss types")
    need(cfg.resume is None or not cfg.overwrite, "overwrite", "cannot be combined with --resume")
    if cfg.load_in_4bit:
        need(cfg.lora_r > 0, "load_in_4bit", "QLoRA trains adapters: also give --lora-r (e.g. 16)")
    if cfg.merge_lora:
        need(cfg.lora_r > 0, "merge_lora", "there is no adapter to merge without --lora-r")
    if cfg.ref_sync != "none":
        need(cfg.lora_r == 0, "ref_sync", "TR-DPO reference updates need a separate reference model, "
             "not LoRA's adapter-disabled base")
