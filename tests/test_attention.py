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


@pytest.mark.parametrize("packing", [True, False])
def test_sliding_window_is_honoured_in_blocks_and_masks(monkeypatch, packing):
    """Mistral passes its sliding window: with a window shorter than the segments, block attention
    and the masked SDPA path both equal the model's own forward, one sequence at a time."""
    exs = examples()
    longest = max(len(e.prompt_ids) + sum(map(len, e.completions)) for e in exs)
    calls = []
    real = attention.segment_attention
    monkeypatch.setattr(attention, "segment_attention", lambda *a, **k: calls.append(k.get("window")) or real(*a, **k))
    attention.register()
    for window in (4096, 6, longest - 1):
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=64, sliding_window=window)).eval()
        model.config._attn_implementation = "sdpa"
        batch = collate(exs, pad_token_id=0, packing=packing)
        naive = naive_logps(model, exs)
        with torch.no_grad():
            masked = completion_logps(model, batch).logps
            calls.clear()
            assert attention.use_segment_attention(model)
            blocks = completion_logps(model, batch).logps
        assert calls and set(calls) == {window}
        assert torch.allclose(masked, naive, atol=1e-5)
        assert torch.allclose(blocks, naive, atol=1e-5)


def test_window_masks_count_positions_inside_the_sequence():
    # completion of 3 after a prompt of 4 and 2 other tokens, window 3: sees prompt tokens 2, 3 (positions
    # 4 - 2 and 4 - 1 back), then itself
    m = attention._completion_mask(prompt=4, before=2, length=3, device=torch.device("cpu"), window=3)
    assert m.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 0, 0],
                                [0, 0, 0, 1, 0, 0, 1, 1, 0],
                                [0, 0, 0, 0, 0, 0, 1, 1, 1]]


def test_use_segment_attention_only_switches_sdpa_models():
    model = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64))
    model.config._attn_implementation = "eager"
    assert not attention.use_segment_attention(model)
    assert model.config._attn_implementation == "eager"
