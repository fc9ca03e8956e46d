"""bfloat16 that trains: float32 master weights under autocast by default, the reference in the
policy's own precision, pure bf16 only when asked (and warned about)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefopt.config import TrainConfig
from prefopt.train import storage, train


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(tiny_model_dir, pref_files, out: Path, cache: Path, **kw) -> list[dict]:
    cfg = dict(model=str(tiny_model_dir), data=str(pref_files[0]), output_dir=str(out), max_steps=10, batch_size=8,
               learning_rate=5e-3, logging_steps=1, save_steps=None, progress=False, cache_dir=str(cache))
    train(TrainConfig(**{**cfg, **kw}))
    return [r for r in rows(out / "metrics.jsonl") if "loss" in r]


def changed_fraction(tiny_model_dir, final: Path) -> float:
    start, end = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(final / "model.safetensors"))
    # against the start as stored in the run's dtype (loading a float32 file in bf16 rounds it first)
    moved = sum(int((start[k].to(end[k].dtype) != end[k]).sum()) for k in start)
    return moved / sum(v.numel() for v in start.values())


def test_storage_follows_the_mixed_precision_recipe():
    assert storage(TrainConfig(dtype="float32"), adapter=False) == ("float32", None)  # the launcher decides
    assert storage(TrainConfig(dtype="bfloat16"), adapter=False) == ("float32", "bf16")
    assert storage(TrainConfig(dtype="float16"), adapter=False) == ("float32", "fp16")
    assert storage(TrainConfig(dtype="bfloat16", pure_low_precision=True), adapter=False) == ("bfloat16", "no")
    # a frozen base needs no float32 copy: LoRA, QLoRA and a continued adapter keep it in bf16
    assert storage(TrainConfig(dtype="bfloat16", lora_r=8), adapter=False) == ("bfloat16", "bf16")
    assert storage(TrainConfig(dtype="bfloat16"), adapter=True) == ("bfloat16", "bf16")


def test_bfloat16_trains_as_float32_does(tiny_model_dir, pref_files, tmp_path):
    fp32 = run(tiny_model_dir, pref_files, tmp_path / "fp32", tmp_path / "cache")
    bf16 = run(tiny_model_dir, pref_files, tmp_path / "bf16", tmp_path / "cache", dtype="bfloat16")
    # step 0: the cached reference was scored through the same autocast forward, so policy == reference exactly
    assert bf16[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert bf16[0]["rewards/chosen"] == 0.0 and bf16[0]["rewards/rejected"] == 0.0
    # and it learns as float32 does
    assert bf16[-1]["rewards/accuracies"] >= 0.9 and bf16[-1]["loss"] < 0.3
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], abs=0.02)
    # the master weights are float32, and final/ holds them
    assert {v.dtype for v in load_file(str(tmp_path / "bf16" / "final" / "model.safetensors")).values()} == \
        {torch.float32}
    # a float32 run's reference table is not reused for the bf16 run (two cache files)
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 2


def test_pure_bfloat16_at_a_dpo_learning_rate_barely_moves_and_says_so(tiny_model_dir, pref_files, tmp_path, caplog):
    """At lr 1e-6 an AdamW update is ~1e-6, under half a bf16 ulp of almost every weight (~1e-4 at 0.02):
    stored in bf16 the weight does not change. The float32 master copy takes every update."""
    with caplog.at_level(logging.WARNING, logger="prefopt"):
        run(tiny_model_dir, pref_files, tmp_path / "pure", tmp_path / "cache", dtype="bfloat16",
            pure_low_precision=True, learning_rate=1e-6, max_steps=3)
    assert "no float32 copy" in caplog.text and "rounds away" in caplog.text
    run(tiny_model_dir, pref_files, tmp_path / "mixed", tmp_path / "cache", dtype="bfloat16", learning_rate=1e-6,
        max_steps=3)
    pure, mixed = (changed_fraction(tiny_model_dir, tmp_path / d / "final") for d in ("pure", "mixed"))
    assert pure < 0.05 and mixed > 0.5, (pure, mixed)


def test_a_launchers_mixed_precision_reaches_the_reference(tiny_model_dir, pref_files, tmp_path, monkeypatch):
    """``--dtype float32`` under ``accelerate launch --mixed_precision bf16``: the policy computes under
    autocast, and so must the reference (else policy != reference at step 0)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    metrics = run(tiny_model_dir, pref_files, tmp_path / "amp", tmp_path / "cache", max_steps=2)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[0]["rewards/chosen"] == 0.0
