"""Block attention (prefopt.attention) equals SDPA with the collated mask, values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MistralConfig, MistralForCausalLM

import prefopt.attention as attention
from prefopt.batching import collate
from prefopt.logprobs import completion_logps

from test_logprobs import Ex, examples, naive_logps


def qkv(batch, heads=4, kv_heads=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    R, L = batch.input_ids.shape

    def t(h):
        # [B, L, H, D] transposed to [B, H, L, D], as the models hand it over (non-contiguous)
        return torch.randn(R, L, h, dim, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()

    return t(heads), t(kv_heads), t(kv_heads)


def masked_sdpa(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def real_positions(batch):
    m = batch.attention_mask[:, 0]
    return (m.sum(-1) > 1) | (m.sum(-2) > 1)


@pytest.mark.parametrize("n_comp", [1, 2, 3])
@pytest.mark.parametrize("prefix_sharing,packing", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_segments_equal_masked_sdpa(n_comp, prefix_sharing, packing, kv_heads):
    batch = collate(examples(n_comp=n_comp), pad_token_id=0, prefix_sharing=prefix_sharing, packing=packing)
    assert len(batch.segments) == batch.input_ids.shape[0]
    if packing:
        assert any(len(row) > 1 for row in batch.segments)  # several segments share a row
    q, k, v = qkv(batch, kv_heads=kv_heads)
    want = masked_sdpa(q, k, v, batch.attention_mask)
    got = attention.segment_attention(q, k, v, batch.segments)
    real = real_positions(batch)
    assert got.shape == want.shape
    assert torch.allclose(got[real], want[real], atol=1e-12)
    assert (got[~real] == 0).all()
    w = torch.randn_like(want) * real[:, :, None, None]
    g_want = torch.autograd.grad((want * w).sum(), (q, k, v))
    g_got = torch.autograd.grad((got * w).sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-12)


def test_completion_mask_shows_prompt_and_itself_only():
    m = attention._completion_mask(prompt=2, before=3, length=2, device=torch.device("cpu"))
    assert m.tolist() == [[True, True, False, False, False, True, False],
                          [True, True, False, False, False, True, True]]


def test_without_a_layout_the_call_is_plain_sdpa():
    class Module(torch.nn.Module):
        is_causal = True

    batch = collate([Ex([1, 2], [[3, 4], [5]])], pad_token_id=0)
    q, k, v = qkv(batch)
    plain, _ = attention.prefopt_sdpa_forward(Module(), q, k, v, batch.attention_mask)
    assert torch.allclose(plain, masked_sdpa(q, k, v, batch.attention_mask), atol=1e-12)
    with pytest.raises(ValueError, match="not contiguous"):
        attention.segment_attention(q, k, v, (((1, 2, (2, 1)),),))


def test_sliding_window_longer_than_every_segment_keeps_blocks(monkeypatch):
    """Mistral passes its sliding window; blocks are used only when no segment exceeds it."""
    exs = examples()
    longest = max(len(e.prompt_ids) + sum(map(len, e.completions)) for e in exs)
    calls = []
    real = attention.segment_attention
    monkeypatch.setattr(attention, "segment_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    attention.register()
    for window, used in ((4096, True), (longest - 1, False)):
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=64, sliding_window=window)).eval()
        model.config._attn_implementation = "sdpa"
        batch = collate(exs, pad_token_id=0)
        with torch.no_grad():
            want = completion_logps(model, batch).logps
            calls.clear()
            assert attention.use_segment_attention(model)
            got = completion_logps(model, batch).logps
        assert bool(calls) == used
        assert torch.allclose(got, want, atol=1e-5)
        if window == 4096:
            assert torch.allclose(got, naive_logps(model, exs), atol=1e-5)


def test_use_segment_attention_only_switches_sdpa_models():
    model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64))
    model.config._attn_implementation = "eager"
    assert not attention.use_segment_attention(model)
    assert model.config._attn_implementation == "eager"
