"""benchmarks/k_answers.py: its core comparison runs end to end on the tiny model (no timing is asserted)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import k_answers  # noqa: E402

from prefopt.config import TrainConfig  # noqa: E402
from prefopt.inputs import prepare_examples  # noqa: E402


def test_expand_pairs_makes_every_pair_of_unequal_score():
    row = {"prompt": "Q", "completions": [" a", " b", " c"], "scores": [1.0, 3.0, 1.0]}
    assert k_answers.expand_pairs([row]) == [{"prompt": "Q", "chosen": " b", "rejected": " a"},
                                             {"prompt": "Q", "chosen": " b", "rejected": " c"}]


def test_core_runs_three_layouts_and_the_ideal_ratio_is_token_counts(tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                      cache_dir):
    rows = k_answers.make_ranked_rows(tiny_tokenizer, 3, k=4, prompt_tokens=(8, 14), answer_tokens=(2, 5), seed=1)
    printed: list[str] = []
    result = k_answers.run_benchmark(str(tiny_model_dir), tmp_path / "work", rows, prompts_per_step=2, repeat=1,
                                     isolate=False, learning_rate=1e-3, out=printed.append)

    assert (result["prompts"], result["k"], result["pairs"], result["pairs_per_step"]) == (3, 4, 18, 12)
    runs = result["runs"]
    assert list(runs) == ["a", "b", "c"]
    assert [runs[k]["examples"] for k in "abc"] == [3, 18, 18]
    assert [runs[k]["examples_per_step"] for k in "abc"] == [[2, 1], [12, 6], [12, 6]]
    checks = result["checks"]
    assert checks["same_steps"] and checks["same_pair_tokens"] and checks["same_loss_units_per_step"]
    assert checks["loss_units_per_step"] == [12.0, 6.0]          # each step's loss: the mean over the same pairs
    assert checks["max_abs_loss_diff_vs_b"] < 1e-4               # and the same values (float32 noise)
    assert runs["a"]["losses"][0] == pytest.approx(math.log(2), abs=1e-5)

    # the counts, worked out from the tokenized K-answer rows alone: P + sum(c) per prompt laid out
    # grouped, (P + c_i + c_j) per pair laid out as pairs, (2P + c_i + c_j) per pair counted as padded
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(tmp_path / "work" / "ranked.jsonl"), max_length=1024,
                      max_prompt_length=512)
    examples = prepare_examples(cfg, tiny_tokenizer, "pairs", None).train
    prompt = [len(ex.prompt_ids) for ex in examples]
    answers = [sum(len(c) for c in ex.completions) for ex in examples]
    grouped = sum(p + a for p, a in zip(prompt, answers))
    paired = sum(6 * p + 3 * a for p, a in zip(prompt, answers))
    padded = sum(12 * p + 3 * a for p, a in zip(prompt, answers))
    for key in "abc":
        assert runs[key]["pair_tokens"] == runs[key]["reference"]["pair_tokens"] == padded
    assert runs["a"]["real_tokens"] == runs["c"]["real_tokens"] == grouped
    assert runs["b"]["real_tokens"] == paired
    assert runs["b"]["reference"]["real_tokens"] == paired and runs["a"]["reference"]["real_tokens"] == grouped
    for key in "ac":
        ratio = result["ratios"][f"{key}/b"]
        assert ratio["train_ideal_tokens"] == pytest.approx(paired / grouped)
        assert ratio["reference_ideal_tokens"] == pytest.approx(paired / grouped)
        assert ratio["train_ideal_flops"] > 1
        for name in ("train_measured", "reference_measured", "memory_steps"):
            assert ratio[name] > 0 and math.isfinite(ratio[name])
        assert len(ratio["train_measured_rounds"]) == len(ratio["reference_measured_rounds"]) == 1
        assert ratio["memory"] is None                             # in-process: no child of its own to measure
        assert runs[key]["tokens_per_second"] == pytest.approx(padded / runs[key]["train_seconds"])

    text = "\n".join(printed)
    for name in ("reference", "training", "memory"):
        table = result["tables"][name]
        assert table in text
        lines = table.splitlines()
        assert len(lines) == 5 and all(line.startswith("|") and line.endswith("|") for line in lines)
        assert [line.split(" |")[0] for line in lines[2:]] == ["| " + k_answers.RUNS[k] for k in "abc"]
    assert f"{result['ratios']['a/b']['train_ideal_tokens']:.2f}x" in result["tables"]["training"]
