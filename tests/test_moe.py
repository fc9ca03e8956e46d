"""The MoE load-balancing loss of prefopt.moe against transformers' own, on tiny random models."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, LlamaConfig
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from prefopt.moe import decoder_supports_router_logits, load_balancing_loss, moe_routing, router_logits_from

VOCAB, EXPERTS, TOP_K = 64, 4, 2
COEF = 0.25  # != 1, to see whether aux_loss comes back scaled by it

BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.5)  # peaked routers, so counting the padding would show
ROUTED = dict(num_local_experts=EXPERTS, num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=16,
              router_aux_loss_coef=COEF)
FULL = ["full_attention", "full_attention"]

# Families whose ForCausalLM returns aux_loss in transformers 5.24, with what a tiny config needs beyond BASE.
FAMILIES = {
    "mixtral": ROUTED,
    "qwen2_moe": {**ROUTED, "shared_expert_intermediate_size": 16},
    "qwen3_moe": ROUTED,
    "olmoe": ROUTED,
    "phimoe": ROUTED,
    "granitemoe": ROUTED,
    "granitemoeshared": {**ROUTED, "shared_intermediate_size": 16},
    "jetmoe": {**ROUTED, "num_key_value_heads": 4, "kv_channels": 8, "aux_loss_coef": COEF},
    # a window wider than the rows, so the test's one 4-D mask is right for both layer types
    # (prefopt's own masks add the window per layer type)
    "gpt_oss": {**ROUTED, "head_dim": 8, "layer_types": ["full_attention", "sliding_attention"], "sliding_window": 16},
    "ernie4_5_moe": {**ROUTED, "moe_num_experts": EXPERTS, "moe_k": TOP_K, "moe_layer_start_index": 0},
    "minimax": {**ROUTED, "layer_types": FULL},
    "minimax_m2": {**ROUTED, "head_dim": 8},
    "flex_olmo": ROUTED,
    "jamba": {**ROUTED, "expert_layer_period": 1, "expert_layer_offset": 0, "attn_layer_period": 1,
              "attn_layer_offset": 0},
    "qwen3_next": {**ROUTED, "layer_types": FULL, "head_dim": 8, "shared_expert_intermediate_size": 16},
    "qwen3_5_moe_text": {**ROUTED, "layer_types": FULL, "head_dim": 8, "shared_expert_intermediate_size": 16},
    "granitemoehybrid": {**ROUTED, "layer_types": ["attention", "attention"], "shared_intermediate_size": 16,
                         "mamba_n_heads": 8, "mamba_d_head": 8},
    "mellum": ROUTED,
    "lara_mini": ROUTED,
    "laguna": ROUTED,
    "flint": {**ROUTED, "mlp_only_layers": [], "shared_expert_intermediate_size": 16, "head_dim": 8},
    "deepseek_v4": {**ROUTED, "n_routed_experts": EXPERTS, "mlp_layer_types": ["moe", "moe"]},  # no hash layers
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=VOCAB, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, initializer_range=0.5,
                 # DbrxAttention reads rope_theta here and clamps q/k/v by clip_qkv unconditionally
                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 16, "moe_num_experts": EXPERTS, "moe_top_k": TOP_K,
                             "moe_loss_weight": COEF}),
}


def tiny_config(family: str):
    kwargs = FAMILIES[family] if family == "dbrx" else {**BASE, **FAMILIES[family]}
    return CONFIG_MAPPING[family](**kwargs)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(request.param)).eval()
    return request.param, model


def random_logits(layers: int, rows: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, EXPERTS, generator=g) * 2 for _ in range(layers)]


# --- the loss itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_transformers_load_balancing_loss_func(top_k, padded):
    mask2d = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    if not padded:
        mask2d = torch.ones_like(mask2d)
    logits = random_logits(layers=3, rows=mask2d.numel(), seed=top_k)
    ours = load_balancing_loss(logits, mask2d.bool().reshape(-1), EXPERTS, top_k)
    theirs = load_balancing_loss_func(tuple(logits), EXPERTS, top_k, mask2d if padded else None)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_hand_computed_three_tokens_two_experts_top1():
    # softmax([ln 3, 0]) = [3/4, 1/4]; tokens go to experts 0, 1, 0 (top-1)
    l3 = math.log(3.0)
    logits = [torch.tensor([[l3, 0.0], [0.0, l3], [l3, 0.0]])]
    # f = [2/3, 1/3], P = [(3/4 + 1/4 + 3/4)/3, (1/4 + 3/4 + 1/4)/3] = [7/12, 5/12]
    # loss = 2 * (2/3 * 7/12 + 1/3 * 5/12) = 2 * 19/36 = 19/18
    all_real = torch.tensor([True, True, True])
    torch.testing.assert_close(load_balancing_loss(logits, all_real, 2, 1), torch.tensor(19 / 18))
    # the third token as padding: f = [1/2, 1/2], P = [1/2, 1/2], loss = 2 * 1/2 = 1, the balanced value k
    first_two = torch.tensor([True, True, False])
    torch.testing.assert_close(load_balancing_loss(logits, first_two, 2, 1), torch.tensor(1.0))


def test_padding_rows_ignored_even_when_nan():
    real = torch.tensor([True, True, True, False, False, True, True, False])
    logits = random_logits(layers=2, rows=real.numel(), seed=3)
    expected = load_balancing_loss([l[real] for l in logits], torch.ones(int(real.sum()), dtype=torch.bool),
                                   EXPERTS, TOP_K)
    poisoned = [l.masked_fill(~real[:, None], float("nan")) for l in logits]
    torch.testing.assert_close(load_balancing_loss(poisoned, real, EXPERTS, TOP_K), expected)


def test_collapsed_router_scores_num_experts_and_no_real_token_scores_zero():
    collapsed = [torch.tensor([[30.0, 30.0, 0.0, 0.0]]).expand(5, 4)]
    torch.testing.assert_close(load_balancing_loss(collapsed, torch.ones(5, dtype=torch.bool), 4, 2),
                               torch.tensor(4.0))
    torch.testing.assert_close(load_balancing_loss(collapsed, torch.zeros(5, dtype=torch.bool), 4, 2),
                               torch.tensor(0.0))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        load_balancing_loss(random_logits(1, 6, 0), torch.ones(5, dtype=torch.bool), EXPERTS, TOP_K)


# --- configs and decoder outputs ------------------------------------------------------------------


def test_moe_routing_dense_and_special_configs():
    assert moe_routing(LlamaConfig(**BASE)) is None
    assert moe_routing(CONFIG_MAPPING["doge"](is_moe=False)) is None  # carries num_experts, but dense
    assert moe_routing(CONFIG_MAPPING["qwen3_vl_moe"]()) == (60, 4)  # composite: read from text_config
    assert moe_routing(CONFIG_MAPPING["deepseek_v3"](n_routed_experts=8, num_experts_per_tok=2)) == (8, 2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_moe_routing_of_tiny_configs(family):
    assert moe_routing(tiny_config(family)) == (EXPERTS, TOP_K)


def test_router_logits_from_dense_and_unsupported_outputs():
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**BASE)).eval()
    decoder = llama.get_decoder()
    assert not decoder_supports_router_logits(decoder)
    out = decoder(input_ids=torch.randint(3, VOCAB, (1, 4)), use_cache=False)
    assert router_logits_from(out) is None
    assert router_logits_from(SimpleNamespace(router_logits=())) is None
    with pytest.raises(ValueError, match="tokens, experts"):  # Doge's product-key logits
        router_logits_from(SimpleNamespace(router_logits=(torch.zeros(2, 8, 4),)))


def _aux(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """The aux_loss transformers' own ForCausalLM returns (its attention_mask, if any, is 2-D)."""
    return model(input_ids=ids, output_router_logits=True, use_cache=False, **kwargs).aux_loss


def test_family_aux_loss_matches_transformers_and_ignores_padding(family_model):
    family, model = family_model
    experts, top_k = moe_routing(model.config)
    decoder = model.get_decoder()
    assert decoder_supports_router_logits(decoder)
    g = torch.Generator().manual_seed(1)
    R, L, P = 2, 6, 3
    ids = torch.randint(3, VOCAB, (R, L), generator=g)
    with torch.no_grad():
        logits = router_logits_from(decoder(input_ids=ids, output_router_logits=True, use_cache=False))
        assert logits is not None and all(t.shape == (R * L, experts) for t in logits)
        ours = load_balancing_loss(logits, torch.ones(R * L, dtype=torch.bool), experts, top_k)
        theirs = _aux(model, ids)  # not multiplied by router_aux_loss_coef (COEF): that goes into .loss only
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

        # the same rows with P positions of random right padding, hidden by a 4-D mask as prefopt's
        padded = torch.cat([ids, torch.randint(3, VOCAB, (R, P), generator=g)], dim=1)
        real2d = torch.arange(L + P)[None, :].expand(R, -1) < L
        causal = torch.ones(L + P, L + P, dtype=torch.bool).tril()
        seen = (causal[None] & real2d[:, None, :]) | torch.eye(L + P, dtype=torch.bool)  # padding sees itself
        # additive, the form every implementation takes (eager, GPT-OSS's default, would add a bool mask as 0/1)
        mask4d = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)
        out = decoder(input_ids=padded, attention_mask=mask4d[:, None], use_cache=False, output_router_logits=True,
                      position_ids=torch.arange(L + P)[None].expand(R, -1))
        padded_logits = router_logits_from(out)
        ours_padded = load_balancing_loss(padded_logits, real2d.reshape(-1), experts, top_k)
        torch.testing.assert_close(ours_padded, ours, rtol=1e-5, atol=1e-5)
        # and transformers with its 2-D mask on the padded batch agrees too
        torch.testing.assert_close(_aux(model, padded, attention_mask=real2d.long()), ours, rtol=1e-5, atol=1e-5)
        # the padding would have mattered had it been counted
        counted = load_balancing_loss(padded_logits, torch.ones(R * (L + P), dtype=torch.bool), experts, top_k)
        assert not torch.allclose(counted, ours, rtol=1e-4, atol=1e-4)


def test_coefficient_applies_outside_aux_loss():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral")).eval()
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        with_router = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
        plain = model(input_ids=ids, labels=ids, output_router_logits=False, use_cache=False)
    torch.testing.assert_close(with_router.loss, plain.loss + COEF * with_router.aux_loss)


def test_gradient_reaches_every_router():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("mixtral"))
    decoder = model.get_decoder()
    ids = torch.randint(3, VOCAB, (2, 5))
    logits = router_logits_from(decoder(input_ids=ids, output_router_logits=True, use_cache=False))
    load_balancing_loss(logits, torch.ones(10, dtype=torch.bool), *moe_routing(model.config)).backward()
    for layer in decoder.layers:
        grad = layer.mlp.gate.weight.grad
        assert grad is not None and grad.abs().sum() > 0
