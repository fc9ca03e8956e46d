"""The fast-path check: it finds what differs from the model's plain forward, switches off only that,
says so in one line, and caches the decision."""
from __future__ import annotations

import logging
import random

import pytest
import torch
import transformers as T

import prefopt.logprobs as lp
from prefopt.attention import NAME as SEGMENT_ATTENTION
from prefopt.attention import use_segment_attention
from prefopt.batching import collate
from prefopt.fastpath import ORDER, cached_decide, check_rows, decide
from prefopt.logprobs import completion_logps
from prefopt.modeling import disable_dropout

from test_logprobs import Ex, naive_logps

VOCAB = 97
SIZES = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
ALL = {k: True for k in ORDER}


def rows(n: int = 8, seed: int = 0) -> list[Ex]:
    g = random.Random(seed)

    def ids(k):
        return [g.randint(3, VOCAB - 1) for _ in range(k)]

    return [Ex(ids(g.randint(3, 20)), [ids(g.randint(2, 15)), ids(g.randint(2, 15))], i) for i in range(n)]


def build(config_cls, model_cls, attn="sdpa", **extra):
    torch.manual_seed(0)
    config = config_cls(**{**SIZES, **extra})
    config._attn_implementation = attn
    model = model_cls(config)
    disable_dropout(model)
    if attn == "sdpa":
        assert use_segment_attention(model)
    return model.eval()


def run(model, with_grad=True, dtype=torch.float32, data=None):
    return decide(model, data or rows(), ALL, pad_id=0, with_grad=with_grad, split=True, chunk_size=1024,
                  device="cpu", dtype=dtype)


def logps_as_decided(model, fast, data):
    batch = collate(data, pad_token_id=0, prefix_sharing=fast.features["prefix_sharing"],
                    packing=fast.features["packing"], plain=not fast.features["masks"])
    with torch.no_grad():
        return completion_logps(model, batch, full_head=not fast.features["fused_head"]).logps


def test_llama_keeps_every_fast_path_and_the_check_is_quick():
    model = build(T.LlamaConfig, T.LlamaForCausalLM)
    fast = run(model)
    assert fast.features == ALL and not fast.off and fast.train_mode
    assert fast.seconds < 5
    assert model.config._attn_implementation == SEGMENT_ATTENTION   # patches left as decided


def test_a_head_transform_the_fused_head_misses_switches_off_that_alone(monkeypatch, caplog):
    """Granite divides its logits by logits_scaling. Were the fused head to skip it (it did), the check
    must catch it, switch off the fused head (and the trim that lives inside it) and nothing else."""
    model = build(T.GraniteConfig, T.GraniteForCausalLM, logits_scaling=8.0)
    monkeypatch.setattr(lp, "_postprocess_logits", lambda config, logits: logits)
    monkeypatch.setattr(lp, "_plain_head", lambda head, config: True)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        fast = run(model)
    assert set(fast.off) == {"fused_head", "trim_last_layer"}
    assert fast.features["prefix_sharing"] and fast.features["packing"] and fast.features["block_attention"]
    lines = [r.getMessage() for r in caplog.records if "fast-path check" in r.getMessage()]
    assert len(lines) == 1 and "GraniteForCausalLM" in lines[0] and "fused LM head" in lines[0]
    data = rows()
    assert torch.allclose(logps_as_decided(model, fast, data), naive_logps(model, data), atol=1e-4)


def test_granite_scaling_is_applied_by_the_fused_head():
    model = build(T.GraniteConfig, T.GraniteForCausalLM, logits_scaling=8.0)
    assert run(model).features == ALL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lost_sliding_window_is_caught_in_either_dtype(monkeypatch, dtype):
    """Gemma 2 runs eager attention with prefopt's masks; without the window in them the numbers differ."""
    model = build(T.Gemma2Config, T.Gemma2ForCausalLM, attn="eager", head_dim=8, sliding_window=8).to(dtype)
    assert run(model, dtype=dtype).features["masks"]       # windows honoured: the masks are kept
    monkeypatch.setattr(lp, "layer_masks", lambda config, mask, positions: mask)
    fast = run(model, dtype=dtype)
    assert not fast.features["masks"] and "masks" in fast.off


def test_alibi_models_run_on_the_plain_path_without_a_traceback(caplog):
    model = build(T.BloomConfig, T.BloomForCausalLM, attn="eager", n_head=4, n_layer=2)
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        fast = run(model)
    assert not fast.features["masks"] and fast.off["masks"].startswith("raises ValueError")
    assert sum("fast-path check" in r.getMessage() for r in caplog.records) == 1
    data = rows()
    assert torch.allclose(logps_as_decided(model, fast, data), naive_logps(model, data), atol=1e-4)


def test_dropout_in_float_attributes_is_switched_off():
    torch.manual_seed(0)
    model = T.OPTForCausalLM(T.OPTConfig(**{**SIZES, "ffn_dim": 64, "word_embed_proj_dim": 32}, dropout=0.1,
                                         layerdrop=0.1, attention_dropout=0.1))
    disable_dropout(model)
    floats = [(n, k, v) for n, m in model.named_modules() for k, v in vars(m).items()
              if isinstance(v, float) and ("dropout" in k or "layerdrop" in k)]
    assert floats and all(v == 0.0 for _, _, v in floats)


def test_randomness_left_in_training_mode_makes_the_policy_train_in_eval_mode(caplog):
    torch.manual_seed(0)
    config = T.OPTConfig(**{**SIZES, "ffn_dim": 64, "word_embed_proj_dim": 32}, dropout=0.1)
    config._attn_implementation = "sdpa"
    model = T.OPTForCausalLM(config)        # dropout deliberately left on
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        fast = run(model)
    assert not fast.train_mode
    assert fast.features["masks"] and fast.features["prefix_sharing"] and fast.features["packing"]
    assert any("evaluation mode" in r.getMessage() for r in caplog.records)


def test_scoring_only_checks_log_probs():
    model = build(T.Qwen2Config, T.Qwen2ForCausalLM, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    fast = run(model, with_grad=False)
    assert fast.features == ALL


def test_the_decision_is_cached_and_reapplied(tmp_path):
    model = build(T.GraniteConfig, T.GraniteForCausalLM, logits_scaling=8.0)
    path = tmp_path / "check.json"
    kwargs = dict(pad_id=0, with_grad=True, split=True, chunk_size=1024, device="cpu", dtype=torch.float32)
    first = cached_decide(model, rows(), ALL, cache_file=path, **kwargs)
    assert not first.cached and path.exists()
    other = build(T.GraniteConfig, T.GraniteForCausalLM, logits_scaling=8.0)
    other.set_attn_implementation("sdpa")
    second = cached_decide(other, rows(), ALL, cache_file=path, **kwargs)
    assert second.cached and second.features == first.features
    assert other.config._attn_implementation == SEGMENT_ATTENTION     # the cached decision was applied
    path.write_text("{not json")                                      # a damaged file is recomputed
    assert not cached_decide(other, rows(), ALL, cache_file=path, **kwargs).cached


def test_check_rows_take_the_longest_and_renumber():
    data = rows(20)
    picked = check_rows(data + rows(5, seed=3))
    size = sorted((len(e.prompt_ids) + sum(map(len, e.completions)) for e in data + rows(5, seed=3)), reverse=True)
    got = sorted((len(e.prompt_ids) + sum(map(len, e.completions)) for e in picked), reverse=True)
    assert len(picked) == 5 and got[:2] == size[:2]
    assert [e.index for e in picked] == list(range(5))
    # the fifth shares the shortest prompt of the four, repeats its first completion and cuts its last,
    # so the check also proves the grouped layout (one segment per prompt, a repeated completion scored once)
    twin = min(picked[:4], key=lambda e: len(e.prompt_ids))
    assert picked[4].prompt_ids == twin.prompt_ids and picked[4].completions[0] == twin.completions[0]
    assert twin.completions[-1][:len(picked[4].completions[-1])] == picked[4].completions[-1]


def test_flex_attention_gets_a_block_mask_that_masks():
    """transformers' own flex attention takes prefopt's masks as a BlockMask made from the dense one."""
    model = build(T.LlamaConfig, T.LlamaForCausalLM, attn="flex_attention")
    data = rows()
    batch = collate(data, pad_token_id=0, pad_to_multiple_of=128)  # torch 2.13's compiled CPU kernel: whole blocks
    with torch.no_grad():
        got = completion_logps(model, batch).logps
    plain = build(T.LlamaConfig, T.LlamaForCausalLM)
    assert torch.allclose(got, naive_logps(plain, data), atol=1e-4)


def test_kernels_without_custom_masks_are_refused_by_name_unless_plain():
    model = build(T.LlamaConfig, T.LlamaForCausalLM)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        completion_logps(model, collate(rows(), pad_token_id=0))


def test_plain_batches_equal_the_models_own_forward_one_sequence_at_a_time():
    model = build(T.LlamaConfig, T.LlamaForCausalLM)
    data = rows()
    with torch.no_grad():
        got = completion_logps(model, collate(data, pad_token_id=0, plain=True)).logps
    assert torch.allclose(got, naive_logps(model, data), atol=1e-5)


def _probe(values):
    from prefopt.fastpath import Probe

    return Probe(torch.as_tensor(values, dtype=torch.float64), None)


def test_low_precision_noise_passes_when_no_further_from_float32_than_the_plain_path():
    """On a GPU two correct bf16 layouts differ by bf16's own noise (~0.04 nats a token on a 150M
    Qwen2 with a trained model's logit spread, beyond the fixed 0.02): judged against float32, a
    fast path as close to it as the plain path passes; one with a fault of its own does not."""
    from prefopt.fastpath import TOLERANCES, compare

    tol = TOLERANCES[torch.bfloat16]
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(8, 50, generator=g, dtype=torch.float64) - 3
    plain = exact + 0.05 * torch.randn(8, 50, generator=g, dtype=torch.float64)
    fast = exact + 0.05 * torch.randn(8, 50, generator=g, dtype=torch.float64)
    assert compare(_probe(fast), _probe(plain), tol) is not None                  # the fixed tolerance alone
    assert compare(_probe(fast), _probe(plain), tol, _probe(exact)) is None       # as exact as bf16 allows
    faulty = fast - 0.05                                                           # e.g. a logit scale lost
    why = compare(_probe(faulty), _probe(plain), tol, _probe(exact))
    assert why is not None and "from float32" in why


@pytest.mark.parametrize("pure", [False, True])
def test_the_float32_reference_leaves_low_precision_weights_as_they_were(pure):
    """The check's float32 pass upcasts bf16 weights for the while and puts back the same bits."""
    from prefopt.fastpath import float32_references

    model = build(T.LlamaConfig, T.LlamaForCausalLM)
    if pure:
        model = model.to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = check_rows(rows(4))
    common = dict(pad_id=0, split=True, chunk_size=64, device="cpu", autocast=None if pure else torch.bfloat16)
    exact, exact_grad = float32_references(model, data, data[:2], common)
    assert exact.token_logps.dtype == torch.float64 and exact_grad.grads is not None
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_the_float32_reference_is_measured_only_when_a_low_precision_fast_path_misses_the_fixed_tolerance(
        monkeypatch):
    """Most bf16 runs pass the fixed tolerance and never pay for a float32 pass; one that misses it
    measures float32 once (patches removed, as the plain path) and keeps what is as exact as bf16 allows."""
    import prefopt.fastpath as fp

    calls = []
    real = fp.float32_references

    def counted(model, *args):
        calls.append(any(m.__dict__.get("_prefopt_lean") and "forward" in m.__dict__ for m in model.modules()))
        return real(model, *args)

    monkeypatch.setattr(fp, "float32_references", counted)
    model = build(T.LlamaConfig, T.LlamaForCausalLM).to(torch.bfloat16)
    data = check_rows(rows(6))
    kept = run(model, dtype=torch.bfloat16, data=data)
    assert not kept.off and calls == []
    # a fixed tolerance below bf16's own noise: only the comparison with float32 can keep the fast paths
    monkeypatch.setitem(fp.TOLERANCES, torch.bfloat16, fp.Tolerance(token_max=1e-6, token_mean=1e-7, grad=1e-7))
    judged = run(model, dtype=torch.bfloat16, data=data)
    assert calls == [False]                   # once, with no lean forward patched in
    assert not judged.off and judged.features == kept.features
