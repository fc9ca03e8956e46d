"""Every loss and modifier, end to end: a few steps on the tiny task raise held-out accuracy.

Accuracy here is the DPO implicit-reward accuracy against the starting model on held-out
pairs: the fraction whose log-ratio margin (chosen minus rejected) became positive, ties
counting half. The untrained policy is the starting model, so it scores exactly 0.5.
"""
from __future__ import annotations

import json

import pytest

from prefopt.cli import main
from prefopt.config import TrainConfig
from prefopt.losses import LOSSES
from prefopt.train import train

# sft alone does not separate chosen from rejected; it is exercised with sigmoid (RPO) below.
PAIRED = sorted(name for name, spec in LOSSES.items() if spec.paired and name != "sft")


def heldout_accuracy(model_dir, start_dir, eval_file, tmp_path) -> float:
    report = tmp_path / "score.json"
    assert main(["eval", "--model", str(model_dir), "--ref-model", str(start_dir), "--data", str(eval_file),
                 "--output", str(report)]) == 0
    rows = json.loads(report.read_text())["per_example"]
    margins = [(r["policy_chosen_logps"] - r["ref_chosen_logps"]) - (r["policy_rejected_logps"] - r["ref_rejected_logps"])
               for r in rows]
    return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)


def run(tiny_model_dir, pref_files, tmp_path, **kw) -> float:
    out = tmp_path / "run"
    cfg = dict(model=str(tiny_model_dir), data=str(pref_files[0]), output_dir=str(out), max_steps=12,
               batch_size=8, learning_rate=5e-3, lr_scheduler="constant", progress=False, save_steps=None,
               logging_steps=4)
    cfg.update(kw)
    train(TrainConfig(**cfg), explicit=set(kw))
    return heldout_accuracy(out / "final", tiny_model_dir, pref_files[1], tmp_path)


def test_untrained_policy_scores_one_half(tiny_model_dir, pref_files, tmp_path):
    assert heldout_accuracy(tiny_model_dir, tiny_model_dir, pref_files[1], tmp_path) == 0.5


@pytest.mark.parametrize("loss", PAIRED)
def test_each_loss_learns(loss, tiny_model_dir, pref_files, tmp_path, cache_dir):
    extra = {}
    if loss in ("exo_pair",):
        extra["label_smoothing"] = 1e-3
    if loss in ("orpo", "cpo"):
        extra["beta"] = 1.0  # lambda: at the paper's 0.1, twelve steps are almost pure NLL on chosen
    assert run(tiny_model_dir, pref_files, tmp_path, loss_type=[loss], **extra) > 0.8


@pytest.mark.parametrize("extra", [
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    dict(rpo_alpha=1.0),
    dict(label_smoothing=0.1),
    dict(reference_free=True),
    dict(f_divergence="js"),
    dict(f_divergence="alpha", f_alpha=0.5),
    dict(f_divergence="forward_kl"),
    dict(wpo_weighting=True),
    dict(ld_alpha=0.5),
    dict(ref_sync="soft", ref_sync_steps=4, ref_sync_alpha=0.5),
    dict(ref_sync="hard", ref_sync_steps=4),
    dict(ref_cache=False),
], ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_modifiers_learn(extra, tiny_model_dir, pref_files, tmp_path, cache_dir):
    assert run(tiny_model_dir, pref_files, tmp_path, **extra) > 0.8


def test_kto_from_pairs_learns(tiny_model_dir, pref_files, tmp_path, cache_dir):
    assert run(tiny_model_dir, pref_files, tmp_path, loss_type=["kto"]) > 0.8


def test_kto_on_unpaired_data_learns(tiny_model_dir, pref_files, tmp_path, cache_dir):
    rows = [json.loads(line) for line in pref_files[0].read_text().splitlines()]
    unpaired = tmp_path / "unpaired.jsonl"
    with open(unpaired, "w") as f:
        for i, r in enumerate(rows):
            good = i % 2 == 0  # each prompt appears once, with either its good or its bad answer
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["chosen" if good else "rejected"],
                                "label": good}) + "\n")
    assert run(tiny_model_dir, (unpaired, pref_files[1]), tmp_path, loss_type=["kto"], max_steps=16) > 0.8


def test_reference_free_loss_loads_no_reference_and_says_so(tiny_model_dir, pref_files, tmp_path, caplog):
    import logging

    import prefopt.train as train_module

    loads = []
    real = train_module.load_causal_lm
    train_module.load_causal_lm = lambda *a, **k: loads.append(a) or real(*a, **k)
    try:
        with caplog.at_level(logging.WARNING, logger="prefopt"):
            run(tiny_model_dir, pref_files, tmp_path, loss_type=["simpo"], ref_model=str(tiny_model_dir), max_steps=1)
    finally:
        train_module.load_causal_lm = real
    assert len(loads) == 1  # the policy only
    assert "--ref-model is ignored" in caplog.text
