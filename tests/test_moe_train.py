"""--router-aux-loss-coef in training: the router loss over real tokens is added, logged, and off by default."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from prefopt.config import TrainConfig
from prefopt.tiny import save_tiny
from prefopt.train import train


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                           pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
                           eos_token_id=tiny_tokenizer.eos_token_id)
    return save_tiny(MixtralForCausalLM(config), tiny_tokenizer, tmp_path_factory.mktemp("mixtral") / "model")


def run(model_dir, pref_files, out, **kw):
    cfg = TrainConfig(model=str(model_dir), data=str(pref_files[0]), output_dir=str(out), max_steps=2, batch_size=4,
                      logging_steps=1, save_steps=None, progress=False, learning_rate=1e-3, shuffle=False, **kw)
    train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_router_loss_is_logged_and_trained_only_when_asked(mixtral_dir, pref_files, tmp_path, cache_dir):
    off = run(mixtral_dir, pref_files, tmp_path / "off")
    on = run(mixtral_dir, pref_files, tmp_path / "on", router_aux_loss_coef=0.5)
    assert all("aux_loss" not in row for row in off)
    aux = [row["aux_loss"] for row in on if "aux_loss" in row]
    assert len(aux) == 2 and all(1.0 < a < 4.0 for a in aux)   # top-2 of 4 experts: 2 when balanced, 4 collapsed
    assert abs(on[0]["loss"] - off[0]["loss"]) < 1e-6          # the logged loss is the preference loss
    assert on[1]["loss"] != off[1]["loss"]                     # the router term changed the first update


def test_a_dense_model_says_the_coefficient_does_nothing(tiny_model_dir, pref_files, tmp_path, cache_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        rows = run(tiny_model_dir, pref_files, tmp_path / "dense", router_aux_loss_coef=0.1)
    assert any("--router-aux-loss-coef is ignored" in r.getMessage() for r in caplog.records)
    assert all("aux_loss" not in row for row in rows)
