"""Loading models and tokenizers, with errors a user can act on.

Everything goes through ``from_pretrained(name_or_path)``: a local directory or a hub
name. Remote code runs only with ``trust_remote_code``; weights load from safetensors
when the directory has them (transformers reads legacy ``.bin`` files with
``weights_only=True``, so nothing is unpickled either way).
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from prefopt.attention import use_segment_attention
from prefopt.errors import ModelError

log = logging.getLogger("prefopt")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_exists(name: str, what: str) -> None:
    """A local-looking path must exist; anything else is left to the hub lookup."""
    path = Path(name)
    looks_local = name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1
    if looks_local and not path.exists():
        raise ModelError(f"{what} not found: '{name}' is not a directory")
    if path.exists() and not path.is_dir():
        raise ModelError(f"{what} '{name}' is a file; give the directory written by save_pretrained")


def _detail(e: Exception) -> str:
    """The first line of a loading error; where transformers asks for trust_remote_code, our flag's name."""
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "trust_remote_code" in str(e) or "custom code" in str(e):
        return first.rstrip(" .") + ". It ships its own code: rerun with --trust-remote-code only if you trust its author"
    return first


def load_tokenizer(name: str, *, trust_remote_code: bool = False,
                   chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer; a missing pad token becomes EOS (said in the log), since we mask pads ourselves.

    ``chat_template`` is a Jinja file that replaces (or supplies) the tokenizer's chat template,
    for conversational data with a tokenizer that has none.
    """
    check_exists(name, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from '{name}': {_detail(e)}") from None
    if chat_template is not None:
        try:
            tok.chat_template = Path(chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise ModelError(f"--chat-template {chat_template}: cannot read it ({e.strerror})") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"tokenizer '{name}' has neither a pad nor an EOS token; add one with "
                             "tokenizer.add_special_tokens and save it")
        tok.pad_token = tok.eos_token
        log.warning("tokenizer '%s' has no pad token: using EOS (%r) for padding; padded positions are "
                    "masked, so this changes no result", name, tok.eos_token)
    return tok


def load_causal_lm(name: str, *, dtype: str = "float32", attn_implementation: str = "sdpa",
                   trust_remote_code: bool = False, load_in_4bit: bool = False,
                   block_attention: bool = True) -> torch.nn.Module:
    """Load a causal LM with dropout switched off (DPO's log-prob ratios must be deterministic).

    With ``block_attention`` an SDPA model is switched to :mod:`prefopt.attention`, which
    computes packed rows segment by segment and is plain SDPA everywhere else.
    """
    check_exists(name, "model")
    kwargs = dict(dtype=DTYPES[dtype], attn_implementation=attn_implementation,
                  trust_remote_code=trust_remote_code)
    path = Path(name)
    if path.is_dir() and any(path.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    if load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ModelError("--load-in-4bit needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU") from None
        if not torch.cuda.is_available():
            raise ModelError("--load-in-4bit (QLoRA) needs a CUDA GPU; on CPU use --lora-r without 4-bit")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype],
            bnb_4bit_use_double_quant=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except pickle.UnpicklingError:
        raise ModelError(f"cannot load a causal LM from '{name}': its pickled weights hold more than plain tensors, "
                         "and prefopt never unpickles arbitrary objects; use a safetensors copy") from None
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelError(f"cannot load a causal LM from '{name}': {_detail(e)}") from None
    disable_dropout(model)
    if block_attention:
        use_segment_attention(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to zero, in modules and in the config."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout_p"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float,
               target_modules: list[str], gradient_checkpointing: bool) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters through peft; an existing adapter keeps training."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if isinstance(model, PeftModel):
        return model
    targets: str | list[str] = target_modules
    if target_modules == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ModelError(f"--lora-target-modules {' '.join(target_modules)}: {str(e).splitlines()[0]}") from None


def load_adapter_model(base: torch.nn.Module, adapter_dir: str, trainable: bool) -> torch.nn.Module:
    """Attach a saved LoRA adapter (continuing training keeps the adapter trainable)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)


def is_adapter_dir(name: str) -> bool:
    return (Path(name) / "adapter_config.json").exists()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
