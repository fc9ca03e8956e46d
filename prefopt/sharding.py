"""What the sharding engines (DeepSpeed ZeRO, FSDP) need from the loop, in one place.

accelerate drives the engines; this module only answers the questions the loop must ask of
them: is a parameter partitioned right now (ZeRO-3 keeps each rank's slice in a 1-D tensor and
gathers whole weights in sub-module hooks), what shape does it really have, how are its
weights read whole, and what does the engine's config need that accelerate cannot infer
(the micro-batch size, since prefopt prepares no DataLoader).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import DistributedType


def zero_stage(accelerator) -> int:
    """DeepSpeed's ZeRO stage, or 0 when DeepSpeed is not the engine."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage or 0)


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter: each rank holds a slice; ``ds_shape`` is its real shape."""
    return hasattr(p, "ds_id")


def true_dim(p: torch.Tensor) -> int:
    """The parameter's number of dimensions as the model defines it (ZeRO-3 flattens its slice)."""
    return len(p.ds_shape) if is_partitioned(p) else p.dim()


@contextlib.contextmanager
def whole(params: list[torch.Tensor]) -> Iterator[None]:
    """Read ``params`` whole: under ZeRO-3 they are gathered for the block (a collective: every rank
    must enter it with the same parameters) and partitioned again after; elsewhere nothing happens."""
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def named_tensors_whole(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer by name, read whole one at a time (so ZeRO-3 gathers one weight
    at a time, never the whole model)."""
    for name, p in model.named_parameters():
        with whole([p]):
            yield name, p.detach().clone() if is_partitioned(p) else p.detach()
    for name, b in model.named_buffers():
        yield name, b


def fill_engine_config(accelerator, micro_batch_size: int, grad_accum: int, max_grad_norm: float | None) -> None:
    """What DeepSpeed's config leaves to "auto" and accelerate cannot infer: the per-GPU micro-batch
    size (accelerate reads it from a prepared DataLoader; prefopt batches itself) and the clipping
    (accelerate's fallback is 1.0, whatever --max-grad-norm says). An explicit accumulation count
    other than --grad-accum would move the engine's step boundaries off the loop's, so it is refused."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    from prefopt.errors import ConfigError

    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if config.get("train_batch_size", "auto") == "auto":
        config["train_batch_size"] = micro_batch_size * grad_accum * accelerator.num_processes
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = float(max_grad_norm or 0.0)
    gas = config.get("gradient_accumulation_steps", "auto")
    if gas != "auto" and int(gas) != grad_accum:
        raise ConfigError(f"--grad-accum {grad_accum}: the DeepSpeed config says gradient_accumulation_steps: {gas}; "
                          "give the same number in both (or 'auto' in the DeepSpeed config)")


@contextlib.contextmanager
def whole_model_loading(accelerator) -> Iterator[None]:
    """Load a model whole on this process even under ZeRO-3 (a frozen reference the engine does not
    own, or the copy a LoRA merge is done on: its loading and forwards must not wait for other ranks).

    transformers partitions at load time while its global DeepSpeed config says stage 3; accelerate's
    ``zero3_init_context_manager`` does not clear it (the engine still holds that config), so the
    config is unset for the block, with transformers' own setters, and put back after."""
    if zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    config = hf_deepspeed.deepspeed_config() and hf_deepspeed._hf_deepspeed_config_weak_ref()
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def no_split_modules(model: torch.nn.Module) -> list[str]:
    """The decoder-layer classes FSDP wraps one by one (transformers lists them per model)."""
    names = getattr(model, "_no_split_modules", None)
    if not names and hasattr(model, "get_base_model"):  # peft
        names = getattr(model.get_base_model(), "_no_split_modules", None)
    return list(names or [])


def process_group_handlers() -> list:
    """accelerate starts DeepSpeed's process group only with a GPU-type backend; on a machine without
    one it leaves every process thinking it is alone. gloo is named for it there (CPU runs, tests)."""
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.cuda.is_available():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def gathered_state_dict(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """A ZeRO-3 model's full state dict, gathered one weight at a time (every process takes part;
    the process with ``keep`` holds the CPU copies). accelerate's own gathering needs
    ``stage3_gather_16bit_weights_on_model_save`` and gives 16-bit weights; this keeps the dtype."""
    names = set(model.state_dict())  # the names a checkpoint holds (ZeRO-3's tensors themselves are empty)
    out = {}
    for name, tensor in named_tensors_whole(model):
        if name in names and keep:
            out[name] = tensor.detach().cpu().clone()
    return out if keep else None
