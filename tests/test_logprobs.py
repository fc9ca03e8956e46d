"""Log-probs from packed, prefix-shared batches equal a naive full log_softmax, on several architectures."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import prefopt.attention as attention
from prefopt.batching import collate, padded_token_count
from prefopt.layers import slim_activations, trim_last_mlp, trimmed_mlp
from prefopt.logprobs import completion_logps

VOCAB = 97


@dataclass
class Ex:
    prompt_ids: list
    completions: list
    index: int = 0
    line: int = 0
    label: object = None
    truncated: bool = False


def examples(seed: int = 0, n_comp: int = 2) -> list[Ex]:
    g = torch.Generator().manual_seed(seed)

    def rnd(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    lengths = [(5, 7, 3), (12, 4, 9), (3, 15, 2), (8, 8, 8), (1, 3, 6), (20, 1, 11)]
    return [Ex(rnd(p), [rnd(c), rnd(r), rnd(4)][:n_comp], i) for i, (p, c, r) in enumerate(lengths)]


def make_model(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64)
        model = Qwen2ForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    if attn == attention.NAME:
        attention.register()
    model.config._attn_implementation = attn
    return model.eval()


def naive_logps(model, exs) -> torch.Tensor:
    """One sequence at a time, the model's own forward, the full log_softmax."""
    out = []
    for ex in exs:
        for c in ex.completions:
            ids = torch.tensor([ex.prompt_ids + c])
            logp = model(ids).logits.float().log_softmax(-1)[0]
            P = len(ex.prompt_ids)
            out.append(sum(logp[P - 1 + k, c[k]] for k in range(len(c))))
    return torch.stack(out)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", attention.NAME])
@pytest.mark.parametrize("prefix_sharing,packing", [(True, True), (True, False), (False, True), (False, False)])
def test_packed_equals_naive(arch, attn, prefix_sharing, packing, monkeypatch):
    model = make_model(arch, attn)
    assert trim_last_mlp(model)  # the last MLP runs on the head's rows only (the naive forward: on all)
    exs = examples()
    batch = collate(exs, pad_token_id=0, prefix_sharing=prefix_sharing, packing=packing)
    calls = []
    real = attention.segment_attention
    monkeypatch.setattr(attention, "segment_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        ref = naive_logps(model, exs)  # the model's own forward: no layout, so plain SDPA
        assert not calls
        got = completion_logps(model, batch, chunk_size=7)
    # prefopt's block attention really ran (once per layer), it did not fall back to the mask
    assert len(calls) == (2 if attn == attention.NAME else 0)
    assert torch.allclose(got.logps, ref, atol=1e-5, rtol=0)
    assert got.tokens.tolist() == [float(len(c)) for ex in exs for c in ex.completions]


def test_three_completions_share_one_prompt():
    model = make_model("llama", "sdpa")
    exs = examples(n_comp=3)
    batch = collate(exs, pad_token_id=0)
    with torch.no_grad():
        assert torch.allclose(completion_logps(model, batch).logps, naive_logps(model, exs), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gradients_match_full_head(arch):
    """The chunked LM head (hand-written backward), block attention and lean activations give the
    gradients of the plain full forward with SDPA and the modules' own forwards."""
    exs = examples()
    batch = collate(exs, pad_token_id=0)
    grads = []
    for full in (False, True):
        model = make_model(arch, "sdpa" if full else attention.NAME).train()
        if not full:
            assert slim_activations(model) == {"rmsnorm": 5, "swiglu": 2}
            assert trim_last_mlp(model)
        lp = completion_logps(model, batch, chunk_size=5, full_head=full).logps
        (lp * torch.linspace(-1, 1, lp.numel())).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trimmed_last_mlp_sees_only_the_heads_rows(arch):
    model = make_model(arch, attention.NAME)
    exs = examples()
    batch = collate(exs, pad_token_id=0)
    with torch.no_grad():
        want = completion_logps(model, batch).logps
        assert trim_last_mlp(model) and trim_last_mlp(model)  # patching twice is a no-op
        mlp = trimmed_mlp(model)
        seen = []
        full = mlp._prefopt_full
        mlp._prefopt_full = lambda x: seen.append(x.shape[:-1].numel()) or full(x)
        got = completion_logps(model, batch).logps
        read = batch.hidden_index.unique().numel()  # a prompt's last row serves each completion
        assert seen == [read] and read < batch.target_ids.numel() < batch.real_tokens
        assert mlp._prefopt_rows is None  # reset after the call: a plain forward is whole again
        seen.clear()
        ids = torch.tensor([exs[0].prompt_ids + exs[0].completions[0]])
        model(ids)
        assert seen == [ids.numel()]
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_mixture_of_experts_mlp_is_not_trimmed():
    from transformers import MixtralConfig, MixtralForCausalLM

    model = MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                             num_local_experts=4, num_experts_per_tok=2))
    assert not trim_last_mlp(model) and trimmed_mlp(model) is None


def test_prefix_sharing_and_packing_shrink_the_batch():
    exs = examples()
    padded = collate(exs, pad_token_id=0, prefix_sharing=False, packing=False)
    shared = collate(exs, pad_token_id=0, prefix_sharing=True, packing=False)
    packed = collate(exs, pad_token_id=0, prefix_sharing=True, packing=True)
    assert padded.real_tokens == sum(padded_token_count(e) for e in exs)
    assert shared.real_tokens == sum(len(e.prompt_ids) + sum(map(len, e.completions)) for e in exs)
    assert packed.slots < shared.slots < padded.slots
    assert packed.input_ids.shape[1] == shared.input_ids.shape[1]  # rows never longer than unpacked


def test_mask_hides_chosen_from_rejected_and_restarts_positions():
    ex = Ex([5, 6], [[7, 8, 9], [10, 11]])
    b = collate([ex], pad_token_id=0, packing=False)
    m = b.attention_mask[0, 0]
    # rows: prompt 0-1, chosen 2-4, rejected 5-6
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert m[5, :2].all() and not m[5, 2:5].any() and m[5, 5] and not m[5, 6]
    assert m[4, :5].all() and not m[4, 5:].any()
    # the first rejected token is predicted from the prompt's last position, like the first chosen token
    assert b.hidden_index.tolist() == [1, 2, 3, 1, 5]
    assert b.target_ids.tolist() == [7, 8, 9, 10, 11]


def test_wpo_weight_matches_definition():
    model = make_model("llama", "sdpa")
    exs = examples()[:2]
    batch = collate(exs, pad_token_id=0)
    with torch.no_grad():
        got = completion_logps(model, batch, with_wpo=True).wpo_logw
        expect = []
        for ex in exs:
            for c in ex.completions:
                logp = model(torch.tensor([ex.prompt_ids + c])).logits.float().log_softmax(-1)[0]
                P = len(ex.prompt_ids)
                terms = [logp[P - 1 + k, c[k]] - torch.logsumexp(2 * logp[P - 1 + k], -1) for k in range(len(c))]
                expect.append(torch.stack(terms).mean())
    assert torch.allclose(got, torch.stack(expect), atol=1e-5)
