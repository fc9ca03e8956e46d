"""Multi-turn and tool data: richer messages, tools and template variables, every assistant turn trained.

Expected ids are built independently of the code under test: the conversation is cut into
pieces at the template's special tokens (which every tokenizer here splits on), each piece is
encoded on its own and marked trained or masked by hand.
"""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import BAD, FILLER, GOOD, write_jsonl
from test_sampling import qwen_like
from test_tokenize import BOS, enc, make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.batching import collate, split_rows
from prefopt.config import TrainConfig
from prefopt.data import (PreferencePair, Row, SpecialTokens, TokenizeSettings, audit_special_tokens, render_example,
                          to_pairs, to_ranked, to_sft, tokenize_pairs, validate_rows)
from prefopt.data.tokenize import TokenizedExample, truncate_example
from prefopt.errors import DataError
from prefopt.scoring import score_file
from prefopt.train import train

TURNS = TokenizeSettings(all_assistant_turns=True)


def rows_of(*data: dict, source: str = "mt.jsonl") -> list[Row]:
    return [Row(d, line=i + 1, source=source) for i, d in enumerate(data)]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------- messages

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}
TOOL_TURNS = [{"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "content": "sunny", "name": "get_weather", "tool_call_id": "c1"},
              assistant("yes")]

#: prints what it is given: the tools, the enable_thinking switch, each message's name, tool call id and calls
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>tools={{ tools|length }}:{% for t in tools %}{{ t.function.name }};{% endfor %}<eos>"
    "{% endif %}{% if enable_thinking is defined and not enable_thinking %}<|system|>no think<eos>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m.name %}({{ m.name }}){% endif %}"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}{{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}call {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
    "<eos>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tool_calls_name_and_tool_call_id_reach_the_template():
    data = rows_of({"chosen": [user("what is the weather"), *TOOL_TURNS],
                    "rejected": [user("what is the weather"), assistant("no")]})
    pair = to_pairs(data, "implicit_conversational")[0]
    assert pair.prompt == [user("what is the weather")]
    # null content becomes "" (templates that trim content fail on null); absent keys stay absent
    assert pair.chosen[0] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert pair.chosen[1] == {"role": "tool", "content": "sunny", "name": "get_weather", "tool_call_id": "c1"}
    tok = make_tokenizer(template=TOOLS_TEMPLATE)
    ex = tokenize_pairs([pair], tok)[0][0]
    assert tok.decode(ex.completions[0], skip_special_tokens=False) == (
        "call get_weather paris<eos><|tool|>(get_weather)[c1]sunny<eos><|assistant|>yes<eos>")


def test_arrow_nulls_are_dropped_and_text_parts_are_joined():
    parquet_like = [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}],
                     "tool_calls": None, "name": None, "tool_call_id": None},
                    {"role": "assistant", "content": "yes", "tool_calls": None, "name": None, "tool_call_id": None}]
    pair = to_pairs(rows_of({"prompt": parquet_like[:1], "chosen": parquet_like[1:], "rejected": [assistant("no")]}),
                    "conversational")[0]
    assert pair.prompt == [user("hello\nworld")] and pair.chosen == [assistant("yes")]
    # the repeated prompt is still recognised and removed from a full conversation given as the answer
    pair = to_pairs(rows_of({"prompt": parquet_like[:1], "chosen": parquet_like, "rejected": [assistant("no")]}),
                    "conversational")[0]
    assert pair.chosen == [assistant("yes")]


@pytest.mark.parametrize("part, kind", [({"type": "image", "url": "x.png"}, "an 'image'"),
                                        ({"type": "image_url", "image_url": {"url": "x"}}, "an 'image_url'"),
                                        ({"type": "input_audio", "input_audio": {}}, "an 'input_audio'"),
                                        ({"type": "video"}, "a 'video'")])
def test_non_text_parts_are_refused_with_file_line_field_and_message(part, kind):
    bad = {"prompt": [user("hi")], "chosen": [assistant("a"), {"role": "user", "content": [
        {"type": "text", "text": "look"}, part]}, assistant("b")], "rejected": [assistant("c")]}
    data = rows_of({"prompt": "q", "chosen": "a", "rejected": "b"}, bad)
    with pytest.raises(DataError) as err:
        to_pairs(data, "conversational")
    assert str(err.value) == f"mt.jsonl, line 2, field 'chosen': prefopt is text-only: message 2 has {kind} part"
    assert [e.line for e in validate_rows(data, "conversational")] == [2]


@pytest.mark.parametrize("message, problem", [
    ({"role": "assistant", "content": None}, "message 1: 'content' must be a string, got null"),
    ({"role": "assistant", "content": None, "tool_calls": "x"},
     "message 1: 'tool_calls' must be a list of objects, got str"),
    ({"role": "tool", "content": "x", "tool_call_id": 3}, "message 1: 'tool_call_id' must be a string, got int"),
    ({"role": "user", "content": [{"text": "x"}]},
     "message 1: content part 1 must be an object with a 'type', got dict"),
    ({"role": "user", "content": [{"type": "text"}]}, "message 1: text part 1 has no string 'text'"),
    ({"role": "user", "content": {"type": "text", "text": "x"}},
     "message 1: 'content' must be a string or a list of text parts, got dict"),
])
def test_message_problems(message, problem):
    with pytest.raises(DataError, match="field 'chosen': " + problem.replace("(", r"\(").replace(")", r"\)")):
        to_pairs(rows_of({"prompt": [user("q")], "chosen": [message], "rejected": [assistant("b")]}), "conversational")


# ---------------------------------------------------------------------------- tools and chat_template_kwargs


def test_tools_and_chat_template_kwargs_reach_apply_chat_template():
    tok = make_tokenizer(template=TOOLS_TEMPLATE)
    row = {"prompt": [user("hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")],
           "tools": [TOOL, {"type": "function", "function": {"name": "search"}}],
           "chat_template_kwargs": {"enable_thinking": False}}
    pair = to_pairs(rows_of(row), "conversational")[0]
    assert pair.tools == row["tools"] and pair.chat_template_kwargs == {"enable_thinking": False}
    ex = tokenize_pairs([pair], tok)[0][0]
    assert ex.prompt_ids == [BOS] + enc("<|system|>tools=2:get_weather;search;<eos><|system|>no think<eos>"
                                        "<|user|>hi<eos><|assistant|>")
    # JSON text (CSV cells, Arrow tables of mixed schemas) is read too; the derived examples keep both
    as_text = {**row, "tools": json.dumps(row["tools"]), "chat_template_kwargs": '{"enable_thinking": true}'}
    sft = to_sft(rows_of(as_text), "conversational")[0]
    assert sft.tools == row["tools"] and sft.chat_template_kwargs == {"enable_thinking": True}
    plain = tokenize_pairs(to_pairs(rows_of({**row, "tools": [], "chat_template_kwargs": None}), "conversational"),
                           tok)[0][0]
    assert plain.prompt_ids == [BOS] + enc("<|user|>hi<eos><|assistant|>")


def test_ranked_rows_carry_tools_and_kwargs():
    row = {"prompt": [user("hi")], "completions": ["yes", "no"], "scores": [1, 0], "tools": [TOOL],
           "chat_template_kwargs": {"enable_thinking": False}}
    ranked = to_ranked(rows_of(row), "ranked")[0]
    assert ranked.tools == [TOOL] and ranked.chat_template_kwargs == {"enable_thinking": False}


@pytest.mark.parametrize("extra, field, problem", [
    ({"tools": {"name": "x"}}, "tools", "expected a list of tool JSON schemas, got dict"),
    ({"tools": ["get_weather"]}, "tools", "tool 1: expected a JSON schema object, got str"),
    ({"tools": "[not json"}, "tools", "is text that is not valid JSON"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs",
     "expected an object of chat-template variables, got list"),
    ({"chat_template_kwargs": {"add_generation_prompt": True}}, "chat_template_kwargs",
     "'add_generation_prompt' is set by prefopt"),
])
def test_tools_and_kwargs_are_validated(extra, field, problem):
    data = rows_of({"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")], **extra})
    with pytest.raises(DataError) as err:
        to_pairs(data, "conversational")
    assert (err.value.source, err.value.line, err.value.field) == ("mt.jsonl", 1, field)
    assert problem in err.value.bare_message


def test_tools_on_plain_text_rows_are_refused():
    with pytest.raises(DataError, match="line 1, field 'tools': only conversations are rendered"):
        to_pairs(rows_of({"prompt": "q", "chosen": "a", "rejected": "b", "tools": [TOOL]}), "standard")


# ---------------------------------------------------------------------------- every assistant turn


def pieces_qwen(turns: list[tuple[str, str]]) -> tuple[list[int], list[bool]]:
    """Completion ids and mask of a Qwen-style rendering, piece by piece: after the prompt's
    ``<|im_start|>assistant\\n``, each assistant turn is trained with its ``<|im_end|>``; the newline
    after it, every other turn and the next assistant header are masked."""
    tok = qwen_like("<|im_end|>")
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])

    def text(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    ids: list[int] = []
    mask: list[bool] = []

    def add(part: list[int], trained: bool) -> None:
        ids.extend(part)
        mask.extend([trained] * len(part))

    for k, (role, content) in enumerate(turns):
        if k:
            add(text("\n") + [start], False)
        if role != "assistant":
            add(text(f"{role}\n{content}") + [end], False)
            continue
        if k:
            add(text("assistant\n"), False)
        add(text(content) + [end], True)
    return ids, mask


def test_every_assistant_turn_is_trained_and_the_turns_between_are_masked():
    tok = qwen_like("<|im_end|>")
    chosen = [assistant("yes"), user("what is the capital"), assistant("paris"),
              {"role": "tool", "content": "london", "tool_call_id": "c1"}, assistant("sure the answer is paris")]
    rejected = [assistant("no"), user("what is the capital"), assistant("london")]
    pair = PreferencePair([user("hello")], chosen, rejected, 1, "m")
    ex = tokenize_pairs([pair], tok, TURNS)[0][0]
    want = [pieces_qwen([(m["role"], m["content"]) for m in conv]) for conv in (chosen, rejected)]
    assert ex.completions == [ids for ids, _ in want]
    assert ex.completion_masks == [mask for _, mask in want]
    scored = [[t for t, keep in zip(*w) if keep] for w in want]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert scored[1] == tok("no", add_special_tokens=False)["input_ids"] + [end] + \
        tok("london", add_special_tokens=False)["input_ids"] + [end]
    # off (the default), the same pair trains on the whole completions, as before
    plain = tokenize_pairs([pair], tok)[0][0]
    assert plain.completions == ex.completions and plain.completion_masks is None
    text = render_example(ex, tok)
    assert "chosen    (trained, " in text and "«yes<|im_end|>[\n<|im_start|>user\nwhat is the capital" in text
    assert "]paris<|im_end|>[" in text and text.endswith("]london<|im_end|>»")
    assert audit_special_tokens([ex], SpecialTokens.of(tok)) == []   # each turn's end is where it belongs


def test_trailing_user_turn_is_dropped_and_truncation_cuts_masks():
    tok = make_tokenizer()
    chosen = [assistant("yes"), user("the cat"), assistant("no"), user("please")]
    pair = PreferencePair([user("hello")], chosen, [assistant("sure")], 1, "m")
    ex = tokenize_pairs([pair], tok, TURNS)[0][0]
    first, middle, last = enc("yes<eos>"), enc("<|user|>the cat<eos><|assistant|>"), enc("no<eos>")
    assert ex.completions[0] == first + middle + last          # the trailing user turn is gone
    assert ex.completion_masks[0] == [True] * len(first) + [False] * len(middle) + [True] * len(last)
    assert ex.completion_masks[1] == [True] * len(ex.completions[1])
    cut = truncate_example(ex, len(ex.prompt_ids) + len(first) + 2, None, BOS)
    assert cut.truncated and cut.completions[0] == (first + middle)[:len(first) + 2]
    assert cut.completion_masks[0] == [True] * len(first) + [False, False]
    # a completion whose trained turns all fall beyond the limit is dropped (a template whose generation
    # prompt writes no header, so a completion may start with a user turn)
    tok = make_tokenizer(template="{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}")
    late = PreferencePair([user("hello")], [user("the cat"), assistant("no")], [assistant("yes")], 2, "m")
    whole = tokenize_pairs([late], tok, TURNS)[0][0]
    assert whole.completion_masks[0] == [False] * len(enc("<|user|>the cat<eos>")) + [True] * len(
        enc("<|assistant|>no<eos>"))
    limit = TokenizeSettings(max_length=len(whole.prompt_ids) + 2, max_prompt_length=None, all_assistant_turns=True)
    examples, stats = tokenize_pairs([late], tok, limit)
    assert examples == [] and stats.dropped == {"no trained token left": 1}


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # like templates that drop an earlier turn's reasoning: the last assistant turn renders differently
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if loop.last and m['role'] == 'assistant' %}"
                "<|system|>{% endif %}{{ m['content'] }}<eos>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = make_tokenizer(template=template)
    pair = PreferencePair([user("hello")], [assistant("yes"), user("the cat"), assistant("no")], [assistant("sure")],
                          4, "f.jsonl")
    with pytest.raises(DataError, match="f.jsonl, line 4: --all-assistant-turns: the chat template renders"):
        tokenize_pairs([pair], tok, TURNS)
    assert tokenize_pairs([pair], tok)[0]   # whole completions still work


# ---------------------------------------------------------------------------- batching


def masked_examples() -> list[TokenizedExample]:
    return [TokenizedExample([1, 2], [[10, 11, 12, 13], [20, 21]], 0, 1,
                             completion_masks=[[True, False, False, True], [True, True]]),
            TokenizedExample([3], [[30, 31, 32], [40]], 1, 2),
            TokenizedExample([1, 2], [[10, 11, 12, 13], [20, 21]], 2, 3,     # same ids, another mask
                             completion_masks=[[True, True, False, True], [True, True]])]


@pytest.mark.parametrize("layout", [dict(), dict(prefix_sharing=False), dict(packing=False), dict(plain=True),
                                    dict(group_prompts=False)])
def test_collate_emits_gather_entries_for_scored_tokens_only(layout):
    examples = masked_examples()
    batch = collate(examples, pad_token_id=0, **layout)
    flat = batch.input_ids.reshape(-1)
    got = {}
    for h, t, s, p in zip(batch.hidden_index.tolist(), batch.target_ids.tolist(), batch.token_seq.tolist(),
                          batch.token_pos.tolist()):
        got.setdefault(s, []).append((p, t, int(flat[h])))
    # per sequence: the scored tokens, numbered among themselves, each predicted by the token before it
    assert got == {0: [(0, 10, 2), (1, 13, 12)], 1: [(0, 20, 2), (1, 21, 20)],
                   2: [(0, 30, 3), (1, 31, 30), (2, 32, 31)], 3: [(0, 40, 3)],
                   4: [(0, 10, 2), (1, 11, 10), (2, 13, 12)], 5: [(0, 20, 2), (1, 21, 20)]}
    parts = split_rows(batch)
    assert sorted(t for part in parts for t in part.target_ids.tolist()) == sorted(batch.target_ids.tolist())


def test_data_check_shows_the_masked_turns(tiny_tokenizer, tmp_path):
    from prefopt.commands.data_check import check_file

    path = write_jsonl(conversation_rows(3, seed=4), tmp_path / "conv.jsonl")
    report = check_file(str(path), tokenizer=tiny_tokenizer, all_assistant_turns=True)
    assert report["format"] == "implicit_conversational"
    assert not {p["kind"] for p in report["problems"]} & {"eos_inside", "missing_eos", "destroyed_by_truncation"}
    chosen = report["example"]["rendered"].splitlines()[2]
    assert chosen.startswith("  chosen    (trained, ") and " of " in chosen
    assert "<eos>[<|user|>" in chosen and "<eos><|assistant|>]" in chosen and "[<|tool|>" in chosen
    segment = report["example"]["segments"][1]
    assert len(segment["trained_tokens"]) == len(segment["ids"]) and not all(segment["trained_tokens"])
    whole = check_file(str(path), tokenizer=tiny_tokenizer)   # off: nothing masked, EOS inside is flagged
    assert "[" not in whole["example"]["rendered"].splitlines()[2]
    assert "trained_tokens" not in whole["example"]["segments"][1]
    assert "eos_inside" in {p["kind"] for p in whole["problems"]}


# ---------------------------------------------------------------------------- end to end


def conversation_rows(n: int, seed: int) -> list[dict]:
    """Pairs of 3-assistant-turn conversations that part at the first reply; user and tool turns between."""
    rng = random.Random(seed)

    def words(pool, k):
        return " ".join(rng.choice(pool) for _ in range(k))

    rows = []
    for _ in range(n):
        first = [{"role": "user", "content": words(FILLER, rng.randint(3, 6))}]
        middle = [words(FILLER, rng.randint(2, 4)) for _ in range(2)]

        def conv(pool):
            return first + [assistant(words(pool, rng.randint(2, 4))), user(middle[0]),
                            assistant(words(pool, rng.randint(2, 3))),
                            {"role": "tool", "content": middle[1], "tool_call_id": "t1"},
                            assistant(words(pool, rng.randint(1, 3)))]

        rows.append({"chosen": conv(GOOD), "rejected": conv(BAD)})
    return rows


def plain_turn_logps(model, tok, conversation: list[dict]) -> float:
    """Sum over the assistant turns of log p(turn | everything before it), from the
    model's own forward over the whole conversation, laid out piece by piece by hand (tiny template:
    ``<bos>``, then ``<|role|>content<eos>`` per message)."""
    ids, trained = [tok.bos_token_id], [False]
    for m in conversation:
        marker = tok(f"<|{m['role']}|>", add_special_tokens=False)["input_ids"]
        content = tok(m["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += marker + content
        trained += [False] * len(marker) + [m["role"] == "assistant"] * len(content)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if trained[t])


def test_training_on_every_assistant_turn_matches_a_plain_per_turn_computation(tiny_model_dir, tmp_path, cache_dir):
    path = write_jsonl(conversation_rows(8, seed=3), tmp_path / "conv.jsonl")
    out = tmp_path / "run"
    cfg = dict(model=str(tiny_model_dir), data=str(path), batch_size=8, learning_rate=5e-3, lr_scheduler="constant",
               progress=False, logging_steps=1, all_assistant_turns=True)
    train(TrainConfig(output_dir=str(out), max_steps=3, **cfg))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    first = metrics[0]   # the first step's forward runs on the starting weights, over every row
    want = sum(plain_turn_logps(start, tok, r["chosen"]) for r in rows) / len(rows)
    assert first["logps/chosen"] == pytest.approx(want, abs=1e-3)

    # the trained policy, scored per example, against the same computation on its weights
    scored = score_file(TrainConfig(model=str(out / "final"), ref_model=str(tiny_model_dir), data=str(path),
                                    all_assistant_turns=True, progress=False))
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    for row in scored["per_example"]:
        conv = rows[row["line"] - 1]
        assert row["policy_chosen_logps"] == pytest.approx(plain_turn_logps(final, tok, conv["chosen"]), abs=1e-3)
        assert row["policy_rejected_logps"] == pytest.approx(plain_turn_logps(final, tok, conv["rejected"]), abs=1e-3)
        assert row["ref_chosen_logps"] == pytest.approx(plain_turn_logps(start, tok, conv["chosen"]), abs=1e-3)
    whole = score_file(TrainConfig(model=str(out / "final"), data=str(path), progress=False))
    assert whole["logps/chosen"] < scored["logps/chosen"]   # off: the user and tool turns are scored too
