"""`prefopt sample --output-format ranked`, `prefopt iterate` (rounds, resume, refusals) and its plot by round.

A tiny random Llama and a callable judge that counts ASCII letters: the random model
writes mostly byte tokens, so the count varies a lot between samples of one prompt and
DPO can raise it quickly. Nothing is downloaded.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from prefopt.cli import main
from conftest import make_pairs, write_jsonl

JUDGES = """
def letters(prompts, completions):
    return [float(sum(ch.isascii() and ch.isalpha() for ch in c)) for c in completions]
"""


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("judge_mod")
    (d / "iterate_judges.py").write_text(textwrap.dedent(JUDGES))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(d))
        yield "iterate_judges:letters"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    rows = [{"prompt": r["prompt"]} for r in make_pairs(32, seed=5)]
    return write_jsonl(rows, tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fake_samples(rows: list[list[tuple[str, bool]]]):
    from prefopt.generation import Sample

    return [[Sample(i, k, [k + 5, 2], text, done) for k, (text, done) in enumerate(row)] for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------- make_ranked


def test_make_ranked_keeps_usable_distinct_answers_per_prompt(tmp_path):
    from prefopt.data import detect_format, load_rows
    from prefopt.generation import make_ranked

    samples = _fake_samples([
        [("a", True), ("b", True), ("a", True), ("c", False)],   # duplicate "a", "c" cut
        [("x", True), ("y", True), ("z", True), ("w", True)],    # all tie
        [("", True), ("q", True), ("r", False), ("s", False)],   # empty, two cut: one answer left
        [("m", True), ("n", True), ("o", True), ("p", True)],
    ])
    scores = torch.tensor([[1.0, 0.5, 3.0, 9.0], [2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0], [0.1, 0.2, 0.2, -1.0]],
                          dtype=torch.float64)
    rows, skipped = make_ranked(["p0", "p1", "p2", "p3"], samples, scores, keep_truncated=False)
    assert [(r["prompt"], r["completions"], r["scores"]) for r in rows] == [
        ("p0", ["a", "b"], [1.0, 0.5]),                          # the first "a" and its score
        ("p3", ["m", "n", "o", "p"], [0.1, 0.2, 0.2, -1.0]),     # ties inside a row are kept
    ]
    assert [r["prompt_index"] for r in rows] == [0, 3] and rows[0]["finished"] == [True, True]
    assert skipped == {"duplicate_samples": 1, "tied": 1, "truncated_samples": 3, "empty_samples": 1,
                       "too_few_samples": 1}
    kept, skipped = make_ranked(["p0", "p1", "p2", "p3"], samples, scores, keep_truncated=True)
    assert kept[0]["completions"] == ["a", "b", "c"] and kept[0]["finished"] == [True, True, False]
    assert [r["completions"] for r in kept if r["prompt"] == "p2"] == [["q", "r", "s"]]
    assert skipped["truncated_samples"] == 0
    # the extra keys do not disturb the K-answer format
    path = write_jsonl(rows, tmp_path / "ranked.jsonl")
    assert detect_format(load_rows(str(path))) == "ranked"


def test_sample_writes_ranked_rows_that_train(tmp_path, tiny_model_dir, prompts, judge, cache_dir, capsys):
    out = tmp_path / "ranked.jsonl"
    base = ["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--num-samples", "4", "--judge",
            judge, "--max-new-tokens", "8", "--keep-truncated", "--seed", "3"]
    assert main(base + ["--output", str(out), "--output-format", "ranked"]) == 0
    assert "K-answer rows (ranked)" in capsys.readouterr().out
    rows = _read_jsonl(out)
    assert rows and all(set(r) >= {"prompt", "completions", "scores"} for r in rows)
    for r in rows:
        assert 2 <= len(r["completions"]) <= 4 and len(r["scores"]) == len(r["completions"])
        assert len(set(r["completions"])) == len(r["completions"]) and len(set(r["scores"])) > 1
        assert r["scores"] == [float(sum(ch.isascii() and ch.isalpha() for ch in c)) for c in r["completions"]]
    # the same seed gives the same samples: best-worst pairs are the extremes of the ranked rows
    assert main(base + ["--output", str(tmp_path / "pairs.jsonl")]) == 0
    pairs = {p["prompt_index"]: p for p in _read_jsonl(tmp_path / "pairs.jsonl")}
    for r in rows:
        p = pairs[r["prompt_index"]]
        assert p["chosen_score"] == max(r["scores"]) and p["rejected_score"] == min(r["scores"])
    assert main(base + ["--output", str(tmp_path / "x.jsonl"), "--output-format", "ranked",
                        "--pairing", "all"]) == 2
    assert "--pairing applies to --output-format pairs" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(out), "--output-dir", str(tmp_path / "dpo"),
                 "--max-steps", "2", "--batch-size", "4", "--save-steps", "none", "--no-progress",
                 "--cache-dir", str(cache_dir)]) == 0
    assert (tmp_path / "dpo" / "final").is_dir()


# ---------------------------------------------------------------------------- iterate


def _iterate(model: Path, prompts: Path, judge: str, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["iterate", "--model", str(model), "--prompts", str(prompts), "--judge", judge, "--rounds", "2",
            "--samples-per-prompt", "4", "--output-dir", str(out), "--eval-fraction", "0.25", "--max-new-tokens", "8",
            "--keep-truncated", "--learning-rate", "2e-2", "--max-steps", "10", "--batch-size", "8",
            "--save-steps", "3", "--logging-steps", "1", "--no-progress", "--cache-dir", str(cache), "--seed", "1",
            *extra]


class Interrupt:
    """train() hooks that stop the first training after ``step`` optimizer steps, like a Ctrl-C."""

    def __init__(self, step: int):
        self.step, self.fired = step, False

    def on_train_start(self, **_):
        pass

    def on_step(self, step, parts, metrics):
        if step == self.step and not self.fired:
            self.fired = True
            raise KeyboardInterrupt


NUMBERS = ("round", "reward_mean", "reward_stderr", "kl", "kl_stderr", "win_rate_vs_sft", "rows", "train_loss",
           "train_accuracy", "mean_tokens")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, prompts, judge) -> Path:
    root = tmp_path_factory.mktemp("iterate")
    out = root / "full"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFOPT_CACHE", str(root / "cache"))
        assert main(_iterate(tiny_model_dir, prompts, judge, out, root / "cache")) == 0
    return out


def test_iterate_raises_the_reward_round_by_round(uninterrupted, tiny_model_dir):
    out = uninterrupted
    records = _read_jsonl(out / "rounds.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2]
    r0, r1, r2 = records
    assert r0["kl"] == 0.0 and r0["train_loss"] is None and r0["policy"] == str(tiny_model_dir)
    assert r2["reward_mean"] > r0["reward_mean"] + 3 * max(r0["reward_stderr"], r2["reward_stderr"])
    assert r1["kl"] > 0 and r2["kl"] > 0 and r2["win_rate_vs_sft"] > 0.6
    for r, rec in ((1, r1), (2, r2)):
        d = out / f"round-{r}"
        assert json.loads((d / "metrics.json").read_text()) == rec
        assert (d / "done").is_file() and (d / "train" / "final" / "model.safetensors").is_file()
        data = _read_jsonl(d / "data.jsonl")
        assert rec["rows"] == len(data) and all(len(row["completions"]) >= 2 for row in data)
        assert rec["policy"] == str(d / "train" / "final")
        config = (d / "train" / "config.yaml").read_text()
        assert "ref_model: null" in config  # --reference round: the round's start policy
        assert f"model: {tiny_model_dir if r == 1 else out / 'round-1' / 'train' / 'final'}" in config
    # each round sampled with its own seed from its own policy
    assert json.loads((out / "round-1" / "sample.json").read_text())["seed"] == 2
    assert json.loads((out / "round-2" / "sample.json").read_text())["seed"] == 3
    assert (out / "iterate.yaml").is_file()


def test_iterate_resumes_after_a_kill_exactly(uninterrupted, tmp_path, tiny_model_dir, prompts, judge, cache_dir,
                                              monkeypatch, capsys):
    import prefopt.train

    out = tmp_path / "killed"
    args = _iterate(tiny_model_dir, prompts, judge, out, cache_dir)
    real_train = prefopt.train.train
    stop = Interrupt(step=5)  # after the checkpoint at step 3, before the one at step 6
    monkeypatch.setattr(prefopt.train, "train", lambda cfg, explicit=None, **kw: real_train(cfg, explicit, hooks=stop))
    assert main(args) == 130
    monkeypatch.setattr(prefopt.train, "train", real_train)
    r1 = out / "round-1"
    assert stop.fired and (r1 / "data.jsonl").is_file() and not (r1 / "done").exists()
    assert [p.name for p in sorted((r1 / "train" / "checkpoints").iterdir())] == ["step-3"]
    assert not (r1 / "train" / "final").exists()
    before = (r1 / "data.jsonl").stat()
    (out / ".tmp-rounds.jsonl.deadbeef").write_text("")  # what a kill -9 inside an atomic write leaves
    capsys.readouterr()

    assert main(args) == 0  # the same command continues the run
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "step-3" in printed
    after = (r1 / "data.jsonl").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "round 1 was sampled again"
    steps = [row["step"] for row in _read_jsonl(r1 / "train" / "metrics.jsonl") if "loss" in row]
    assert steps == list(range(1, 11))
    got, want = _read_jsonl(out / "rounds.jsonl"), _read_jsonl(uninterrupted / "rounds.jsonl")
    assert [[r[k] for k in NUMBERS] for r in got] == [[r[k] for k in NUMBERS] for r in want]
    assert [r["resumed"] for r in got] == [False, True, False]
    assert _read_jsonl(out / "round-2" / "data.jsonl") == _read_jsonl(uninterrupted / "round-2" / "data.jsonl")

    # finished: a rerun changes nothing; more rounds are allowed; other settings are refused
    assert main(args + ["--resume"]) == 0
    assert _read_jsonl(out / "rounds.jsonl") == got
    capsys.readouterr()
    assert main(args + ["--beta", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "other settings: train.beta (0.1 -> 0.2)" in err and "--overwrite" in err


def test_iterate_pairs_with_the_sft_reference(tmp_path, tiny_model_dir, prompts, judge, cache_dir):
    out = tmp_path / "pairs"
    args = _iterate(tiny_model_dir, prompts, judge, out, cache_dir, "--iterate-format", "pairs", "--reference", "sft")
    args[args.index("--max-steps") + 1] = "2"
    assert main(args) == 0
    for r in (1, 2):
        d = out / f"round-{r}"
        pairs = _read_jsonl(d / "pairs.jsonl")
        ranked = _read_jsonl(d / "data.jsonl")
        assert pairs and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
        assert len(pairs) == len(ranked)  # best vs worst of each ranked row
        assert json.loads((d / "metrics.json").read_text())["rows"] == len(pairs)
        assert (d / "train" / "config.yaml").read_text().count(f"data: {d / 'pairs.jsonl'}") == 1
    assert f"ref_model: {tiny_model_dir}" in (out / "round-2" / "train" / "config.yaml").read_text()


def test_iterate_output_dir_and_option_errors(tmp_path, tiny_model_dir, prompts, judge, cache_dir, capsys):
    base = _iterate(tiny_model_dir, prompts, judge, tmp_path / "new", cache_dir)
    assert main(base + ["--resume"]) == 2
    assert "holds no iterate run to continue" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(_iterate(tiny_model_dir, prompts, judge, other, cache_dir)) == 2
    assert "not an iterate run's (notes.txt)" in capsys.readouterr().err
    assert main(base + ["--eval-prompts", str(prompts)]) == 2
    assert "not both" in capsys.readouterr().err
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("data: prefs.jsonl\nbeta: 0.2\n")
    assert main(base + ["--config", str(yaml_file)]) == 2
    assert "'data' is set by prefopt iterate" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- plot by round


def test_plot_draws_reward_and_kl_by_round(tmp_path, capsys):
    run = tmp_path / "iter"
    run.mkdir()
    write_jsonl([{"round": r, "reward_mean": 0.2 + 0.1 * r, "reward_stderr": 0.02, "kl": 0.4 * r,
                  "kl_stderr": 0.05 * r} for r in range(3)], run / "rounds.jsonl")
    train_dir = run / "round-1" / "train"
    train_dir.mkdir(parents=True)
    write_jsonl([{"step": s, "loss": 0.7 - 0.1 * s} for s in (1, 2, 3)], train_dir / "metrics.jsonl")
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "plots" / "loss.png").is_file()  # each round's training curves too
    second = tmp_path / "iter2"
    second.mkdir()
    write_jsonl([{"round": 0, "reward_mean": 0.1, "kl": 0.0}, {"round": 1, "reward_mean": 0.3, "kl": 1.0}],
                second / "rounds.jsonl")
    assert main(["plot", str(run), str(second), "--output-dir", str(tmp_path / "both")]) == 0
    assert (tmp_path / "both" / "rounds.png").is_file()
    (second / "rounds.jsonl").write_text('{"round": 0, "reward_mean": "high", "kl": 0}\n')
    capsys.readouterr()
    assert main(["plot", str(second)]) == 2
    assert "'round', 'reward_mean' and 'kl'" in capsys.readouterr().err
