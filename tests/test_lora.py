"""LoRA: only adapters train, the reference is the base with adapters off (one copy of the weights),
merged weights load without peft, an existing adapter continues against the cache; QLoRA on CPU fails clearly."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import prefopt.train as train_module
from prefopt.batching import collate
from prefopt.cli import main
from prefopt.config import TrainConfig
from prefopt.logprobs import completion_logps
from prefopt.modeling import load_causal_lm
from prefopt.reference import AdapterDisabledReference, CachedReference
from prefopt.train import train

FAST = dict(batch_size=4, learning_rate=5e-3, lr_scheduler="constant", progress=False, logging_steps=1,
            save_steps=None, max_steps=3, lora_r=4, lora_alpha=8.0)


class Capture:
    save_final = True

    def on_train_start(self, *, policy, reference, data, steps, device, fast_paths=None):
        self.policy, self.reference, self.data = policy, reference, data
        self.start = {k: v.detach().clone() for k, v in policy.state_dict().items()}

    def on_step(self, step, micro, metrics):
        self.last_batch = micro[-1]


@pytest.fixture
def count_loads(monkeypatch):
    loads = []
    real = train_module.load_causal_lm

    def counted(name, **kw):
        loads.append(name)
        return real(name, **kw)

    monkeypatch.setattr(train_module, "load_causal_lm", counted)
    return loads


def run(tiny_model_dir, pref_files, out, cache_dir, **kw) -> Capture:
    cfg = TrainConfig(**{**dict(model=str(tiny_model_dir), data=str(pref_files[0]), output_dir=str(out),
                                cache_dir=str(cache_dir)), **FAST, **kw})
    hooks = Capture()
    train(cfg, hooks=hooks)
    return hooks


def test_lora_trains_only_the_adapters(tiny_model_dir, pref_files, tmp_path, cache_dir, count_loads):
    hooks = run(tiny_model_dir, pref_files, tmp_path / "run", cache_dir)
    assert count_loads == [str(tiny_model_dir)]  # the cache pass ran on the policy itself: one load
    assert isinstance(hooks.reference, CachedReference)
    end = hooks.policy.state_dict()
    changed = {k for k, v in hooks.start.items() if not torch.equal(v, end[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero and must move for the adapter to matter
    trainable = {n for n, p in hooks.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists()  # without --merge-lora final/ holds the adapter


def test_live_reference_is_the_base_with_adapters_disabled(tiny_model_dir, pref_files, tmp_path, cache_dir,
                                                           count_loads):
    hooks = run(tiny_model_dir, pref_files, tmp_path / "run", cache_dir, ref_cache=False)
    assert isinstance(hooks.reference, AdapterDisabledReference)
    # the adapters it switches off are the policy's own; it scores through the prepared wrapper around them
    assert hooks.reference.adapters is hooks.policy and hooks.reference.model.model is hooks.policy
    assert count_loads == [str(tiny_model_dir)]  # no second copy of the weights
    base = load_causal_lm(str(tiny_model_dir))
    batch = hooks.last_batch
    with torch.no_grad():
        expected = completion_logps(base, batch).logps
        trained = completion_logps(hooks.policy, batch).logps
    assert torch.allclose(hooks.reference.logps(batch), expected, atol=1e-5)
    assert not torch.allclose(trained, expected, atol=1e-4)  # the adapters did move the policy
    assert hooks.policy.training  # scoring the reference leaves the policy in training mode


def test_merge_lora_writes_plain_weights(tiny_model_dir, pref_files, tmp_path, cache_dir):
    hooks = run(tiny_model_dir, pref_files, tmp_path / "run", cache_dir, merge_lora=True)
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()
    keys = load_file(str(final / "model.safetensors")).keys()
    assert not any("lora_" in k or "base_model" in k for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert type(merged).__name__ == "LlamaForCausalLM"
    batch = hooks.last_batch
    with torch.no_grad():
        hooks.policy.eval()
        assert torch.allclose(completion_logps(merged, batch).logps, completion_logps(hooks.policy, batch).logps,
                              atol=1e-4)
    base = load_causal_lm(str(tiny_model_dir))
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_continuing_an_adapter_uses_the_cache_as_its_reference(tiny_model_dir, pref_files, tmp_path, cache_dir,
                                                               count_loads):
    run(tiny_model_dir, pref_files, tmp_path / "first", cache_dir)
    adapter = tmp_path / "first" / "final"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    count_loads.clear()
    hooks = run(adapter, pref_files, tmp_path / "second", cache_dir)
    assert count_loads == [str(tiny_model_dir)]
    assert isinstance(hooks.reference, CachedReference)
    # the reference is the adapter's starting state, not the bare base model
    start = load_causal_lm(str(tiny_model_dir))
    from peft import PeftModel

    start = PeftModel.from_pretrained(start, str(adapter))
    examples = hooks.data.train[:4]
    batch = collate(examples, pad_token_id=0)
    with torch.no_grad():
        expected = completion_logps(start, batch).logps
    assert torch.allclose(hooks.reference.logps(batch), expected, atol=1e-5)
    end = hooks.policy.state_dict()
    assert any(not torch.equal(v, end[k]) for k, v in hooks.start.items() if "lora_" in k)


def test_continuing_an_adapter_without_the_cache_is_refused(tiny_model_dir, pref_files, tmp_path, cache_dir, capsys):
    run(tiny_model_dir, pref_files, tmp_path / "first", cache_dir)
    code = main(["train", "--model", str(tmp_path / "first" / "final"), "--data", str(pref_files[0]),
                 "--output-dir", str(tmp_path / "second"), "--lora-r", "4", "--no-ref-cache", "--max-steps", "1"])
    assert code == 2
    assert "reference cache" in capsys.readouterr().err


def test_load_in_4bit_on_cpu_is_a_clear_model_error(tiny_model_dir, pref_files, tmp_path, capsys):
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(pref_files[0]), "--output-dir",
                 str(tmp_path / "run"), "--lora-r", "4", "--load-in-4bit", "--max-steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--load-in-4bit" in err and ("GPU" in err or "bitsandbytes" in err)
    assert "Traceback" not in err
