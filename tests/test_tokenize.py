"""Tokenization rules (BOS/EOS, masks, truncation, drops, chat templates) and token audits.

A tiny byte-level BPE tokenizer is trained here in well under a second. Expected ids
are computed with the raw ``tokenizers.Tokenizer`` (no post-processor), independently
of the ``transformers`` wrapper the code under test goes through.
"""
from __future__ import annotations

import functools
import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from prefopt.data import (PreferencePair, SFTExample, SpecialTokens, TokenizedExample,
                          TokenizeSettings, UnpairedExample, audit_special_tokens,
                          length_stats, render_example, tokenize_pairs, tokenize_sft,
                          tokenize_unpaired, truncation_report)
from prefopt.errors import ConfigError, DataError, ModelError

SPECIALS = ["<bos>", "<eos>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
BOS, EOS = 0, 1
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
WORDS = ("the a cat dog sat on mat hello world what is capital of france paris london yes "
         "no sure here answer question please tell me about weather today good bad").split()


@functools.lru_cache(maxsize=None)
def trained_json() -> str:
    """A byte-level BPE (vocab 300) trained on short sentences, serialized."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
              for _ in range(400)] + ["the abc is abc"] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    assert [tok.token_to_id(t) for t in ("<bos>", "<eos>")] == [BOS, EOS]
    return tok.to_str()


def enc(text: str) -> list[int]:
    """Reference ids: the raw tokenizer, no special tokens added."""
    raw = Tokenizer.from_str(trained_json())
    return raw.encode(text, add_special_tokens=False).ids


def make_tokenizer(post: str | None = "<bos> $A", bos: bool = True,
                   template: str | None = TEMPLATE) -> PreTrainedTokenizerFast:
    """The tiny tokenizer wrapped for transformers, with a chosen post-processor."""
    raw = Tokenizer.from_str(trained_json())
    if post is not None:
        raw.post_processor = processors.TemplateProcessing(
            single=post, special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>" if bos else None,
                                  eos_token="<eos>", pad_token="<pad>")
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def pair(prompt: Any, chosen: Any, rejected: Any, line: int = 1) -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, line, "mem")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# --- ids and masks --------------------------------------------------------------------

def test_prompt_and_completions_tokenized_separately(tok):
    examples, stats = tokenize_pairs([pair("what is the capital of france?", " paris",
                                           " london today")], tok)
    ex = examples[0]
    assert ex.prompt_ids == [BOS] + enc("what is the capital of france?")
    assert ex.completions == [enc(" paris") + [EOS], enc(" london today") + [EOS]]
    assert (ex.index, ex.line, ex.label, ex.truncated) == (0, 1, None, False)
    assert stats.boundary_merges == 0 and stats.rows_kept == 1


def test_bos_once_when_text_already_starts_with_bos(tok):
    assert tok("<bos>hello", add_special_tokens=True)["input_ids"][:2] == [BOS, BOS]
    ex = tokenize_pairs([pair("<bos>hello world", " yes", " no")], tok)[0][0]
    assert ex.prompt_ids == enc("<bos>hello world") and ex.prompt_ids.count(BOS) == 1


def test_post_processor_eos_is_stripped_from_prompt():
    tok = make_tokenizer(post="<bos> $A <eos>")
    assert tok("hello", add_special_tokens=True)["input_ids"] == [BOS] + enc("hello") + [EOS]
    ex = tokenize_pairs([pair("hello world", " yes", " no")], tok)[0][0]
    assert ex.prompt_ids == [BOS] + enc("hello world")
    assert ex.completions == [enc(" yes") + [EOS], enc(" no") + [EOS]]


def test_tokenizer_without_bos_adds_none():
    tok = make_tokenizer(post=None, bos=False)
    ex = tokenize_pairs([pair("hello world", " yes", " no")], tok)[0][0]
    assert ex.prompt_ids == enc("hello world")


def test_eos_not_doubled_and_optional(tok):
    ex = tokenize_pairs([pair("hello", " yes<eos>", " no")], tok)[0][0]
    assert ex.completions == [enc(" yes") + [EOS], enc(" no") + [EOS]]
    ex = tokenize_pairs([pair("hello", " yes", " no")], tok,
                        TokenizeSettings(add_eos=False))[0][0]
    assert ex.completions == [enc(" yes"), enc(" no")]


def test_boundary_merge_is_counted(tok):
    assert enc("x abc") != enc("x ab") + enc("c")  # the precondition of this test
    examples, stats = tokenize_pairs([pair("x ab", "c", " the"), pair("x", " ab", " the")],
                                     tok)
    assert stats.boundary_merges == 1
    assert examples[0].prompt_ids == [BOS] + enc("x ab")
    assert examples[0].completions[0] == enc("c") + [EOS]
    assert "1 boundary merge" in stats.summary_line()


def test_batch_calls_do_not_grow_with_rows(tok):
    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner, self.calls = inner, 0

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.inner(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    counts = []
    for n in (5, 500):
        counting = Counting(tok)
        pairs = [pair(f"question {i} about the cat", " yes it is", " no") for i in range(n)]
        examples, _ = tokenize_pairs(pairs, counting)
        assert len(examples) == n
        counts.append(counting.calls)
    assert counts[0] == counts[1] <= 8


# --- truncation and drops -------------------------------------------------------------

def test_truncation_keeps_prompt_end_and_completion_start(tok):
    prompt = "the cat sat on the mat and the dog sat on the mat today"
    chosen, rejected = " hello world what is the weather", " no"
    settings = TokenizeSettings(max_length=8, max_prompt_length=4)
    ex = tokenize_pairs([pair(prompt, chosen, rejected)], tok, settings)[0][0]
    assert ex.prompt_ids == [BOS] + enc(prompt)[-3:]
    assert ex.completions == [(enc(chosen) + [EOS])[:4], enc(rejected) + [EOS]]
    assert ex.truncated


def test_truncation_without_bos_keeps_prompt_end():
    tok = make_tokenizer(post=None, bos=False)
    prompt = "the cat sat on the mat and the dog"
    settings = TokenizeSettings(max_length=10, max_prompt_length=3)
    ex = tokenize_pairs([pair(prompt, " yes", " no")], tok, settings)[0][0]
    assert ex.prompt_ids == enc(prompt)[-3:] and ex.truncated


def test_degenerate_pairs_dropped_and_counted(tok):
    long_prompt = "the cat sat on the mat and the dog sat on the mat today"
    pairs = [pair("hello", " same answer", " same answer", line=1),
             pair("hello", " the cat sat on the mat", " the cat sat on the dog", line=2),
             pair(long_prompt, " yes", " no", line=3),
             pair("hello", " yes", " no", line=4)]
    settings = TokenizeSettings(max_length=6, max_prompt_length=None)  # "hello": 3 tokens
    examples, stats = tokenize_pairs(pairs, tok, settings)
    assert [(ex.line, ex.index) for ex in examples] == [(4, 0)]
    assert stats.dropped == {"chosen==rejected": 1, "chosen==rejected after truncation": 1,
                             "empty completion": 1}
    assert stats.summary_line() == (
        "data: 4 rows read, 3 dropped (1 chosen==rejected, 1 chosen==rejected after "
        "truncation, 1 empty completion), 1 truncated, 0 boundary merges")


def test_settings_validation():
    with pytest.raises(ConfigError):
        TokenizeSettings(max_length=512, max_prompt_length=512)
    with pytest.raises(ConfigError):
        TokenizeSettings(max_length=1)


# --- chat templates -------------------------------------------------------------------

def test_chat_template_rendering(tok):
    ex = tokenize_pairs([pair(user("hello"), assistant("yes"), assistant("no"))], tok)[0][0]
    assert ex.prompt_ids == [BOS] + enc("<|user|>hello<eos><|assistant|>")
    assert ex.completions == [enc("yes<eos>"), enc("no<eos>")]
    assert ex.completions[0][-1] == EOS and ex.completions[0].count(EOS) == 1


def test_chat_template_that_inserts_bos():
    tok = make_tokenizer(template="<bos>" + TEMPLATE)
    ex = tokenize_pairs([pair(user("hello"), assistant("yes"), assistant("no"))], tok)[0][0]
    assert ex.prompt_ids == enc("<bos><|user|>hello<eos><|assistant|>")
    assert ex.prompt_ids.count(BOS) == 1


def test_chat_template_must_render_prompt_as_prefix():
    tok = make_tokenizer(template=TEMPLATE.replace("<|assistant|>{% endif %}",
                                                   "<|assistant|>\n{% endif %}"))
    with pytest.raises(DataError, match="does not render the prompt as a prefix") as err:
        tokenize_pairs([pair(user("hello"), assistant("yes"), assistant("no"), line=7)], tok)
    assert err.value.line == 7


def test_chat_template_errors_become_data_errors():
    tok = make_tokenizer(template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(DataError, match="roles must alternate"):
        tokenize_pairs([pair(user("hello"), assistant("yes"), assistant("no"))], tok)


def test_conversational_data_without_chat_template():
    tok = make_tokenizer(template=None)
    with pytest.raises(ModelError, match="no chat template; pass --chat-template FILE"):
        tokenize_pairs([pair(user("hello"), assistant("yes"), assistant("no"))], tok)


# --- unpaired and SFT -----------------------------------------------------------------

def test_tokenize_unpaired_keeps_labels(tok):
    examples = [UnpairedExample("hello", " yes", True, 1, "m"),
                UnpairedExample(user("hello"), assistant("no"), False, 2, "m")]
    out, stats = tokenize_unpaired(examples, tok)
    assert [(ex.label, ex.line) for ex in out] == [(True, 1), (False, 2)]
    assert out[0].completions == [enc(" yes") + [EOS]]
    assert out[1].completions == [enc("no<eos>")]
    assert stats.rows_kept == 2


def test_tokenize_sft(tok):
    out, _ = tokenize_sft([SFTExample("hello", " world", 3, "m")], tok)
    assert out[0].prompt_ids == [BOS] + enc("hello")
    assert out[0].completions == [enc(" world") + [EOS]] and out[0].label is None


# --- rendering and audits -------------------------------------------------------------

def test_render_example_marks_masked_and_trained(tok):
    ex = tokenize_pairs([pair("hello", " yes", " no")], tok)[0][0]
    text = render_example(ex, tok)
    assert text.splitlines() == [
        "example 0 (line 1)",
        f"  prompt    (masked, {len(ex.prompt_ids)} tokens): [<bos>hello]",
        f"  chosen    (trained, {len(ex.completions[0])} tokens): « yes<eos>»",
        f"  rejected  (trained, {len(ex.completions[1])} tokens): « no<eos>»",
    ]


def test_audit_special_tokens(tok):
    specials = SpecialTokens.of(tok)
    assert (specials.prefix, specials.suffix) == ((BOS,), ())
    examples = [TokenizedExample([BOS, BOS, 7], [[7, 8], [9, EOS, 9]], 0, 1),
                TokenizedExample([7], [[7, EOS], [8, EOS]], 1, 2),
                TokenizedExample([BOS, 7], [[7, 8], [8, EOS]], 2, 3, truncated=True)]
    found = [(f.kind, f.line, f.field) for f in audit_special_tokens(examples, specials)]
    assert found == [("double_bos", 1, "prompt"), ("missing_eos", 1, "chosen"),
                     ("missing_eos", 1, "rejected"), ("eos_inside", 1, "rejected"),
                     ("missing_bos", 2, "prompt")]


def test_length_stats_and_truncation_report(tok):
    pairs = [pair("hello " * n, " yes " * n, " no") for n in range(1, 21)]
    unlimited = TokenizeSettings(max_length=10**9, max_prompt_length=None)
    examples, _ = tokenize_pairs(pairs, tok, unlimited)
    stats = length_stats(examples)
    prompts = sorted(len(ex.prompt_ids) for ex in examples)
    assert (stats["prompt"].min, stats["prompt"].max) == (prompts[0], prompts[-1])
    assert stats["prompt"].p95 == prompts[18] and stats["rejected"].max == len(enc(" no")) + 1
    assert set(stats) == {"prompt", "chosen", "rejected"}

    report = truncation_report(examples, max_length=30, max_prompt_length=10, bos_id=BOS)
    expected_rows = [tokenize_pairs([p], tok, TokenizeSettings(30, 10))[1] for p in pairs]
    assert report.rows == 20
    assert report.truncated == sum(1 for s in expected_rows if s.truncated_rows) \
        + report.destroyed_total
    assert report.prompt_truncated == sum(len(ex.prompt_ids) > 10 for ex in examples)
    assert report.destroyed_total == sum(s.rows_kept == 0 for s in expected_rows)
