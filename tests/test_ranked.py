"""K answers per prompt: the ranked and UltraFeedback formats, their training, and prompts computed once."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import BAD, FILLER, GOOD, make_pairs, write_jsonl
from transformers import AutoModelForCausalLM

from prefopt.batching import collate, prompt_groups, split_rows
from prefopt.config import TrainConfig
from prefopt.data import Fields, Row, detect_format, to_ranked, tokenize_ranked, validate_rows
from prefopt.data.tokenize import TokenizedExample
from prefopt.errors import ConfigError, DataError
from prefopt.inputs import ranked_layout
from prefopt.logprobs import completion_logps
from prefopt.losses import LossParams
from prefopt.train import ranked_losses, loss_units, train

FAST = dict(batch_size=8, learning_rate=5e-3, lr_scheduler="constant", progress=False, logging_steps=1)


def rows_of(*data: dict) -> list[Row]:
    return [Row(d, line=i + 1, source="k.jsonl") for i, d in enumerate(data)]


def ranked_rows(n: int, seed: int, k_max: int = 4) -> list[dict]:
    """Prompts of filler words, 2..k_max answers mixing GOOD and BAD words, score = #GOOD - #BAD."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 8))) + ":"
        comps, scores = [], []
        for _ in range(rng.randint(2, k_max)):
            g, b = rng.randint(0, 3), rng.randint(0, 3)
            words = [rng.choice(GOOD) for _ in range(g)] + [rng.choice(BAD) for _ in range(b)] or ["day"]
            rng.shuffle(words)
            comps.append(" " + " ".join(words))
            scores.append(g - b)
        out.append({"prompt": prompt, "completions": comps, "scores": scores})
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- formats


def test_ranked_rows_convert_with_ties_and_conversations():
    data = rows_of({"prompt": "Q?", "completions": [" a", " b", " c"], "scores": [2, 1, 2]},
                   {"prompt": [{"role": "user", "content": "Hi"}], "completions": ["Hello", "Go away"],
                    "scores": [1.5, "-1"]})
    assert detect_format(data) == "ranked"
    first, second = to_ranked(data, "ranked")
    assert first.completions == [" a", " b", " c"] and first.scores == [2.0, 1.0, 2.0]
    assert second.prompt == [{"role": "user", "content": "Hi"}]
    assert second.completions == [[{"role": "assistant", "content": "Hello"}],
                                  [{"role": "assistant", "content": "Go away"}]]
    assert second.scores == [1.5, -1.0]


def test_field_names_remap():
    data = rows_of({"q": "Q?", "answers": [" a", " b"], "ratings": [1, 0]})
    f = Fields(prompt="q", completions="answers", scores="ratings")
    assert detect_format(data, fields=f) == "ranked"
    assert to_ranked(data, "ranked", f)[0].scores == [1.0, 0.0]


def test_ultrafeedback_shape_with_a_chosen_rating():
    row = {"instruction": "Name a colour.", "completions": [
        {"response": "Blue.", "overall_score": 7.5, "annotations": {"helpfulness": {"Rating": "4"}}},
        {"response": "No.", "overall_score": 2.0, "annotations": {"helpfulness": {"Rating": "1"}}},
        {"response": "Red.", "overall_score": 6.0, "annotations": {"helpfulness": {"Rating": "4"}}}]}
    data = rows_of(row)
    assert detect_format(data) == "ultrafeedback"
    ex = to_ranked(data, "ultrafeedback")[0]
    assert ex.prompt == "Name a colour." and ex.completions == ["Blue.", "No.", "Red."]
    assert ex.scores == [7.5, 2.0, 6.0]
    helpful = to_ranked(data, "ultrafeedback", Fields(rating="annotations.helpfulness.Rating"))[0]
    assert helpful.scores == [4.0, 1.0, 4.0]


def test_ultrafeedback_bad_rating_names_row_field_and_answer():
    row = {"instruction": "x", "completions": [{"response": "a", "overall_score": 1},
                                               {"response": "b", "overall_score": "N/A"}]}
    with pytest.raises(DataError) as e:
        to_ranked(rows_of({"instruction": "y", "completions": [{"response": "a", "overall_score": 1},
                                                               {"response": "b", "overall_score": 2}]}, row),
                  "ultrafeedback")
    msg = str(e.value)
    assert "k.jsonl" in msg and "line 2" in msg and "completions" in msg and "answer 2" in msg and "N/A" in msg
    with pytest.raises(DataError, match="no rating 'fine'"):
        to_ranked(rows_of(row), "ultrafeedback", Fields(rating="fine"))


@pytest.mark.parametrize("row, words", [
    ({"prompt": "Q", "completions": [" a", " b"], "scores": [1]}, ["2 answers but 1 scores", "scores"]),
    ({"prompt": "Q", "completions": [" a"], "scores": [1]}, ["at least 2 answers", "completions"]),
    ({"prompt": "Q", "completions": [" a", " b"], "scores": [1, "high"]}, ["score 2", "high"]),
    ({"prompt": "Q", "completions": [" a", ""], "scores": [1, 0]}, ["answer 2", "empty"]),
    ({"prompt": "Q", "completions": [" a", " b"], "scores": [1, float("nan")]}, ["score 2", "finite"]),
])
def test_bad_ranked_rows_are_reported_with_line_and_field(row, words):
    data = rows_of({"prompt": "P", "completions": [" x", " y"], "scores": [0, 1]}, row)
    problems = validate_rows(data, "ranked")
    assert len(problems) == 1
    text = str(problems[0])
    assert "line 2" in text and all(w in text for w in words), text


def test_tokenize_drops_all_tied_rows_and_layout_pads_to_k(tiny_tokenizer):
    data = rows_of({"prompt": "sky:", "completions": [" sunny", " dark", " warm"], "scores": [2, 0, 1]},
                   {"prompt": "road:", "completions": [" calm", " cold"], "scores": [1, 1]},
                   {"prompt": "town:", "completions": [" kind", " sad"], "scores": [3, -3]})
    examples, stats = tokenize_ranked(to_ranked(data, "ranked"), tiny_tokenizer)
    assert [e.line for e in examples] == [1, 3] and stats.dropped == {"every answer scored the same": 1}
    assert examples[0].scores == [2.0, 0.0, 1.0]
    train, evals = ranked_layout(examples, [TokenizedExample([5, 6], [[7], [8]], 0, 1)], tiny_tokenizer)
    assert [len(e.completions) for e in (*train, *evals)] == [3, 3, 3]
    assert train[1].completions[2] == [tiny_tokenizer.eos_token_id] and math.isnan(train[1].scores[2])
    assert evals[0].scores[:2] == [1.0, 0.0] and math.isnan(evals[0].scores[2])   # a pair: chosen 1, rejected 0


# ---------------------------------------------------------------------------- the losses in the loop


def testranked_losses_by_hand():
    beta = 0.5
    pol = torch.tensor([[-1.0, -3.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.5, -4.0]])
    scores = torch.tensor([[3.0, 1.0, 2.0, float("nan")]])       # answer 4 is filler
    tok = torch.ones_like(pol)
    cfg = TrainConfig(beta=beta)
    losses, out, logps = ranked_losses(pol, ref, tok, scores, cfg, LossParams(beta=beta))
    r = [beta * (p - q) for p, q in zip(pol[0, :3].tolist(), ref[0, :3].tolist())]   # 0.25, -0.5, 0.25
    pairs = [(0, 1), (0, 2), (2, 1)]
    want = sum(-math.log(1 / (1 + math.exp(-(r[i] - r[j])))) for i, j in pairs) / 3
    assert losses.item() == pytest.approx(want, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(r[0]) and out.rejected_rewards.item() == pytest.approx(r[1])
    assert logps.chosen.item() == -1.0 and logps.rejected.item() == -3.0
    assert "rewards/kendall_tau" in out.metrics and "rewards/best" not in out.metrics
    # pair weighting: the prompt's loss is the SUM over its pairs, the batch divides by the pair count
    pair_cfg = TrainConfig(beta=beta, k_weighting="pair")
    summed, _, _ = ranked_losses(pol, ref, tok, scores, pair_cfg, LossParams(beta=beta))
    assert summed.item() == pytest.approx(3 * want, abs=1e-6)
    # best vs worst: one pair
    bw, _, _ = ranked_losses(pol, ref, tok, scores, TrainConfig(beta=beta, k_pairing="best_vs_worst"),
                              LossParams(beta=beta))
    assert bw.item() == pytest.approx(-math.log(1 / (1 + math.exp(-(r[0] - r[1])))), abs=1e-6)
    # Plackett-Luce over the ranking 0 > 2 > 1
    pl, _, _ = ranked_losses(pol, ref, tok, scores, TrainConfig(beta=beta, loss_type=["plackett_luce"]),
                              LossParams(beta=beta))
    order = [0, 2, 1]
    want_pl = -sum(r[order[k]] - math.log(sum(math.exp(r[j]) for j in order[k:])) for k in range(3))
    assert pl.item() == pytest.approx(want_pl, abs=1e-6)


def test_loss_units_count_pairs_only_when_asked():
    ex = [TokenizedExample([1, 2], [[3], [4], [5]], 0, 1, scores=[2.0, 1.0, 0.0]),
          TokenizedExample([1, 3], [[3], [4], [5]], 1, 2, scores=[1.0, 0.0, math.nan])]
    batch = collate(ex, pad_token_id=0)
    assert loss_units(batch, TrainConfig()) == 2.0
    assert loss_units(batch, TrainConfig(k_weighting="pair")) == 4.0          # 3 pairs + 1 pair
    assert loss_units(batch, TrainConfig(k_weighting="pair", k_pairing="best_vs_worst")) == 2.0


# ---------------------------------------------------------------------------- grouping


def test_grouped_layout_gives_the_ungrouped_logps_and_gradients(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.eval()
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 190, (n,), generator=g).tolist()

    p1, p2, c, r1, r2, r3 = ids(9), ids(5), ids(4), ids(6), ids(3), ids(5)
    exs = [TokenizedExample(p1, [c, r1], 0, 1), TokenizedExample(p2, [r2, c], 1, 2),
           TokenizedExample(p1, [c, r2], 2, 3), TokenizedExample(p1, [r3, r1], 3, 4)]
    weights = torch.randn(8, generator=g)
    results = {}
    for group in (False, True):
        batch = collate(exs, pad_token_id=0, group_prompts=group)
        model.zero_grad()
        seq = completion_logps(model, batch)
        (seq.logps * weights).sum().backward()
        results[group] = (seq.logps.detach(), model.model.embed_tokens.weight.grad.clone(), batch)
    (lp0, g0, b0), (lp1, g1, b1) = results[False], results[True]
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)
    torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)
    # the prompt p1 once for three rows, the repeated completions (c, r1) laid out once
    assert b1.segments == (((0, 9, (4, 6, 3, 5)),), ((0, 5, (3, 4)),))
    assert b1.real_tokens == 9 + 4 + 6 + 3 + 5 + 5 + 3 + 4 < b0.real_tokens
    assert len(split_rows(b1)) == 2


def test_prompt_groups_keep_first_appearance_order():
    exs = [TokenizedExample(p, [[9], [8]], i, i + 1) for i, p in enumerate([[1], [2], [1], [3], [2]])]
    assert prompt_groups(exs) == [[0, 2], [1, 4], [3]]


def test_grouped_pairs_train_like_ungrouped(tiny_model_dir, tmp_path, cache_dir):
    base = make_pairs(12, seed=5)
    data = []
    for k, row in enumerate(base):   # three pairs per prompt, adjacent: the same order either way
        for j in range(3):
            data.append({"prompt": row["prompt"], "chosen": row["chosen"] if j != 2 else " kind sunny",
                         "rejected": make_pairs(40, seed=9)[3 * k + j]["rejected"]})
    path = write_jsonl(data, tmp_path / "grouped.jsonl")
    runs = {}
    for group in (True, False):
        out = tmp_path / f"g{group}"
        train(TrainConfig(model=str(tiny_model_dir), data=str(path), output_dir=str(out), max_steps=4,
                          shuffle=False, group_by_prompt=group, **FAST))
        runs[group] = [m["loss"] for m in metrics(out) if "loss" in m]
    assert len(runs[True]) == 4
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)


# ---------------------------------------------------------------------------- training end to end


def test_k2_ranked_rows_train_exactly_like_pairs(tiny_model_dir, pref_files, tmp_path, cache_dir):
    pairs = [json.loads(line) for line in pref_files[0].read_text().splitlines()]
    ranked = [{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "scores": [1, 0]} for r in pairs]
    path = write_jsonl(ranked, tmp_path / "k2.jsonl")
    curves = {}
    for name, data, loss in (("pairs", pref_files[0], "sigmoid"), ("ranked", path, "sigmoid"),
                             ("pl", pref_files[0], "plackett_luce")):
        out = tmp_path / name
        train(TrainConfig(model=str(tiny_model_dir), data=str(data), output_dir=str(out), max_steps=5,
                          loss_type=[loss], **FAST))
        curves[name] = [v for m in metrics(out) if "loss" in m for v in (m["loss"], m["rewards/margins"])]
    assert curves["ranked"] == pytest.approx(curves["pairs"], abs=1e-5)
    assert curves["pl"] == pytest.approx(curves["pairs"], abs=1e-5)     # Plackett-Luce with K = 2 is DPO


@pytest.mark.parametrize("loss", ["sigmoid", "plackett_luce"])
def test_ranked_training_learns_the_ranking(tiny_model_dir, tmp_path, cache_dir, loss):
    train_path = write_jsonl(ranked_rows(64, seed=1), tmp_path / "train.jsonl")
    eval_path = write_jsonl(ranked_rows(16, seed=2), tmp_path / "eval.jsonl")
    out = tmp_path / "run"
    result = train(TrainConfig(model=str(tiny_model_dir), data=str(train_path), eval_data=str(eval_path),
                               output_dir=str(out), max_steps=16, eval_steps=8, loss_type=[loss], **FAST))
    first = metrics(out)[0]
    assert first["loss"] == pytest.approx(math.log(2) if loss == "sigmoid" else first["loss"])
    assert first["rewards/kendall_tau"] == pytest.approx(0.0, abs=1e-6)       # policy = reference at step 1
    assert result["eval/rewards/kendall_tau"] > 0.5 and result["eval/rewards/pair_accuracy"] > 0.7
    assert result["eval/rewards/margins"] > 0
    assert (out / "final" / "model.safetensors").exists()


def test_ranked_data_refuses_pair_only_options(tiny_model_dir, tmp_path, cache_dir):
    path = write_jsonl(ranked_rows(16, seed=1), tmp_path / "k.jsonl")
    common = dict(model=str(tiny_model_dir), data=str(path), max_steps=1, **FAST)
    for extra, words in ((dict(ld_alpha=0.5), "--ld-alpha"), (dict(wpo_weighting=True), "--wpo-weighting"),
                         (dict(loss_type=["aot"]), "aot")):
        with pytest.raises(ConfigError, match=words):
            train(TrainConfig(output_dir=str(tmp_path / words.strip("-")), **common, **extra))
    with pytest.raises(DataError, match="KTO trains on pairs"):
        train(TrainConfig(output_dir=str(tmp_path / "kto"), loss_type=["kto"], **common))


def test_sft_on_ranked_data_trains_the_best_answer(tiny_tokenizer):
    data = rows_of({"prompt": "sky:", "completions": [" dark", " sunny", " warm"], "scores": [0, 2, 2]})
    from prefopt.data import to_sft
    assert to_sft(data, "ranked")[0].completion == " sunny"      # the first of those tied for best


def test_data_check_reports_ranked_rows_as_best_vs_worst(tmp_path, tiny_model_dir):
    from prefopt.cli import main
    from prefopt.commands.data_check import check_file

    path = write_jsonl([{"prompt": "sky:", "completions": [" dark day", " sunny day", " warm day"], "scores": [0, 2, 1]},
                        {"prompt": "road:", "completions": [" calm road", " cold road"], "scores": [1, 1]}],
                       tmp_path / "k.jsonl")
    report = check_file(str(path))
    assert report["format"] == "ranked" and report["answers"] == 5 and report["pairs"] == 1
    tied = [p for p in report["problems"] if p["kind"] == "tied"]
    assert tied == [{"kind": "tied", "line": 2, "field": "scores", "severity": "warning",
                     "message": "every answer has the same score: nothing to learn, training drops the row"}]
    renamed = write_jsonl([{"q": "sky:", "a": [" dark day", " sunny day"], "s": [0, 2]}], tmp_path / "r.jsonl")
    assert main(["data", "check", str(renamed), "--prompt-field", "q", "--completions-field", "a",
                 "--scores-field", "s", "--format", "json"]) == 0


def test_eval_scores_k_answer_files_with_the_training_loss(tiny_model_dir, tmp_path, cache_dir):
    from prefopt.scoring import score_file

    path = write_jsonl(ranked_rows(6, seed=7), tmp_path / "k.jsonl")
    result = score_file(TrainConfig(model=str(tiny_model_dir), data=str(path)))
    assert result["loss"] == pytest.approx(math.log(2), abs=1e-6)        # the model is its own reference
    assert result["rewards/kendall_tau"] == pytest.approx(0.0, abs=1e-6)
    row = result["per_example"][0]
    assert len(row["scores"]) == len(row["policy_logps"]) == len(ranked_rows(6, seed=7)[0]["completions"])
