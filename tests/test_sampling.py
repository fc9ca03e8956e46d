"""Sampled data that teaches the right thing.

* `prefopt sample` leaves samples cut at --max-new-tokens out of the pairs (training
  would end them with EOS and teach the model to stop mid-sentence), unless
  --keep-truncated.
* A completion the chat template already closes with its end-of-turn token gets no
  second stop token.
* LD-DPO's and WPO's pair-based reweighting is refused with KTO.

Tiny models and tokenizers are built on the spot; nothing is downloaded.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prefopt.cli import main
from prefopt.errors import ConfigError
from conftest import make_pairs, write_jsonl


# ---------------------------------------------------------------------------- pairing drops cut samples


def _samples(rows: list[list[tuple[str, bool]]]):
    from prefopt.generation import Sample

    return [[Sample(i, k, [k + 5] + ([2] if done else []), text, done) for k, (text, done) in enumerate(row)]
            for i, row in enumerate(rows)]


def test_make_pairs_leaves_out_samples_cut_at_max_new_tokens():
    from prefopt.generation import make_pairs as pair

    samples = _samples([[("a", True), ("b", False), ("c", False), ("d", True)],
                        [("x", True), ("y", False), ("z", False), ("w", False)],
                        [("", True), ("q", True), ("r", False), ("s", True)]])
    scores = torch.tensor([[0.1, 0.9, -0.5, 0.3], [1.0, 2.0, 3.0, 4.0], [5.0, 1.0, 9.0, 0.0]], dtype=torch.float64)
    rows, skipped = pair(["p0", "p1", "p2"], samples, scores, "best-worst", keep_truncated=False)
    # p0: only a and d ended; p1: one sample left, so no pair; p2: the empty one is out too
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("p0", "d", "a"), ("p2", "q", "s")]
    assert skipped["truncated_samples"] == 2 + 3 + 1
    assert skipped["too_few_samples"] == 1
    assert skipped["empty_samples"] == 1
    rows, skipped = pair(["p0", "p1", "p2"], samples, scores, "all", keep_truncated=False)
    assert all(r["chosen"] in "adqs" and r["rejected"] in "adqs" for r in rows)
    # kept, they pair as before
    rows, skipped = pair(["p0", "p1", "p2"], samples, scores, "best-worst", keep_truncated=True)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("b", "c"), ("w", "x"), ("r", "s")]
    assert skipped["truncated_samples"] == 0 and skipped["too_few_samples"] == 0


JUDGE = """
def length(prompts, completions):
    return [float(len(c)) for c in completions]
"""


@pytest.fixture
def judge(tmp_path, monkeypatch) -> str:
    d = tmp_path / "judge_mod"
    d.mkdir()
    (d / "sampling_judges.py").write_text(textwrap.dedent(JUDGE))
    monkeypatch.syspath_prepend(str(d))
    return "sampling_judges:length"


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama that samples EOS at roughly one step in three, so some samples end and some are cut.

    Dimension 0 of every embedding is large, so after the final norm it is nearly constant;
    only EOS reads it in the output head.
    """
    from prefopt.tiny import build_llama, save_tiny

    model = build_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[tiny_tokenizer.eos_token_id, 0] = 0.8
    return save_tiny(model, tiny_tokenizer, tmp_path_factory.mktemp("stopping") / "model")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sample_leaves_cut_samples_out_unless_keep_truncated(tmp_path, stopping_model_dir, judge, capsys):
    from prefopt.generation import GenerationSettings, encode_prompts, generate
    from prefopt.modeling import load_causal_lm, load_tokenizer

    prompts = [r["prompt"] for r in make_pairs(12, seed=5)]
    prompts_file = write_jsonl([{"prompt": p} for p in prompts], tmp_path / "prompts.jsonl")
    base = ["sample", "--model", str(stopping_model_dir), "--prompts", str(prompts_file), "--num-samples", "4",
            "--judge", judge, "--max-new-tokens", "4", "--pairing", "all", "--seed", "0"]
    # The samples `sample` draws (same seed, batch size and device: reproducible).
    tok = load_tokenizer(str(stopping_model_dir))
    settings = GenerationSettings(num_samples=4, max_new_tokens=4, seed=0, batch_size=16, max_prompt_length=512)
    samples = generate(load_causal_lm(str(stopping_model_dir)), tok, encode_prompts(tok, prompts, 512), settings)
    cut = sum(not s.finished for row in samples for s in row)
    assert 0 < cut < 48, "the model should end some samples and run out of tokens on others"
    ended = {(i, s.text) for i, row in enumerate(samples) for s in row if s.finished}
    only_cut = {(i, s.text) for i, row in enumerate(samples) for s in row if not s.finished} - ended

    assert main(base + ["--output", str(tmp_path / "default.jsonl")]) == 0
    out = capsys.readouterr().out
    assert f"{cut} of 48 samples were cut at --max-new-tokens 4: left out of the pairs" in out
    assert re.search(rf"skipped: .*\b{cut} truncated_samples", out), out
    too_few = sum(sum(s.finished and bool(s.text.strip()) for s in row) < 2 for row in samples)
    if too_few:
        assert f"{too_few} too_few_samples" in out
    rows = _read_jsonl(tmp_path / "default.jsonl")
    assert rows
    for r in rows:
        assert (r["prompt_index"], r["chosen"]) in ended and (r["prompt_index"], r["rejected"]) in ended

    assert main(base + ["--output", str(tmp_path / "kept.jsonl"), "--keep-truncated"]) == 0
    out = capsys.readouterr().out
    assert f"{cut} of 48 samples were cut at --max-new-tokens 4: kept (--keep-truncated)" in out
    kept = _read_jsonl(tmp_path / "kept.jsonl")
    assert len(kept) > len(rows)
    assert any((r["prompt_index"], r[k]) in only_cut for r in kept for k in ("chosen", "rejected"))


def test_sample_pairs_summary_counts_cut_samples(stopping_model_dir, judge):
    from prefopt.generation import GenerationSettings, sample_pairs

    prompts = [r["prompt"] for r in make_pairs(6, seed=2)]
    settings = GenerationSettings(num_samples=3, max_new_tokens=3, seed=1)
    rows, summary = sample_pairs(model=str(stopping_model_dir), prompts=prompts, judge=judge, settings=settings)
    assert summary["truncated_samples"] == round((1 - summary["finished_fraction"]) * 18)
    assert summary["skipped"]["truncated_samples"] == summary["truncated_samples"]
    assert summary["keep_truncated"] is False
    _, kept = sample_pairs(model=str(stopping_model_dir), prompts=prompts, judge=judge, settings=settings,
                           keep_truncated=True)
    assert kept["truncated_samples"] == summary["truncated_samples"]
    assert kept["skipped"]["truncated_samples"] == 0


# ---------------------------------------------------------------------------- end-of-turn tokens

QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
WORDS = "hello world yes no sure the answer is paris london what capital of france".split()


def _chat_tokenizer(specials: list[str], template: str, **named) -> PreTrainedTokenizerFast:
    """A byte-level BPE with real-model-like special tokens (only those in ``named`` get a role)."""
    corpus = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 6)) for i in range(200)]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, **named)
    tok.chat_template = template
    return tok


def qwen_like(eos: str) -> PreTrainedTokenizerFast:
    return _chat_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], QWEN_TEMPLATE,
                           eos_token=eos, pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>",
                                                                                                "<|im_end|>"])


def llama3_like() -> PreTrainedTokenizerFast:
    # <|eot_id|> is an added special token without a named role, as in Llama 3's tokenizer.json
    return _chat_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>",
                           eos_token="<|end_of_text|>")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("make, end", [(lambda: qwen_like("<|im_end|>"), "<|im_end|>"),
                                       (lambda: qwen_like("<|endoftext|>"), "<|im_end|>"),
                                       (llama3_like, "<|eot_id|>")],
                         ids=["qwen-instruct", "qwen-base", "llama3"])
def test_completion_closed_by_the_template_gets_no_second_stop_token(make, end):
    from prefopt.data import PreferencePair, SFTExample, UnpairedExample
    from prefopt.data.tokenize import tokenize_pairs, tokenize_sft, tokenize_unpaired

    tok = make()
    end_id = tok.convert_tokens_to_ids(end)
    prompt = [{"role": "user", "content": "what is the capital of france"}]
    pair = PreferencePair(prompt=prompt, chosen="paris", rejected="london", source="t", line=1)
    ex = tokenize_pairs([pair], tok)[0][0]
    assert ex.completions == [_ids(tok, "paris") + [end_id], _ids(tok, "london") + [end_id]]
    assert tok.decode(ex.completions[0], skip_special_tokens=False) == f"paris{end}"
    # a message-list completion, SFT and KTO take the same path
    msg = PreferencePair(prompt=prompt, chosen=[{"role": "assistant", "content": "paris"}],
                         rejected=[{"role": "assistant", "content": "london"}], source="t", line=1)
    assert tokenize_pairs([msg], tok)[0][0].completions == ex.completions
    sft = tokenize_sft([SFTExample(prompt=prompt, completion="paris", source="t", line=1)], tok)[0][0]
    assert sft.completions == [ex.completions[0]]
    kto = tokenize_unpaired([UnpairedExample(prompt=prompt, completion="paris", label=True, source="t", line=1)],
                            tok)[0][0]
    assert kto.completions == [ex.completions[0]]
    # plain-text rows still end with exactly one EOS
    plain = tokenize_pairs([PreferencePair(prompt="q:", chosen=" yes", rejected=" no", source="t", line=1)],
                           tok)[0][0]
    assert plain.completions == [_ids(tok, " yes") + [tok.eos_token_id], _ids(tok, " no") + [tok.eos_token_id]]


def test_template_without_an_end_of_turn_token_still_gets_eos():
    from prefopt.data import PreferencePair
    from prefopt.data.tokenize import TokenizeSettings, tokenize_pairs

    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tok = _chat_tokenizer(["<|endoftext|>"], template, eos_token="<|endoftext|>")
    pair = PreferencePair(prompt=[{"role": "user", "content": "hello"}], chosen="yes", rejected="no",
                          source="t", line=1)
    ex = tokenize_pairs([pair], tok)[0][0]
    assert ex.completions == [_ids(tok, "yes\n") + [tok.eos_token_id], _ids(tok, "no\n") + [tok.eos_token_id]]
    # add_eos=False leaves a closed completion as the template rendered it
    tok = qwen_like("<|im_end|>")
    ex = tokenize_pairs([pair], tok, TokenizeSettings(add_eos=False))[0][0]
    assert ex.completions[0] == _ids(tok, "yes<|im_end|>\n")


# ---------------------------------------------------------------------------- KTO refuses pair reweighting


@pytest.mark.parametrize("flags, option", [({"ld_alpha": 0.5}, "--ld-alpha"), ({"wpo_weighting": True},
                                                                                "--wpo-weighting")])
def test_kto_refuses_pair_based_reweighting(flags, option):
    from prefopt.config import build_config

    with pytest.raises(ConfigError, match=rf"^{option}: .*KTO \(--loss-type kto\)"):
        build_config({"loss_type": ["kto"], **flags})
    build_config({"loss_type": ["sigmoid"], **flags})  # with pairs they stay allowed


def test_kto_with_ld_alpha_is_a_clear_cli_error(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--output-dir",
                 str(tmp_path / "out"), "--loss-type", "kto", "--ld-alpha", "0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--ld-alpha" in err and "KTO" in err and "Traceback" not in err
