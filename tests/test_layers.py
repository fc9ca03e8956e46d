"""Lean activations (prefopt.layers): bit-identical forwards, autograd's gradients, fewer saved bytes."""
from __future__ import annotations

import contextlib
import copy
import weakref

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from prefopt.layers import rebuild_norm_outputs, slim_activations
from prefopt.logprobs import _HeadLogps

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, head_dim=8)


def build(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    return cls(cfg_cls(**SMALL, **kw)).eval()


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for the backward (parameters excluded)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("cls,cfg_cls,expect", [
    (LlamaForCausalLM, LlamaConfig, {"rmsnorm": 5, "swiglu": 2}),
    (Qwen3ForCausalLM, Qwen3Config, {"rmsnorm": 9, "swiglu": 2}),  # per-head q/k norms too
])
def test_same_forward_same_gradients_less_saved(cls, cfg_cls, expect):
    model = build(cls, cfg_cls)
    lean = copy.deepcopy(model)
    assert slim_activations(lean) == expect
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    params = {p.untyped_storage().data_ptr() for m in (model, lean) for p in m.parameters()}
    want, saved_want = saved_bytes(lambda: model(ids).logits)
    got, saved_got = saved_bytes(lambda: lean(ids).logits)
    assert torch.equal(got, want)  # op for op the modules' own arithmetic
    act_want = sum(n for k, n in saved_want.items() if k not in params)
    act_got = sum(n for k, n in saved_got.items() if k not in params)
    assert act_got < 0.8 * act_want
    w = torch.randn_like(want)
    g_want = torch.autograd.grad((want * w).sum(), list(model.parameters()))
    g_got = torch.autograd.grad((got * w).sum(), list(lean.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), g_got, g_want):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name  # float32 rounding, summed differently


@pytest.mark.parametrize("cls,cfg_cls", [(LlamaForCausalLM, LlamaConfig), (Qwen3ForCausalLM, Qwen3Config)])
def test_rebuilt_norm_outputs_free_the_outputs_and_give_identical_gradients(cls, cfg_cls):
    """Inside rebuild_norm_outputs the graph keeps recipes, not the norms' outputs; gradients are bit-identical."""
    model = build(cls, cfg_cls)
    slim_activations(model)
    norms = [m for n, m in model.named_modules() if n.endswith("layernorm")]  # input_ and post_attention_
    assert len(norms) == 2 * SMALL["num_hidden_layers"]
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))

    def run(rebuild: bool):
        outs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outs.append(weakref.ref(o))) for m in norms]
        with rebuild_norm_outputs() if rebuild else contextlib.nullcontext():
            logits = model(ids).logits
        for h in hooks:
            h.remove()
        alive = sum(r() is not None for r in outs)
        grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
        return alive, grads

    kept, want = run(False)
    freed, got = run(True)
    assert kept == len(norms) and freed == 0
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert torch.equal(a, b), name


def test_rebuilding_a_norm_output_refuses_an_input_changed_in_place():
    model = build(LlamaForCausalLM, LlamaConfig)
    slim_activations(model)
    norm, proj = model.model.layers[0].input_layernorm, model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 5, SMALL["hidden_size"], requires_grad=True) * 1.0
    with rebuild_norm_outputs():
        y = proj(norm(x))
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()

    # an output changed in place before it is saved is kept as it is, not rebuilt from its recipe
    x = torch.randn(1, 5, SMALL["hidden_size"])
    grads = []
    for rebuild in (False, True):
        with rebuild_norm_outputs() if rebuild else contextlib.nullcontext():
            h = norm(x)
            h.mul_(3)
            y = proj(h)
        grads.append(torch.autograd.grad(y.square().sum(), proj.weight)[0])
    assert torch.equal(grads[0], grads[1])


def test_modules_with_other_arithmetic_are_left_alone():
    """Gemma's norm scales by (1 + weight) and its MLP uses GELU: neither matches, neither is patched."""
    model = build(GemmaForCausalLM, GemmaConfig)
    assert slim_activations(model) == {"rmsnorm": 0, "swiglu": 0}
    assert all("forward" not in vars(m) for m in model.modules())


def test_lora_added_after_patching_still_trains_the_adapters():
    from peft import LoraConfig, get_peft_model

    base = build(LlamaForCausalLM, LlamaConfig)
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "q_proj"],
                                                           init_lora_weights=False))
    slim_activations(base)
    lean = get_peft_model(base, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "q_proj"],
                                           init_lora_weights=False))
    lean.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 97, (1, 9))
    a, b = plain(ids).logits, lean(ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    ga = torch.autograd.grad(a.square().sum(), [p for p in plain.parameters() if p.requires_grad])
    gb = torch.autograd.grad(b.square().sum(), [p for p in lean.parameters() if p.requires_grad])
    assert len(ga) == len(gb) > 0
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_logps_backward_matches_autograd(dtype, keep):
    """Both backward paths: the kept softmax (last chunk) and the recomputed logits (others)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=g).to(dtype).requires_grad_()
    w = torch.randn(41, 16, generator=g).to(dtype).requires_grad_()
    t = torch.randint(0, 41, (23,), generator=g)
    up = torch.randn(23, generator=g)
    got = _HeadLogps.apply(h, w, t, keep)
    want = torch.nn.functional.linear(h, w).float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-5)
    g_got = torch.autograd.grad((got * up).sum(), (h, w), retain_graph=True)
    again = torch.autograd.grad((got * up).sum(), (h, w))  # the kept softmax is used up: recomputed now
    assert all(torch.equal(a, b) for a, b in zip(g_got, again)) or keep
    assert all(torch.allclose(a.float(), b.float(), atol=1e-5 if dtype == torch.float32 else 2e-2)
               for a, b in zip(g_got, again))
    g_want = torch.autograd.grad((want * up).sum(), (h, w))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def test_head_chunks_shrink_for_large_vocabularies(monkeypatch):
    """A chunk's logits stay under 2**24 elements; the log-probs do not depend on the chunking."""
    import prefopt.logprobs as lp
    from prefopt.batching import collate

    from test_logprobs import examples

    assert lp.head_chunk_tokens(1024, 8192) == 1024
    assert lp.head_chunk_tokens(1024, 151_936) == 110
    assert lp.head_chunk_tokens(1024, 10**9) == 16
    # on a GPU the free memory sizes the chunk: 1024 rows of a 152k vocabulary with 100 GiB free,
    # never below the CPU's budget, never above --lm-head-chunk-size
    assert lp.head_chunk_tokens(1024, 151_936, free_bytes=100 << 30) == 1024
    assert lp.head_chunk_tokens(1024, 151_936, free_bytes=1 << 30) == 110
    assert lp.head_chunk_tokens(1024, 151_936, free_bytes=4 << 30) == (4 << 30) // 64 // 151_936 == 441
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMALL)).train()
    batch = collate(examples(), pad_token_id=0)
    want = lp.completion_logps(model, batch, chunk_size=4096).logps
    sizes = []
    real = lp._HeadLogps.apply
    monkeypatch.setattr(lp, "HEAD_CHUNK_ELEMENTS", 97 * 20)  # as if the vocabulary were huge: 20 tokens a chunk
    kept = []
    monkeypatch.setattr(lp._HeadLogps, "apply",
                        lambda h, w, t, keep: sizes.append(h.shape[0]) or kept.append(keep) or real(h, w, t, keep))
    got = lp.completion_logps(model, batch, chunk_size=4096).logps
    assert max(sizes) == 20 and len(sizes) > 1 and sum(sizes) == batch.target_ids.numel()
    assert kept == [False] * (len(sizes) - 1) + [True]  # only the last chunk's softmax outlives its forward
    assert torch.allclose(got, want, atol=1e-5)
    grads = torch.autograd.grad(got.sum(), list(model.parameters()))
    monkeypatch.undo()
    for a, b in zip(grads, torch.autograd.grad(lp.completion_logps(model, batch, chunk_size=4096).logps.sum(),
                                               list(model.parameters()))):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
