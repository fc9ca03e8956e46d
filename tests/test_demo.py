"""`prefopt demo --quick --iterative`: the whole pipeline end to end, and the output-directory rules."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prefopt.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--iterative", "--output-dir", str(out)]) == 0
    return out


def test_quick_demo_runs_the_pipeline_and_writes_its_summary(quick_demo):
    summary = json.loads((quick_demo / "summary.json").read_text())
    assert summary["mode"] == "quick"
    sft, dpo = summary["sft"], summary["dpo"]
    for value in (sft["reward_mean"], dpo["reward_mean"], dpo["kl"], dpo["win_rate_vs_sft"]):
        assert math.isfinite(value)
    assert -1 <= sft["reward_mean"] <= 1 and -1 <= dpo["reward_mean"] <= 1  # VADER compound scores
    assert dpo["kl"] > 0, "DPO moved away from the SFT model"
    assert dpo["reward_mean"] > sft["reward_mean"], "DPO on VADER-judged pairs should raise the VADER reward"
    assert summary["reward_gain"] == pytest.approx(dpo["reward_mean"] - sft["reward_mean"])
    assert summary["pairs"]["pairs"] > 100
    assert len(summary["examples"]) == 4 and all(e["sft"] and e["dpo"] for e in summary["examples"])
    # every stage left its artefacts
    for path in ("sft/final/model.safetensors", "dpo/final/model.safetensors", "data/pairs.jsonl",
                 "data/sft.jsonl", "plots/loss.png", "plots/rewards.png", "plots/frontier.png"):
        assert (quick_demo / path).is_file(), path
    pairs = [json.loads(line) for line in (quick_demo / "data/pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)


def test_quick_demo_iterative_stage(quick_demo):
    summary = json.loads((quick_demo / "summary.json").read_text())
    rounds = summary["iterative"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[0]["kl"] == 0.0 and all(r["kl"] > 0 and math.isfinite(r["reward_mean"]) for r in rounds[1:])
    assert [p["label"] for p in summary["points"] if p["method"] == "iterative DPO"] == ["round 1", "round 2"]
    for path in ("iterate/rounds.jsonl", "iterate/round-2/done", "iterate/round-2/train/final/model.safetensors",
                 "plots/rounds.png"):
        assert (quick_demo / path).is_file(), path
    rows = [json.loads(line) for line in (quick_demo / "iterate/round-1/data.jsonl").read_text().splitlines()]
    assert rows and all(len(r["completions"]) == len(r["scores"]) >= 2 for r in rows)


def test_the_demo_corpus_ships_with_the_package():
    from prefopt.demo import load_reviews

    reviews = load_reviews()
    assert len(reviews) >= 3000
    assert len(set(reviews)) == len(reviews)
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    scores = [vader.polarity_scores(r)["compound"] for r in reviews[:500]]
    assert sum(s > 0.3 for s in scores) > 100 and sum(s < -0.3 for s in scores) > 100, "mixed sentiment"


def test_demo_refuses_to_clobber_another_run(quick_demo, tmp_path, capsys):
    from prefopt.demo import FULL, prepare_dir
    from prefopt.errors import ConfigError

    # the quick run's directory holds a demo with other settings than the full demo's
    with pytest.raises(ConfigError, match="other settings"):
        prepare_dir(quick_demo, FULL, overwrite=False)
    # a directory of unrelated files is never the demo's to delete
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--output-dir", str(other)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--quick", "--output-dir", str(other), "--overwrite"]) == 2
    assert "not the demo's" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
