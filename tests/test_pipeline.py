"""The pipeline around training: sft, sample (judges, pairing), eval --generate, plot, and the KL estimate.

Everything runs on tiny models built on the spot; the KL estimator is checked against
an exact computation on a model small enough to enumerate every completion.
"""
from __future__ import annotations

import itertools
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch

from prefopt.cli import main
from conftest import make_pairs, write_jsonl

JUDGE_MODULE = """
GOOD = {"sunny", "bright", "warm", "gentle", "kind", "happy", "calm", "clear"}


def length(prompts, completions):
    return [float(len(c)) for c in completions]


def good_words(prompts, completions):
    return [float(sum(w.strip(".,!") in GOOD for w in c.split())) for c in completions]


def wrong_count(prompts, completions):
    return [1.0]


def not_numbers(prompts, completions):
    return ["high" for _ in completions]


NOT_CALLABLE = 3
"""


@pytest.fixture
def judges(tmp_path, monkeypatch) -> str:
    """A module of judge functions importable as ``pipeline_judges``."""
    d = tmp_path / "judge_mod"
    d.mkdir()
    (d / "pipeline_judges.py").write_text(textwrap.dedent(JUDGE_MODULE))
    monkeypatch.syspath_prepend(str(d))
    return "pipeline_judges"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    rows = make_pairs(12, seed=5)
    return write_jsonl([{"prompt": r["prompt"]} for r in rows], tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny LlamaForSequenceClassification with one output, saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, num_labels=1,
                         pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
                         eos_token_id=tiny_tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------- sft


def _sft(model: Path, data: Path, out: Path, cache: Path, steps: int = 6) -> int:
    return main(["sft", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps",
                 str(steps), "--batch-size", "8", "--learning-rate", "3e-3", "--logging-steps", "1",
                 "--save-steps", "none", "--no-progress", "--cache-dir", str(cache)])


def test_sft_on_prompt_completion_data(tmp_path, tiny_model_dir, cache_dir):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in make_pairs(48, seed=7)]
    data = write_jsonl(rows, tmp_path / "sft.jsonl")
    assert _sft(tiny_model_dir, data, tmp_path / "run", cache_dir, steps=12) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, "SFT did not lower its loss"
    assert "rewards/chosen" not in metrics[0], "SFT has no preference rewards to log"
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_sft_on_messages_data(tmp_path, tiny_model_dir, cache_dir):
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
            for r in make_pairs(24, seed=8)]
    data = write_jsonl(rows, tmp_path / "chat.jsonl")
    assert _sft(tiny_model_dir, data, tmp_path / "run", cache_dir) == 0
    from prefopt.modeling import load_causal_lm

    model = load_causal_lm(str(tmp_path / "run" / "final"))
    assert model.config.vocab_size > 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 6


# ---------------------------------------------------------------------------- generation


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(tiny_model_dir):
    """Greedy continuations do not depend on the other (longer or shorter) prompts of the batch."""
    from prefopt.generation import GenerationSettings, encode_prompts, generate
    from prefopt.modeling import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    prompts = ["the sky", "a river and the town was calm and the road:", "morning"]
    ids = encode_prompts(tok, prompts)
    assert all(i[0] == tok.bos_token_id and i.count(tok.bos_token_id) == 1 for i in ids)
    greedy = GenerationSettings(num_samples=1, max_new_tokens=6, temperature=0.0, batch_size=8)
    together = generate(model, tok, ids, greedy)
    for i in range(len(prompts)):
        alone = generate(model, tok, [ids[i]], greedy)[0][0]
        assert together[i][0].token_ids == alone.token_ids
        # decoded text is the new tokens only
        assert together[i][0].text == tok.decode(ids[i] + alone.token_ids, skip_special_tokens=True)[
            len(tok.decode(ids[i], skip_special_tokens=True)):]


def test_load_prompts_txt_jsonl_and_pairs(tmp_path):
    from prefopt.generation import load_prompts

    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["first prompt", "second prompt"]
    pairs = write_jsonl(make_pairs(3, seed=1) * 2, tmp_path / "pairs.jsonl")
    assert len(load_prompts(str(pairs))) == 6
    assert len(load_prompts(str(pairs), unique=True)) == 3
    chat = write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
                       tmp_path / "chat.jsonl")
    assert load_prompts(str(chat)) == [[{"role": "user", "content": "hi"}]]


# ---------------------------------------------------------------------------- pairing


def _fake_samples(texts: list[list[str]]):
    from prefopt.generation import Sample

    return [[Sample(i, k, [k + 5, 2], t, True) for k, t in enumerate(row)] for i, row in enumerate(texts)]


def test_pairing_modes():
    from prefopt.generation import make_pairs as pair

    samples = _fake_samples([["a", "b", "c", "d"], ["x", "x", "y", "z"]])
    scores = torch.tensor([[0.1, 0.9, -0.5, 0.3], [2.0, 2.0, 1.0, 1.0]], dtype=torch.float64)
    rows, skipped = pair(["p0", "p1"], samples, scores, "best-worst")
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "c"), ("x", "y")]
    assert rows[0]["chosen_score"] == 0.9 and rows[0]["rejected_score"] == -0.5
    rows, skipped = pair(["p0", "p1"], samples, scores, "all")
    assert len([r for r in rows if r["prompt"] == "p0"]) == 6
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    # p1: (x, x) identical and tied, (y, z) tied -> 4 pairs of unequal score remain
    assert len([r for r in rows if r["prompt"] == "p1"]) == 4
    assert skipped["tied"] == 2
    empty = _fake_samples([["", "b"]])
    rows, skipped = pair(["p"], empty, torch.tensor([[1.0, 0.0]]), "best-worst")
    assert rows == [] and skipped["empty_samples"] == 1 and skipped["too_few_samples"] == 1


def test_bradley_terry_labels_follow_the_sigmoid_of_the_score_gap():
    from prefopt.generation import make_pairs as pair

    n = 3000
    samples = _fake_samples([["first", "second"]] * n)
    scores = torch.tensor([[1.0, 0.0]] * n, dtype=torch.float64)
    rows, _ = pair(["p"] * n, samples, scores, "bradley-terry", seed=1)
    assert len(rows) == n
    frac = sum(r["chosen"] == "first" for r in rows) / n
    p = 1 / (1 + math.exp(-1.0))
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)
    rows, _ = pair(["p"] * n, samples, scores, "bradley-terry", seed=1, bt_scale=4.0)
    p4 = 1 / (1 + math.exp(-4.0))
    assert abs(sum(r["chosen"] == "first" for r in rows) / n - p4) < 4 * math.sqrt(p4 * (1 - p4) / n)


# ---------------------------------------------------------------------------- sample


@pytest.mark.parametrize("pairing", ["best-worst", "all", "bradley-terry"])
def test_sample_with_callable_judge_then_train_on_the_pairs(tmp_path, tiny_model_dir, prompts_file, judges,
                                                            cache_dir, pairing):
    out = tmp_path / "pairs.jsonl"
    code = main(["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts_file), "--num-samples", "4",
                 "--judge", f"{judges}:length", "--output", str(out), "--max-new-tokens", "8", "--batch-size", "16",
                 "--pairing", pairing, "--seed", "3", "--keep-truncated"])
    assert code == 0
    rows = _read_jsonl(out)
    assert rows, "no pairs written"
    for r in rows:
        assert set(r) >= {"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        assert r["chosen_score"] == float(len(r["chosen"])) and r["rejected_score"] == float(len(r["rejected"]))
        assert r["chosen"] != r["rejected"]
        if pairing != "bradley-terry":
            assert r["chosen_score"] > r["rejected_score"]
    per_prompt = {}
    for r in rows:
        per_prompt[r["prompt"]] = per_prompt.get(r["prompt"], 0) + 1
    if pairing == "best-worst":
        assert max(per_prompt.values()) == 1
    if pairing == "bradley-terry":
        assert max(per_prompt.values()) <= 2
    assert not list(tmp_path.glob(".*part")), "the temporary file of the atomic write was left behind"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(out), "--output-dir", str(tmp_path / "dpo"),
                 "--max-steps", "2", "--batch-size", "4", "--save-steps", "none", "--no-progress",
                 "--cache-dir", str(cache_dir)])
    assert code == 0
    assert (tmp_path / "dpo" / "final").is_dir()


def test_sample_is_reproducible_for_a_seed(tmp_path, tiny_model_dir, prompts_file, judges):
    args = ["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts_file), "--num-samples", "3",
            "--judge", f"{judges}:length", "--max-new-tokens", "6", "--pairing", "all", "--keep-truncated"]
    assert main(args + ["--output", str(tmp_path / "a.jsonl"), "--seed", "1"]) == 0
    assert main(args + ["--output", str(tmp_path / "b.jsonl"), "--seed", "1"]) == 0
    assert main(args + ["--output", str(tmp_path / "c.jsonl"), "--seed", "2"]) == 0
    a, b, c = (_read_jsonl(tmp_path / f"{x}.jsonl") for x in "abc")
    assert a == b
    assert a != c


def test_sample_with_reward_model_judge(tmp_path, tiny_model_dir, prompts_file, reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "pairs.jsonl"
    assert main(["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts_file), "--num-samples", "3",
                 "--judge", str(reward_model_dir), "--output", str(out), "--max-new-tokens", "8",
                 "--judge-batch-size", "5", "--keep-truncated"]) == 0
    rows = _read_jsonl(out)
    assert rows
    # The scores kept in the rows are the reward model's scalar on prompt + completion, computed
    # here one text at a time (no padding), so batching and padding in the judge changed nothing.
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    for r in rows[:4]:
        for key in ("chosen", "rejected"):
            enc = tok(r["prompt"] + r[key], return_tensors="pt")
            with torch.no_grad():
                expected = rm(**enc).logits[0, 0].item()
            assert r[f"{key}_score"] == pytest.approx(expected, abs=1e-4)


def test_bad_judge_specs_are_clear_errors(tmp_path, tiny_model_dir, prompts_file, judges, capsys, reward_model_dir):
    from prefopt.judges import load_judge
    from prefopt.errors import ConfigError, DataError
    from transformers import AutoConfig

    base = ["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts_file), "--output",
            str(tmp_path / "x.jsonl"), "--max-new-tokens", "4"]
    cases = {
        "no_such_module_xyz:f": "cannot import module 'no_such_module_xyz'",
        f"{judges}:missing": "has no attribute 'missing'",
        f"{judges}:NOT_CALLABLE": "not a function",
        str(tmp_path / "nowhere"): "no such directory",
        str(prompts_file): "is a file",
        str(tiny_model_dir): "not a reward model",
    }
    for spec, message in cases.items():
        assert main(base + ["--judge", spec]) == 2, spec
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (spec, err)
    assert not (tmp_path / "x.jsonl").exists()
    # two output labels: not a scalar reward
    two = tmp_path / "rm2"
    cfg = AutoConfig.from_pretrained(reward_model_dir)
    cfg.num_labels = 2
    from transformers import LlamaForSequenceClassification

    LlamaForSequenceClassification(cfg).save_pretrained(two)
    with pytest.raises(ConfigError, match="2 output labels"):
        load_judge(str(two))
    # a judge that misbehaves at call time
    from prefopt.judges import judge_scores

    with pytest.raises(DataError, match="returned 1 scores for 2"):
        judge_scores(load_judge(f"{judges}:wrong_count"), ["a", "b"], ["x", "y"])
    with pytest.raises(DataError, match="list of numbers"):
        judge_scores(load_judge(f"{judges}:not_numbers"), ["a"], ["x"])


def test_vader_judge_scores_sentiment():
    from prefopt.judges import load_judge

    vader = load_judge("vader")
    good, bad = vader(["The film was", "The film was"], [" wonderful and moving.", " awful and boring."])
    assert good > 0.5 and bad < -0.5
    only = load_judge("vader-completion")
    assert only(["I hated it but"], [" the end"])[0] == 0.0
    assert vader(["I hated it but"], [" the end"])[0] < 0


# ---------------------------------------------------------------------------- eval --generate


def test_eval_generate_reports_rewards_win_rate_and_kl(tmp_path, tiny_model_dir, tiny_tokenizer, pref_files, judges):
    from prefopt.tiny import build_llama, save_tiny

    other = save_tiny(build_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                  seed=11), tiny_tokenizer, tmp_path / "other")
    out = tmp_path / "gen.json"
    train_file, eval_file = pref_files
    code = main(["eval", "--generate", "--model", str(other), "--ref-model", str(tiny_model_dir), "--data",
                 str(eval_file), "--judge", f"{judges}:length", "--num-samples", "3", "--max-new-tokens", "6",
                 "--max-prompts", "10", "--output", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("policy_reward_mean", "ref_reward_mean", "win_rate", "kl", "kl_stderr", "policy_reward_stderr",
                "num_prompts", "num_samples", "per_sample"):
        assert key in res, key
    assert res["num_prompts"] == 10 and res["num_samples"] == 3 and len(res["per_sample"]) == 30
    rows = res["per_sample"]
    assert res["policy_reward_mean"] == pytest.approx(sum(r["policy_reward"] for r in rows) / 30)
    assert res["ref_reward_mean"] == pytest.approx(sum(r["ref_reward"] for r in rows) / 30)
    wins = [1.0 if r["policy_reward"] > r["ref_reward"] else 0.5 if r["policy_reward"] == r["ref_reward"] else 0.0
            for r in rows]
    assert res["win_rate"] == pytest.approx(sum(wins) / 30)
    assert res["kl"] == pytest.approx(sum(r["policy_logp"] - r["ref_logp_of_policy_sample"] for r in rows) / 30)
    assert res["kl"] > 0, "two different random models: the KL estimate should be clearly positive"

    # The policy against itself: identical samples (same seed), KL exactly 0, every comparison a tie.
    same = tmp_path / "same.json"
    assert main(["eval", "--generate", "--model", str(tiny_model_dir), "--ref-model", str(tiny_model_dir),
                 "--data", str(train_file), "--judge", f"{judges}:length", "--num-samples", "2",
                 "--max-new-tokens", "5", "--max-prompts", "4", "--output", str(same)]) == 0
    res = json.loads(same.read_text())
    assert res["kl"] == 0.0 and res["win_rate"] == 0.5
    assert res["policy_reward_mean"] == res["ref_reward_mean"]


def test_eval_generate_needs_a_judge_and_a_reference(tmp_path, tiny_model_dir, pref_files, capsys):
    base = ["eval", "--generate", "--model", str(tiny_model_dir), "--data", str(pref_files[1]),
            "--output", str(tmp_path / "o.json")]
    assert main(base + ["--ref-model", str(tiny_model_dir)]) == 2
    assert "--judge" in capsys.readouterr().err
    assert main(base + ["--judge", "vader"]) == 2
    assert "--ref-model" in capsys.readouterr().err
    assert main(base + ["--ref-model", str(tiny_model_dir), "--judge", "no_such_module_xyz:f"]) == 2
    assert "cannot import module" in capsys.readouterr().err
    assert main(base + ["--ref-model", str(tiny_model_dir), "--judge", str(tiny_model_dir)]) == 2
    assert "not a reward model" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


# ---------------------------------------------------------------------------- plot


def _fake_run(path: Path, with_rewards: bool) -> Path:
    path.mkdir(parents=True)
    rows = []
    for step in range(1, 6):
        row = {"step": step, "loss": 0.7 - 0.05 * step, "logps/chosen": -10.0 + step, "logps/rejected": -11.0}
        if with_rewards:
            row.update({"rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step,
                        "rewards/margins": 0.2 * step, "rewards/accuracies": 0.5 + 0.1 * step})
        rows.append(row)
    rows.append({"step": 5, "eval/loss": 0.4, "eval/rewards/accuracies": 0.8, "eval/rewards/margins": 0.5})
    write_jsonl(rows, path / "metrics.jsonl")
    return path


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_writes_pngs_and_a_frontier(tmp_path, capsys):
    dpo = _fake_run(tmp_path / "dpo", True)
    assert main(["plot", str(dpo)]) == 0
    names = sorted(p.name for p in (dpo / "plots").glob("*.png"))
    assert names == ["accuracy.png", "eval.png", "logps.png", "loss.png", "rewards.png"]
    assert all(_is_png(p) for p in (dpo / "plots").glob("*.png"))

    sft = _fake_run(tmp_path / "sft", False)
    (tmp_path / "gen_a.json").write_text(json.dumps({"kl": 1.5, "policy_reward_mean": 0.3, "policy": "a"}))
    (tmp_path / "gen_b.json").write_text(json.dumps({"points": [{"kl": 0.0, "reward": 0.1, "method": "SFT"}]}))
    out = tmp_path / "charts"
    assert main(["plot", str(sft), str(dpo), "--output-dir", str(out), "--frontier", str(tmp_path / "gen_a.json"),
                 str(tmp_path / "gen_b.json")]) == 0
    assert (out / "frontier.png").is_file() and _is_png(out / "frontier.png")
    assert (out / "rewards.png").is_file()
    # automatic detection: the run directory holds an eval --generate result
    (dpo / "eval_generate.json").write_text(json.dumps({"kl": 2.0, "policy_reward_mean": 0.4}))
    assert main(["plot", str(dpo), "--output-dir", str(tmp_path / "auto")]) == 0
    assert (tmp_path / "auto" / "frontier.png").is_file()
    # a JSON file with no generation results is an error that says what is expected
    (tmp_path / "bad.json").write_text(json.dumps({"loss": 1.0}))
    capsys.readouterr()
    assert main(["plot", "--frontier", str(tmp_path / "bad.json"), "--output-dir", str(out)]) == 2
    assert "policy_reward_mean" in capsys.readouterr().err


def test_plot_only_draws_what_a_run_logged(tmp_path):
    from prefopt.plotting import plot_runs

    sft = _fake_run(tmp_path / "sft", False)
    names = sorted(p.name for p in plot_runs([sft], tmp_path / "out"))
    assert "rewards.png" not in names and "accuracy.png" not in names and "loss.png" in names


# ---------------------------------------------------------------------------- KL estimate, exactly


def _enumerable_models():
    """Two 5-token models (pad, bos, eos, a, b) with peaked, different next-token distributions."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "a": 3, "b": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>")

    def build(seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=2, intermediate_size=32, max_position_embeddings=32,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        m = LlamaForCausalLM(config)
        with torch.no_grad():
            m.lm_head.weight.normal_(0.0, 0.6)  # logits of order 2: far from uniform
        return m.eval()

    return tok, build(1), build(2)


def _exact_table(model, prompt: list[int], max_new: int, eos: int, vocab: int) -> dict[tuple, float]:
    """log pi(y|x) of every possible completion (stopping at EOS, or cut at max_new tokens)."""
    table = {}
    seqs = []
    for n in range(1, max_new + 1):
        for body in itertools.product([t for t in range(vocab) if t != eos], repeat=n - 1):
            seqs.append(body + (eos,))
        if n == max_new:
            seqs.extend(itertools.product([t for t in range(vocab) if t != eos], repeat=n))
    with torch.no_grad():
        for y in seqs:
            ids = torch.tensor([prompt + list(y)])
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
            table[y] = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(y))
    return table


def test_kl_estimate_matches_the_exact_kl_of_an_enumerable_model():
    from prefopt.generation import GenerationSettings, generate, mean_and_stderr, sample_logps

    tok, policy, ref = _enumerable_models()
    max_new = 3
    prompts = [[1, 3], [1, 4, 3, 4]]  # two lengths: batches mix them, so left padding is exercised
    exact_kl, exact_ent, pol_tables, ref_tables = [], [], [], []
    for p in prompts:
        pt = _exact_table(policy, p, max_new, eos=2, vocab=5)
        rt = _exact_table(ref, p, max_new, eos=2, vocab=5)
        assert len(pt) == 1 + 4 + 16 + 64
        assert sum(math.exp(v) for v in pt.values()) == pytest.approx(1.0, abs=1e-5)
        exact_kl.append(sum(math.exp(pt[y]) * (pt[y] - rt[y]) for y in pt))
        exact_ent.append(-sum(math.exp(pt[y]) * pt[y] for y in pt))
        pol_tables.append(pt)
        ref_tables.append(rt)
    assert min(exact_kl) > 0.05, "the two models should differ"

    n = 3000
    settings = GenerationSettings(num_samples=n, max_new_tokens=max_new, temperature=1.0, top_p=1.0, seed=0,
                                  batch_size=700)
    samples = generate(policy, tok, prompts, settings)
    pol = sample_logps(policy, prompts, samples, batch_size=1000, pad_token_id=0)
    ref_lp = sample_logps(ref, prompts, samples, batch_size=1000, pad_token_id=0)
    for i in range(len(prompts)):
        for k in range(n):
            y = tuple(samples[i][k].token_ids)
            assert y in pol_tables[i], f"sample {y} is not a possible completion (EOS handling)"
            assert samples[i][k].finished == (y[-1] == 2)
        for k in range(0, n, 7):  # the estimator's per-sample log-ratio is the exact one
            y = tuple(samples[i][k].token_ids)
            assert pol[i, k].item() == pytest.approx(pol_tables[i][y], abs=2e-4)
            assert (pol[i, k] - ref_lp[i, k]).item() == pytest.approx(pol_tables[i][y] - ref_tables[i][y], abs=3e-4)
        kl, se = mean_and_stderr(pol[i] - ref_lp[i])
        assert abs(kl - exact_kl[i]) < 4 * se, (kl, exact_kl[i], se)
        # the samples follow pi_theta: the mean of -log pi_theta(y) is its entropy
        ent, se_ent = mean_and_stderr(-pol[i])
        assert abs(ent - exact_ent[i]) < 4 * se_ent, (ent, exact_ent[i], se_ent)
