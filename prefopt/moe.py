"""Mixture-of-experts routers: the load-balancing auxiliary loss over real tokens.

A MoE decoder routes every token to ``k`` of ``E`` experts. Training on a preference
loss alone can collapse the routing onto a few experts, so MoE recipes add the
Switch-Transformer load-balancing loss times ``router_aux_loss_coef`` (prefopt: off,
coefficient 0, by default). transformers computes that loss inside ``ForCausalLM``
from a 2-D attention mask; prefopt calls the decoder directly on packed rows with a
4-D mask, so it computes the same number here from the router logits the decoder
records (``output_router_logits=True``) and a flat mask of the real token positions.
The loss is over the positions computed: with prefix sharing a prompt is one set of
rows, where a padded trainer (TRL) routes it once per completion, so the two agree on
the same rows, not necessarily on the same batch of pairs.

Checked against transformers 5.24: every MoE family whose ``ForCausalLM`` returns an
``aux_loss`` records one 2-D ``[R*L, E]`` logit tensor per routed block (JetMoe: two
per layer, attention and MLP routers; layers without experts record none), and all
but Doge share Mixtral's ``load_balancing_loss_func``. Doge routes over product keys
(logits ``[2, R*L, sqrt(E)]``), which this module rejects rather than mis-scores.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["moe_routing", "decoder_supports_router_logits", "router_logits_from", "load_balancing_loss"]

# Names of "number of routed experts" and "experts per token" across families, first
# match wins. Many 5.x configs alias one spelling to another (attribute_map: Mixtral
# num_experts -> num_local_experts, OLMoE the reverse, Ernie 4.5 -> moe_num_experts/moe_k,
# DeepSeek/GLM4-MoE -> n_routed_experts, HunYuan -> moe_topk); the native names are listed
# too for configs without the alias (Aria: moe_num_experts/moe_topk; DBRX keeps
# moe_num_experts/moe_top_k in a nested ``ffn_config``). Shared experts are not counted:
# the router scores routed experts only.
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_FIELDS = ("num_experts_per_tok", "moe_k", "moe_top_k", "moe_topk")


def _first_int(sources: Sequence[object], names: Sequence[str]) -> int | None:
    """The first attribute among ``names`` (over ``sources``, in order) that is a plain int."""
    for source in sources:
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def moe_routing(config) -> tuple[int, int] | None:
    """``(number of routed experts, experts per token)`` of a model config, or None.

    None means there is no router to balance: a dense model, a config whose MoE switch is
    off (Doge's ``is_moe=False`` still carries ``num_experts``), a single expert, or a
    per-layer list instead of one number (HunYuan's ``moe_topk`` may be one), for which one
    load-balancing normalisation does not exist. A heterogeneous per-layer config raises
    transformers' ``AmbiguousGlobalPerLayerAttributeError`` rather than guessing.
    Composite (vision-language) configs are read through their text config, as the
    decoder is what prefopt runs.

    The pair is whatever the config declares; transformers itself computes an
    ``aux_loss`` from it only for some families (not for DeepSeek-V2/V3, GLM4-MoE,
    HunYuan-MoE or Llama 4, several of which score experts with a sigmoid or balance them
    with a bias instead of a loss), so for those :func:`load_balancing_loss` has no
    transformers reference value.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "is_moe", True) is False:
        return None
    sources = [text]
    if getattr(text, "ffn_config", None) is not None:  # DBRX
        sources.append(text.ffn_config)
    experts = _first_int(sources, _EXPERT_FIELDS)
    top_k = _first_int(sources, _TOP_K_FIELDS)
    if experts is None or top_k is None or experts < 2 or not 1 <= top_k <= experts:
        return None
    return experts, top_k


def decoder_supports_router_logits(decoder: torch.nn.Module) -> bool:
    """Whether ``decoder(..., output_router_logits=True)`` records router logits.

    In transformers 5.x the flag is consumed by the model's output-capturing hooks,
    declared in ``can_record_outputs`` (``_can_record_outputs`` on the class); older
    models take it as an explicit ``forward`` argument. A dense decoder knows neither and
    would pass it down as a stray keyword, so ask before passing it.
    """
    recordable = getattr(decoder, "can_record_outputs", None) or getattr(decoder, "_can_record_outputs", None) or {}
    return "router_logits" in recordable or "output_router_logits" in inspect.signature(decoder.forward).parameters


def router_logits_from(outputs) -> tuple[Tensor, ...] | None:
    """The per-layer router logits ``[R*L, E]`` of a decoder output, or None if it has none.

    transformers 5.x returns them as ``outputs.router_logits``: a tuple with one tensor
    per routed block, in layer order, each the router's pre-softmax logits over the
    flattened batch positions (row ``r*L + t`` is row ``r``, position ``t``), because
    every router reshapes its input to ``[-1, hidden]`` before its linear layer. Needs
    a ``ModelOutput`` (the default ``return_dict``), not a plain tuple. Any other shape
    (Doge's product-key logits ``[2, R*L, sqrt(E)]``) raises ``ValueError`` instead of
    being balanced wrongly.
    """
    logits = getattr(outputs, "router_logits", None)
    if not logits:  # absent, None, or an empty tuple (no routed layer ran)
        return None
    for layer in logits:
        if not isinstance(layer, Tensor) or layer.dim() != 2:
            shape = tuple(layer.shape) if isinstance(layer, Tensor) else type(layer).__name__
            raise ValueError(f"router logits must be [tokens, experts] tensors per layer, got {shape}")
    return tuple(logits)


def load_balancing_loss(router_logits: Sequence[Tensor], real: Tensor, num_experts: int, top_k: int) -> Tensor:
    """Switch-Transformer load-balancing loss over the real token positions, as transformers computes it.

    With ``p_i = softmax(logits_i)`` the router probabilities of row ``i``, pooled over
    all layers (a token in n layers is n rows) and over the real positions only, ``N``
    the number of such rows and ``E`` = ``num_experts``::

        f_e  = (1/N) · Σ_i [e ∈ top-k(p_i)]      (fraction of routed slots; Σ_e f_e = k)
        P_e  = (1/N) · Σ_i p_i[e]                (mean router probability; Σ_e P_e = 1)
        loss = E · Σ_e f_e · P_e

    This is ``load_balancing_loss_func`` of transformers 5.24
    (``transformers/models/mixtral/modeling_mixtral.py``, shared by the Qwen-MoE, OLMoE,
    PhiMoE, Granite-MoE, JetMoe, DBRX, GPT-OSS, Ernie 4.5, MiniMax, Jamba... models) with
    ``attention_mask`` = ``real``; ``aux_loss`` there is this value, and only the training
    loss adds ``router_aux_loss_coef`` times it. A perfectly balanced router
    (``f_e = k/E``, ``P_e = 1/E``) gives ``k``; collapse onto k experts gives up to ``E``.

    Gradients flow through ``P_e`` only (the top-k counts are piecewise constant), i.e.
    to the router weights. Probabilities are taken in float32 (transformers softmaxes in
    the logits' dtype, so bf16 logits agree to bf16 precision). ``real`` is a bool
    ``[R*L]`` mask matching every layer's rows; padding rows contribute nothing, even if
    their logits are NaN (a fully masked query row under SDPA), and no real row at all
    gives 0. Computed with masked sums rather than boolean indexing, so nothing
    synchronises with the host.
    """
    real = real.reshape(-1).bool()
    weight = real.to(torch.float32)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=weight.device)
    prob_sums = torch.zeros(num_experts, dtype=torch.float32, device=weight.device)
    for layer in router_logits:
        if layer.shape != (weight.numel(), num_experts):
            raise ValueError(
                f"router logits {tuple(layer.shape)} do not match {weight.numel()} positions x {num_experts} experts"
            )
        probs = torch.softmax(layer.to(device=weight.device, dtype=torch.float32), dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]; ties aside, the experts the router picked
        counts = counts.index_add(0, chosen.reshape(-1), weight.repeat_interleave(top_k))
        prob_sums = prob_sums + probs.masked_fill(~real[:, None], 0.0).sum(dim=0)
    rows = (weight.sum() * len(router_logits)).clamp_min(1.0)
    return num_experts * torch.dot(counts / rows, prob_sums / rows)
