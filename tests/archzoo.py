"""Tiny, randomly initialised models for every decoder-only causal LM class in transformers.

A helper for test matrices, not a test module.  ``ENTRIES`` lists every name
``build`` accepts: the class names in ``CLASSES`` and the extra configurations in
``VARIANTS``.  ``SKIPPED`` names every other class of
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` with the reason it is left out.

The generic builder starts from the class's default config, shrinks every size
field the config has (see ``_COMMON``), shrinks per-layer lists to a few layers
while keeping one layer of each kind, and then applies the per-class
``OVERRIDES``.
"""
from __future__ import annotations

from typing import Any

import torch
import transformers

SLIDING_WINDOW = 8
HIDDEN = 32
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 64
EXPERTS, TOP_K = 4, 2
MAX_POS = 256
INIT = 0.1

# ---------------------------------------------------------------------------
# Generic size fields: name -> tiny value, or a callable of the default value.
# Only fields the config already has are touched.
# ---------------------------------------------------------------------------


def _keep_none(value):
    """For optional fields: leave a disabled (None) feature disabled, otherwise use ``value``."""
    return lambda default: None if default is None else value


_COMMON: dict[str, Any] = {
    # width
    **dict.fromkeys(["hidden_size", "n_embd", "d_model", "embedding_dim", "emb_dim", "dim_model",
                     "hidden_size_global"], HIDDEN),
    # depth (the real count is decided in _shrink: enough layers for one of each kind)
    **dict.fromkeys(["num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_blocks"], LAYERS),
    # heads
    **dict.fromkeys(["num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "attention_heads", "swa_num_attention_heads"], HEADS),
    **dict.fromkeys(["num_key_value_heads", "num_kv_heads", "swa_num_key_value_heads", "kv_n_heads"], KV_HEADS),
    "head_dim": HEAD_DIM,  # some configs default to None and the attention then fails on None ** -0.5
    **dict.fromkeys(["swa_head_dim", "attention_head_size", "dim_head", "d_head"], _keep_none(HEAD_DIM)),
    "rotary_dim": _keep_none(HEAD_DIM // 2),   # partial rotary (CodeGen, GPT-J): must fit in head_dim
    # feed-forward
    **dict.fromkeys(["intermediate_size", "ffn_dim", "decoder_ffn_dim", "ffn_hidden_size", "dff", "dim_ff",
                     "intermediate_size_mlp", "d_inner", "dense_intermediate_size"], FFN),
    "n_inner": _keep_none(FFN),
    **dict.fromkeys(["moe_intermediate_size", "expert_ffn_hidden_size"], _keep_none(HIDDEN)),
    **dict.fromkeys(["shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
                     "shared_experts_intermediate_size", "shared_intermediate_size"],
                    lambda d: None if d is None else (0 if d == 0 else HIDDEN)),
    # mixture of experts: 4 experts, top-2, one small shared expert where the model has them
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], EXPERTS),
    **dict.fromkeys(["num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "num_experts_per_token",
                     "moe_top_k"], TOP_K),
    **dict.fromkeys(["n_shared_experts", "num_shared_experts", "moe_num_shared_experts"],
                    lambda d: 1 if d is None else min(d, 1)),
    **dict.fromkeys(["n_group", "topk_group", "num_expert_group"], _keep_none(1)),
    # dense prefix: at most one dense layer, so a 2-layer model still has an MoE layer
    **dict.fromkeys(["first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"],
                    lambda d: d if d is None else min(d, 1)),
    # multi-head latent attention (DeepSeek style)
    "kv_lora_rank": 16, "q_lora_rank": _keep_none(16), "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "o_lora_rank": _keep_none(16),
    # sparse-attention indexers
    "index_n_heads": 2, "index_head_dim": 8, "index_topk": 8,
    # positions
    **dict.fromkeys(["max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "context_length",
                     "model_max_length", "max_target_positions"], MAX_POS),
    # initialisation: wider than the default 0.02 so logits are not near-uniform
    **dict.fromkeys(["initializer_range", "init_std"], INIT),
    # windows / local attention / chunked attention
    **dict.fromkeys(["sliding_window", "window_size", "local_attention", "attention_chunk_size",
                     "attention_window_size", "sliding_window_size", "local_attention_window_len",
                     "keep_window_size"],
                    _keep_none(SLIDING_WINDOW)),
    # state-space / recurrent blocks
    **dict.fromkeys(["state_size", "mamba_d_state", "ssm_state_size"], 8),
    **dict.fromkeys(["mamba_n_heads", "mamba_num_heads", "n_mamba_heads"], 4),
    **dict.fromkeys(["mamba_d_head", "mamba_head_dim", "mamba_headdim"], 16),
    **dict.fromkeys(["time_step_rank", "mamba_dt_rank"], 4),
    **dict.fromkeys(["chunk_size", "mamba_chunk_size"], 16),
    **dict.fromkeys(["n_groups", "mamba_n_groups", "mamba_ngroups"], 1),
    "mamba_d_ssm": _keep_none(2 * HIDDEN),      # = expand * hidden
    "lru_width": HIDDEN,                          # RecurrentGemma's recurrent block width
    # per-layer embeddings / low-rank side paths (Gemma 3n / 4, Qwen4-Exp)
    "hidden_size_per_layer_input": lambda d: d and 8,
    "laurel_rank": 8, "hc_lowrank": 8,
    # linear-attention (gated delta net, KDA, ...) blocks
    **dict.fromkeys(["linear_num_key_heads", "linear_num_value_heads", "linear_num_heads"], 2),
    **dict.fromkeys(["linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"], 8),
}

# Post-head logit transforms left at a no-op default get a visible value.
_TRANSFORMS: dict[str, Any] = {
    "logits_scaling": lambda d: 8.0 if d == 1.0 else d,       # Granite family: logits / logits_scaling
    "lm_head_multiplier": lambda d: 0.5 if d == 1.0 else d,   # Falcon-H1: logits * lm_head_multiplier
}

# Per-layer list fields (besides any list as long as the default layer count).
_PER_LAYER = {"layer_types", "mlp_layer_types", "layers_block_type", "block_types", "attn_layers",
              "attention_layers", "indexer_types", "no_rope_layers", "layer_rope_theta",
              "num_attention_heads_per_layer", "activation_sparsity_pattern"}
_LAYER_COUNT = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_blocks")

# Fields that must follow the vocabulary size when the config has them.
_VOCAB_LIKE = ("unpadded_vocab_size", "vocab_size_per_layer_input")

# ---------------------------------------------------------------------------
# Per-class overrides, applied last (config kwargs; VARIANTS add on top).
# ---------------------------------------------------------------------------
OVERRIDES: dict[str, dict[str, Any]] = {
    # --- hybrids: make sure both kinds of block exist in the tiny model ---
    "BambaForCausalLM": {"attn_layer_indices": [1]},                    # layer 0 mamba, layer 1 attention
    "GraniteMoeHybridForCausalLM": {"layer_types": ["linear_attention", "attention"]},
    "JambaForCausalLM": {"attn_layer_period": 2, "attn_layer_offset": 1,     # mamba+dense, attention+MoE
                         "expert_layer_period": 2, "expert_layer_offset": 1},
    # the shared transformer block is tied across hybrid layers: needs two of them
    "ZambaForCausalLM": {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
                         "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"]},
    "Zamba2ForCausalLM": {"num_hidden_layers": 4,
                          "layers_block_type": ["linear_attention", "hybrid", "linear_attention", "hybrid"],
                          "hybrid_layer_ids": [1, 3]},   # derived, but a stale default would win
    "Mamba2ForCausalLM": {"head_dim": 16},                               # num_heads * head_dim = expand * hidden
    "Lfm2ForCausalLM": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1],
                        "block_multiple_of": 16},
    "Lfm2MoeForCausalLM": {"layer_types": ["conv", "full_attention"]},   # conv+dense, attention+MoE
    "Lfm3ForCausalLM": {"block_multiple_of": 16},
    # recurrent-depth model: 1 input, 1 looped, 1 output layer (to_dict doubles the counts)
    "DoryForCausalLM": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1,
                        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    # --- MoE details ---
    "ZayaForCausalLM": {"num_experts_per_tok": 1},                       # only top-1 is implemented
    "FlintForCausalLM": {"mlp_only_layers": [0]},                        # layer 0 dense, layer 1 MoE
    # modeling reads attn_config.rope_theta and clamps with clip_qkv even when it is None
    "DbrxForCausalLM": {"attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    # --- heterogeneous per-layer configs ---
    "Gemma4ForCausalLM": {"per_layer_config": {"01": {"head_dim": 16}}},        # full layers use a wider head
    "Gemma4UnifiedForCausalLM": {"per_layer_config": {"01": {"head_dim": 16}}},
    "Dots3NoteForCausalLM": {"head_dim": 24,   # sliding layers: head_dim = qk_nope_head_dim + qk_rope_head_dim
                             "per_layer_config": {"01": {"num_attention_heads": 2, "num_key_value_heads": 2,
                                                         "kv_lora_rank": 32, "qk_nope_head_dim": 16}}},
    "Gemma3nForCausalLM": {"num_hidden_layers": 4, "num_kv_shared_layers": 2,     # last 2 layers reuse KV
                           "layer_types": ["sliding_attention", "full_attention"] * 2,
                           "intermediate_size": [FFN] * 4, "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0]},
    # rope parameters are keyed by layer type
    "CohereCompassForCausalLM": {"layer_types": ["sliding_attention", "full_attention"],
                                 "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4,
                                                                           "mrope_section": [2, 1, 1]},
                                                     "full_attention": None}},
    # query-sparse attention indexer on the "indexed_attention" layers
    "Qwen4ExpForCausalLM": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8,
                            "indexer_budget": 8, "indexer_compress_ratio": 2},
    # sparse indexed attention (transformers 5.25): layer 0 sliding, layer 1 an indexer, layer 2 a reindexer
    # that reads layer 1's keys and values; budgets small enough that a 40-token row is sparse
    "Kolibri1_1ForCausalLM": {"num_hidden_layers": 3, "head_dim": 16, "mlp_only_layers": [0],
                              "layer_types": ["sliding_attention", "indexed_attention", "indexed_attention"],
                              "index_layers": [1], "kv_source_layers": [0, 1, 1], "index_num_heads": 2,
                              "index_topk": 4, "index_pool_size": 16, "index_compression": 4,
                              "index_num_local_tokens": 4, "index_num_sink_tokens": 2},
    # qk/v widths are rounded up to multiples of 64 for the state but not for the projections
    "xLSTMForCausalLM": {"hidden_size": 128, "embedding_dim": 128},
    # byte-level LM with entropy patching; DynamicCache(config=BltConfig) fails in 5.24, so no cache by default
    "BltForCausalLM": {"use_cache": False, "encoder_hash_byte_group_vocab": 64, "encoder_hash_byte_group_size": [3, 4]},
    # MuP: HyperCLOVAX multiplies the logits by logits_scaling (Granite divides)
    "HyperCLOVAXForCausalLM": {"logits_scaling": 0.25},
    # hidden states are divided by hidden_size / dim_model_base before the head (real models: /10)
    "MiniCPM3ForCausalLM": {"dim_model_base": HIDDEN // 4},
    # attention_layers is expanded from attention_types on reload: keep them consistent
    "GPTNeoForCausalLM": {"attention_types": [[["global", "local"], 1]]},
    "RwkvForCausalLM": {"attention_hidden_size": HIDDEN, "intermediate_size": FFN},   # defaults are absolute
    # causal only with is_decoder=True; chunked local attention only (LSH hashing is random)
    "ReformerModelWithLMHead": {"is_decoder": True, "attn_layers": ["local", "local"],
                                "local_attn_chunk_length": SLIDING_WINDOW,
                                "axial_pos_shape": [16, 16], "axial_pos_embds_dim": [16, 16], "feed_forward_size": FFN,
                                "num_hashes": 1},
}

# Extra named configurations: entry -> (class name, overrides).
VARIANTS: dict[str, tuple[str, dict]] = {
    # ALiBi instead of rotary (Falcon-RW style)
    "FalconForCausalLM[alibi]": ("FalconForCausalLM", {"alibi": True}),
    # Qwen2 only uses its window when asked; max_window_layers=1 -> layer 0 full, layer 1 sliding
    "Qwen2ForCausalLM[sliding]": ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW,
                                                        "max_window_layers": 1, "layer_types": None}),
    # sliding window is off by default in these configs
    "Phi3ForCausalLM[sliding]": ("Phi3ForCausalLM", {"sliding_window": SLIDING_WINDOW}),
    "MixtralForCausalLM[sliding]": ("MixtralForCausalLM", {"sliding_window": SLIDING_WINDOW}),
    "SmolLM3ForCausalLM[sliding]": ("SmolLM3ForCausalLM", {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW,
                                                            "layer_types": None}),   # NoPE layers slide
    # Gemma 4 with its MoE block (26B-A4B style)
    "Gemma4ForCausalLM[moe]": ("Gemma4ForCausalLM", {"enable_moe_block": True, "moe_intermediate_size": HIDDEN}),
    # LayerDrop is only active in training mode
    "OPTForCausalLM[layerdrop]": ("OPTForCausalLM", {"layerdrop": 0.25}),
    # input and output embeddings share one tensor
    "LlamaForCausalLM[tied]": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
}

# Classes of the mapping left out, with the reason.
_ENC_DEC = "decoder of an encoder-decoder model (cross-attention to an encoder)"
_BERT = "encoder model (BERT-style) used as a decoder; bidirectional unless is_decoder=True"
_MM = "multimodal wrapper (vision/audio tower around a text LM); use the text *ForCausalLM"
SKIPPED: dict[str, str] = {
    **dict.fromkeys(["BartForCausalLM", "BigBirdPegasusForCausalLM", "BlenderbotForCausalLM",
                     "BlenderbotSmallForCausalLM", "MarianForCausalLM", "MBartForCausalLM", "MvpForCausalLM",
                     "PegasusForCausalLM", "PLBartForCausalLM", "ProphetNetForCausalLM", "TrOCRForCausalLM",
                     "WhisperForCausalLM"], _ENC_DEC),
    **dict.fromkeys(["BertLMHeadModel", "BertGenerationDecoder", "BigBirdForCausalLM", "CamembertForCausalLM",
                     "Data2VecTextForCausalLM", "ElectraForCausalLM", "ErnieForCausalLM", "MegatronBertForCausalLM",
                     "RemBertForCausalLM", "RobertaForCausalLM", "RobertaPreLayerNormForCausalLM",
                     "RoCBertForCausalLM", "RoFormerForCausalLM", "XLMRobertaForCausalLM",
                     "XLMRobertaXLForCausalLM", "XmodForCausalLM"], _BERT),
    "XLMWithLMHeadModel": "encoder model (XLM masked LM; causal=False by default, language embeddings)",
    "XLNetLMHeadModel": "permutation LM (two-stream attention, perm_mask/target_mapping), not left-to-right causal",
    **dict.fromkeys(["Gemma3ForConditionalGeneration", "Gemma3nForConditionalGeneration",
                     "Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration"], _MM),
    "GotOcr2ForConditionalGeneration": "multimodal: OCR model, needs pixel inputs (text LM is Qwen2)",
    "MossTranscribeDiarizeForConditionalGeneration": "multimodal: speech transcription, needs audio inputs",
    **dict.fromkeys(["MusicgenForCausalLM", "MusicgenMelodyForCausalLM"],
                    "audio-codebook LM: input_ids are (batch*num_codebooks, len) codes, logits per codebook"),
    **dict.fromkeys(["Gemma4AssistantForCausalLM", "Gemma4UnifiedAssistantForCausalLM"],
                    "speculative-decoding drafter: takes the target model's embeddings and shared KV, not input_ids"),
}


def _all_classes() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(dict.fromkeys(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))


CLASSES: list[str] = [c for c in _all_classes() if c not in SKIPPED]
ENTRIES: list[str] = CLASSES + list(VARIANTS)


def _split(entry: str) -> tuple[str, dict]:
    if entry in VARIANTS:
        cls, extra = VARIANTS[entry]
        return cls, dict(extra)
    return entry, {}


def _shrink_list(values: list, n: int) -> list:
    """``n`` items keeping each distinct value once, in order of first appearance."""
    kinds = list(dict.fromkeys(values))
    if len(kinds) >= n:
        return kinds
    # pad with the last kind seen (usually the common one, e.g. 'sparse' after a dense prefix)
    return kinds + [values[-1]] * (n - len(kinds))


def _resolve(value, default):
    return value(default) if callable(value) else value


def _is_index_list(key: str, values: list) -> bool:
    """Lists of layer indices (moe_layers, full_attn_idxs, ...), as opposed to one entry per layer."""
    return (key not in _PER_LAYER and all(isinstance(x, int) and not isinstance(x, bool) for x in values)
            and not set(values) <= {0, 1})


def _shrink(defaults: dict) -> dict:
    """Config kwargs that make the default config (a ``to_dict()``) tiny."""
    kw: dict[str, Any] = {}
    n_default = next((defaults[k] for k in _LAYER_COUNT if isinstance(defaults.get(k), int)), None)
    lists = {k: v for k, v in defaults.items()
             if isinstance(v, list) and v and all(isinstance(x, (str, int, float, bool, type(None))) for x in v)}
    per_layer = {k: v for k, v in lists.items()
                 if (k in _PER_LAYER or len(v) == n_default) and not _is_index_list(k, v)}
    n = max([LAYERS] + [len(dict.fromkeys(v)) for v in per_layer.values()])
    for k, v in defaults.items():
        if k == "per_layer_config":
            kw[k] = None                          # heterogeneous layers: per-class OVERRIDES only
        elif k in _COMMON:
            kw[k] = _resolve(_COMMON[k], v)
        elif k in _TRANSFORMS:
            kw[k] = _resolve(_TRANSFORMS[k], v)
        elif isinstance(v, dict) and k not in ("id2label", "label2id"):
            sub = _shrink(v)                      # nested sub-config (attn_config, text_config, ...)
            if sub:
                kw[k] = {**v, **sub}
        elif k in lists and k not in per_layer and _is_index_list(k, v) and n_default and max(v) >= n:
            kw[k] = [i for i in v if i < n]       # layer indices: keep those that still exist
    for k in _LAYER_COUNT:
        if k in defaults:
            kw[k] = n
    if "kv_lora_rank" in defaults and "num_key_value_heads" in kw:
        kw["num_key_value_heads"] = kw.get("num_attention_heads", HEADS)   # MLA has no GQA
    for k, v in per_layer.items():
        kw[k] = _shrink_list(v, n)
    return kw


def _set_vocab(kw: dict, defaults: dict, vocab_size: int, pad_token_id: int) -> None:
    """vocab size and special ids, also inside nested text sub-configs."""
    kw.update(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    for k in _VOCAB_LIKE:
        if defaults.get(k):
            kw[k] = vocab_size
    for k, v in defaults.items():
        if isinstance(v, dict) and "vocab_size" in v:
            kw[k] = dict(kw.get(k, v))
            _set_vocab(kw[k], v, vocab_size, pad_token_id)


def tiny_config(entry: str, vocab_size: int = 200, pad_token_id: int = 0) -> transformers.PretrainedConfig:
    """The tiny config of ``entry`` (a class name of CLASSES or a key of VARIANTS)."""
    cls_name, extra = _split(entry)
    cls = getattr(transformers, cls_name)
    cfg_cls = cls.config_class
    defaults = cfg_cls().to_dict()
    kw = _shrink(defaults)
    _set_vocab(kw, defaults, vocab_size, pad_token_id)
    kw.update(OVERRIDES.get(cls_name, {}))
    kw.update(extra)
    for k in ("transformers_version", "architectures", "model_type", "_name_or_path", "dtype"):
        kw.pop(k, None)
    return cfg_cls(**kw)


def build(entry: str, vocab_size: int = 200, pad_token_id: int = 0, seed: int = 0, dtype=torch.float32,
          attn_implementation: str | None = None) -> torch.nn.Module:
    """A randomly initialised tiny model in eval mode; the same seed gives the same weights whatever the
    attention implementation.  Raises (ValueError) if the model does not support ``attn_implementation``."""
    cls_name, _ = _split(entry)
    cls = getattr(transformers, cls_name)
    config = tiny_config(entry, vocab_size=vocab_size, pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = cls._from_config(config, **kwargs)
    return model.eval()
