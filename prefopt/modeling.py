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
        try:
            model = _from_pretrained(name, kwargs)
        except ValueError as e:
            if "does not support an attention implementation" not in str(e) or attn_implementation == "eager":
                raise
            # e.g. Gemma 2 (its attention soft-capping has no SDPA form): the model's own attention instead
            log.warning("%s: %s has no '%s' attention in transformers; using 'eager' (block attention "
                        "needs SDPA; the fast-path check decides the rest)", name,
                        str(e).split(" does not support")[0], attn_implementation)
            kwargs["attn_implementation"] = "eager"
            model = _from_pretrained(name, kwargs)
    except pickle.UnpicklingError:
        raise ModelError(f"cannot load a causal LM from '{name}': its pickled weights hold more than plain tensors, "
                         "and prefopt never unpickles arbitrary objects; use a safetensors copy") from None
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise ModelError(f"cannot load a causal LM from '{name}': {_detail(e)}") from None
    disable_dropout(model)
    if block_attention:
        use_segment_attention(model)
    return model


# Names of the probabilities and noise scales that make a forward random in training mode: dropout
# in all its spellings (GPT-2's resid_pdrop, OPT's float `dropout` and `layerdrop` read inside
# forward), stochastic depth, and MoE routers' jitter noise (Mixtral's router_jitter_noise).
_RANDOM_IN_TRAINING = ("dropout", "pdrop", "layerdrop", "drop_path", "jitter")


def _random_in_training(name: str) -> bool:
    name = name.lower()
    return any(word in name for word in _RANDOM_IN_TRAINING)


def _from_pretrained(name: str, kwargs: dict) -> torch.nn.Module:
    """AutoModelForCausalLM, or the causal-LM class the saved config names where the auto mapping has
    no entry for its config class (text parts of multimodal models: Emu3ForCausalLM, MllamaForCausalLM)."""
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, trust_remote_code=kwargs.get("trust_remote_code", False))
        for arch in getattr(config, "architectures", None) or ():
            cls = getattr(transformers, arch, None)
            if cls is not None and arch.endswith(("ForCausalLM", "LMHeadModel")):
                return cls.from_pretrained(name, **kwargs)
        raise


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability (and router jitter) to zero, in modules and in the configs.

    DPO compares the policy (in training mode) with a reference computed without dropout, so any
    randomness left in training mode makes the two differ at step 0. Dropout modules are not the
    only form: many models keep the probability in a float attribute read inside ``forward``
    (OPT's ``dropout`` and ``layerdrop``, attention modules' ``attention_dropout``). The fast-path
    check (:mod:`prefopt.fastpath`) compares training and evaluation mode, so a form missed here is
    caught there.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr, value in list(vars(module).items()):
            if isinstance(value, float) and not isinstance(value, bool) and _random_in_training(attr):
                setattr(module, attr, 0.0)
    seen = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or id(config) in seen:
            continue
        configs = [config, *(getattr(config, k) for k in ("text_config", "decoder") if hasattr(config, k))]
        for c in configs:
            seen.add(id(c))
            for key, value in list(vars(c).items()):
                if isinstance(value, float) and _random_in_training(key):
                    setattr(c, key, 0.0)


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float,
               target_modules: list[str], gradient_checkpointing: bool) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters through peft; an existing adapter keeps training."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = prepare_kbit(model, gradient_checkpointing)
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


def prepare_kbit(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """QLoRA's preparation of a 4-bit model (norms, embeddings and head cast to float32), once.

    The trainer calls it straight after loading, before the fast-path check and the reference pass,
    so the cached reference is computed by the same numbers the policy starts from."""
    if not getattr(model, "is_loaded_in_4bit", False) or getattr(model, "_prefopt_kbit_prepared", False):
        return model
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    model._prefopt_kbit_prepared = True
    return model


def load_adapter_model(base: torch.nn.Module, adapter_dir: str, trainable: bool) -> torch.nn.Module:
    """Attach a saved LoRA adapter (continuing training keeps the adapter trainable)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)


def is_adapter_dir(name: str) -> bool:
    return (Path(name) / "adapter_config.json").exists()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trained) parameter counts; under ZeRO-3 a parameter is an empty placeholder whose real
    size is ``ds_numel``."""
    def size(p: torch.Tensor) -> int:
        return getattr(p, "ds_numel", p.numel())

    total = sum(size(p) for p in model.parameters())
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return total, trainable
