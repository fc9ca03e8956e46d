"""The reference log-prob cache: hits, keys, exactness, atomic writes; TR-DPO's live, moving reference."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import prefopt.reference as reference_module
from prefopt.batching import collate
from prefopt.config import TrainConfig
from prefopt.modeling import load_causal_lm
from prefopt.reference import (
    CachedReference,
    ModelReference,
    atomic_save_tensors,
    cache_key,
    hash_examples,
    hash_weights,
)
from prefopt.train import _score_fn, train

FAST = dict(batch_size=4, learning_rate=1e-3, lr_scheduler="constant", progress=False, logging_steps=1,
            save_steps=None, max_steps=2)


class Capture:
    """A training observer that keeps the policy, the reference and the data of a run."""

    save_final = False

    def on_train_start(self, *, policy, reference, data, steps, device, fast_paths=None):
        self.policy, self.reference, self.data = policy, reference, data

    def on_step(self, step, micro, metrics):
        pass


def run(tiny_model_dir, pref_files, out, cache, **kw) -> Capture:
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(pref_files[0]), output_dir=str(out),
                      cache_dir=str(cache), overwrite=True, **{**FAST, **kw})
    hooks = Capture()
    train(cfg, hooks=hooks)
    hooks.cfg = cfg
    return hooks


def cache_files(cache) -> list:
    return sorted((cache / "ref_logps").glob("*.safetensors"))


def count_scoring(monkeypatch) -> list:
    """Count reference passes: every batch CachedReference.build scores goes through ``score``."""
    calls = []
    real_build = CachedReference.build.__func__

    def build(cls, model, batches, num_examples, num_completions, score, **kw):
        def counted(m, b):
            calls.append(b.num_examples)
            return score(m, b)
        return real_build(cls, model, batches, num_examples, num_completions, counted, **kw)

    monkeypatch.setattr(CachedReference, "build", classmethod(build))
    return calls


def test_second_run_hits_the_cache(tiny_model_dir, pref_files, tmp_path, capsys, monkeypatch):
    calls = count_scoring(monkeypatch)
    cache = tmp_path / "cache"
    first = run(tiny_model_dir, pref_files, tmp_path / "a", cache)
    assert sum(calls) == len(first.data.train)  # one pass over every training pair
    assert "computed and cached" in capsys.readouterr().out
    (path,) = cache_files(cache)
    stamp = path.stat().st_mtime_ns
    calls.clear()
    second = run(tiny_model_dir, pref_files, tmp_path / "b", cache, beta=0.5)  # a beta sweep reuses it
    assert calls == []  # no reference pass at all
    assert "loaded from cache" in capsys.readouterr().out
    assert cache_files(cache) == [path] and path.stat().st_mtime_ns == stamp
    assert torch.equal(first.reference.table, second.reference.table)


def test_changed_weights_data_or_max_length_make_a_new_key(tiny_model_dir, pref_files, tmp_path, monkeypatch):
    calls = count_scoring(monkeypatch)
    cache = tmp_path / "cache"
    base = run(tiny_model_dir, pref_files, tmp_path / "a", cache)
    assert len(cache_files(cache)) == 1

    # different data: a file with one pair left out
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(pref_files[0].read_text().splitlines(keepends=True)[1:]))
    calls.clear()
    run(tiny_model_dir, (fewer, pref_files[1]), tmp_path / "b", cache)
    assert calls and len(cache_files(cache)) == 2

    # a max_length that truncates completions changes the token ids, hence the key
    calls.clear()
    short = run(tiny_model_dir, pref_files, tmp_path / "c", cache, max_length=12, max_prompt_length=8)
    assert any(ex.truncated for ex in short.data.train)
    assert calls and len(cache_files(cache)) == 3

    # a changed reference weight: one number of one matrix
    changed = tmp_path / "changed"
    model = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    model.save_pretrained(changed)
    for f in tiny_model_dir.glob("*token*"):
        (changed / f.name).write_bytes(f.read_bytes())
    calls.clear()
    run(tiny_model_dir, pref_files, tmp_path / "d", cache, ref_model=str(changed))
    assert calls and len(cache_files(cache)) == 4

    # the same settings again: no new file, no pass
    calls.clear()
    again = run(tiny_model_dir, pref_files, tmp_path / "e", cache)
    assert calls == [] and len(cache_files(cache)) == 4
    assert torch.equal(again.reference.table, base.reference.table)


def test_key_parts():
    model = torch.nn.Linear(3, 2)
    w = hash_weights(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert hash_weights(model) != w

    class Ex:
        def __init__(self, p, cs):
            self.prompt_ids, self.completions = p, cs

    x = hash_examples([Ex([1, 2], [[3], [4]])])
    assert hash_examples([Ex([1, 2], [[3], [4, 5]])]) != x
    assert hash_examples([Ex([1, 2], [[3], [4]])]) == x
    assert cache_key(w, x, {"dtype": "float32"}) != cache_key(w, x, {"dtype": "bfloat16"})


def test_cached_values_equal_a_live_reference(tiny_model_dir, pref_files, tmp_path):
    cached = run(tiny_model_dir, pref_files, tmp_path / "a", tmp_path / "cache")
    live = ModelReference(load_causal_lm(str(tiny_model_dir)), _score_fn(cached.cfg, 2))
    examples = cached.data.train
    pad = 0
    worst = 0.0
    for i in range(0, len(examples), 4):  # the training batches, laid out as training lays them out
        batch = collate(examples[i:i + 4], pad_token_id=pad)
        a, b = cached.reference.logps(batch), live.logps(batch)
        worst = max(worst, float(((a - b).abs() / b.abs().clamp(min=1)).max()))
    assert worst < 1e-6


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ref_logps" / "key.safetensors"
    atomic_save_tensors({"logps": torch.ones(3, 2)}, path)
    before = path.read_bytes()

    def broken_save(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a fi")  # a crash mid-write
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reference_module, "save_file", broken_save)
    with pytest.raises(OSError):
        atomic_save_tensors({"logps": torch.zeros(3, 2)}, path)
    assert path.read_bytes() == before  # readers still see the old, whole file
    assert os.listdir(path.parent) == ["key.safetensors"]  # and no temporary file is left behind

    # a new file appears whole or not at all
    fresh = tmp_path / "ref_logps" / "other.safetensors"
    with pytest.raises(OSError):
        atomic_save_tensors({"logps": torch.zeros(3, 2)}, fresh)
    assert not fresh.exists()


def test_cache_of_a_wrong_shape_is_recomputed(tmp_path):
    path = tmp_path / "c.safetensors"
    atomic_save_tensors({"logps": torch.zeros(5, 2)}, path)
    batch = collate([_ex(0), _ex(1)], pad_token_id=0)

    def score(model, b):  # distinct values per (example, completion)
        return (2.0 * b.example_index[:, None] + torch.arange(2.0)).reshape(-1)

    ref, hit = CachedReference.build(torch.nn.Module(), [batch], 2, 2, score, cache_file=path)
    assert not hit and ref.table.tolist() == [[0.0, 1.0], [2.0, 3.0]]


def _ex(i):
    from prefopt.data.tokenize import TokenizedExample

    return TokenizedExample(prompt_ids=[1, 2], completions=[[3], [4, 5]], index=i, line=i + 1)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_tr_dpo_uses_a_live_reference_and_syncs_it(tiny_model_dir, pref_files, tmp_path, mode):
    cache = tmp_path / "cache"
    hooks = run(tiny_model_dir, pref_files, tmp_path / "a", cache, ref_sync=mode, ref_sync_steps=1,
                ref_sync_alpha=0.25)
    assert isinstance(hooks.reference, ModelReference)
    assert not cache_files(cache) if cache.exists() else True  # nothing cached: the reference moves
    start = load_causal_lm(str(tiny_model_dir))
    ref = hooks.reference.model
    if mode == "hard":  # after the last step the reference is the policy
        for p_ref, p in zip(ref.parameters(), hooks.policy.parameters(), strict=True):
            assert torch.equal(p_ref, p)
    else:
        assert any(not torch.equal(a, b) for a, b in zip(ref.parameters(), start.parameters(), strict=True))


def test_sync_formula():
    torch.manual_seed(0)
    policy, ref = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    old = copy.deepcopy(ref)
    live = ModelReference(ref, lambda m, b: None)
    live.sync(policy, "soft", 0.3)
    for p_new, p_old, p in zip(ref.parameters(), old.parameters(), policy.parameters(), strict=True):
        assert torch.allclose(p_new, 0.3 * p + 0.7 * p_old, atol=1e-7)
    live.sync(policy, "hard", 0.3)
    for p_new, p in zip(ref.parameters(), policy.parameters(), strict=True):
        assert torch.equal(p_new, p)
    assert not any(p.requires_grad for p in ref.parameters())


def test_a_changed_config_recomputes_and_the_check_is_cached(tiny_model_dir, pref_files, tmp_path, capsys):
    """The key covers the model's config (here the norm epsilon, which the weights do not show), and the
    fast-path check's decision is cached beside the reference log-probs."""
    import json
    import shutil

    cache = tmp_path / "cache"
    run(tiny_model_dir, pref_files, tmp_path / "a", cache)
    first = capsys.readouterr().out
    assert "[checked in" in first and len(list((cache / "fastpath").glob("*.json"))) == 1
    run(tiny_model_dir, pref_files, tmp_path / "b", cache)
    second = capsys.readouterr().out
    assert "[cached]" in second and "loaded from cache" in second
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, changed)
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = 1e-2
    (changed / "config.json").write_text(json.dumps(config))
    run(changed, pref_files, tmp_path / "c", cache)
    third = capsys.readouterr().out
    assert "[checked in" in third and "computed and cached" in third
    assert len(cache_files(cache)) == 2


def test_buffers_outside_the_state_dict_are_hashed():
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefopt.reference import hash_buffers

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32))
    before = hash_buffers(model)
    assert before == hash_buffers(model)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.mul_(2)  # rotary frequencies, not saved with the weights
    assert hash_buffers(model) != before and hash_weights(model) == hash_weights(model)
