"""Loading sources, detecting formats, converting rows, and the text-level checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefopt.data import (Fields, PreferencePair, Row, check_duplicate_rows,
                          check_empty_fields, check_identical, check_near_duplicates,
                          check_pairs, check_short_answers, detect_format, load_rows,
                          pairs_to_unpaired, split_rows, to_pairs, to_sft, to_unpaired,
                          validate_rows)
from prefopt.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "data"

PAIRS = [
    {"prompt": "Q1", "chosen": " good one", "rejected": " bad one"},
    {"prompt": "Q2", "chosen": " good two", "rejected": " bad two"},
    {"prompt": "Q3", "chosen": " good three", "rejected": " bad three"},
]
CONV = {"prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}]}


def rows_of(*records: dict, source: str = "mem") -> list[Row]:
    """Rows numbered 1.. as if read from a file."""
    return [Row(dict(r), i, source) for i, r in enumerate(records, start=1)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- sources --------------------------------------------------------------------------

def test_jsonl_lines_skip_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n\n  \n" + json.dumps(PAIRS[1]) + "\n",
                    encoding="utf-8")
    rows = load_rows(str(path))
    assert [r.line for r in rows] == [1, 4]
    assert rows[1].data == PAIRS[1] and rows[0].source == str(path)


def test_jsonl_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps(PAIRS[1]) + "\n"
                    + '{"prompt": "x" "chosen": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert err.value.line == 3 and err.value.source == str(path)
    assert "invalid JSON: Expecting ',' delimiter at column 16" in str(err.value)
    assert f"{path}, line 3: " in str(err.value)


def test_jsonl_invalid_utf8_reports_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="invalid UTF-8") as err:
        load_rows(str(path))
    assert err.value.line == 2


def test_jsonl_non_object_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PAIRS[0]) + '\n["a", "b"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON object, got a list") as err:
        load_rows(str(path))
    assert err.value.line == 2


def test_json_list_split_dict_and_columns(tmp_path):
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps(PAIRS), encoding="utf-8")
    rows = load_rows(str(as_list))
    assert [r.line for r in rows] == [1, 2, 3] and rows[2].data == PAIRS[2]

    one_key = tmp_path / "one.json"
    one_key.write_text(json.dumps({"data": PAIRS, "version": 2}), encoding="utf-8")
    assert [r.data for r in load_rows(str(one_key))] == PAIRS

    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": PAIRS[:2], "test": PAIRS[2:]}), encoding="utf-8")
    assert [r.data for r in load_rows(str(splits), split="test")] == PAIRS[2:]
    with pytest.raises(DataError, match="'train', 'test'"):
        load_rows(str(splits), split="validation")

    columns = tmp_path / "cols.json"
    columns.write_text(json.dumps({k: [p[k] for p in PAIRS] for k in PAIRS[0]}),
                       encoding="utf-8")
    assert [r.data for r in load_rows(str(columns))] == PAIRS


def test_json_syntax_error_has_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "a"},\n{"prompt" "b"}\n]', encoding="utf-8")
    with pytest.raises(DataError, match="invalid JSON") as err:
        load_rows(str(path))
    assert err.value.line == 3


def test_csv_lines_and_message_cells(tmp_path):
    path = tmp_path / "d.csv"
    messages = json.dumps(CONV["prompt"])
    path.write_text(
        "prompt,chosen,rejected\n"
        f'"{messages.replace(chr(34), chr(34) * 2)}",yes,no\n'
        '"two\nlines","[1, 2]","not [json"\n'
        "\n"
        "plain,a,b\n", encoding="utf-8")
    rows = load_rows(str(path))
    assert [r.line for r in rows] == [2, 3, 6]
    assert rows[0].data["prompt"] == CONV["prompt"]
    assert rows[1].data == {"prompt": "two\nlines", "chosen": "[1, 2]", "rejected": "not [json"}


def test_csv_wrong_column_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\na,b\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected 3 columns") as err:
        load_rows(str(path))
    assert err.value.line == 3


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([CONV, CONV]), path)
    rows = load_rows(str(path))
    assert [r.line for r in rows] == [1, 2]
    assert rows[0].data == CONV


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    single = tmp_path / "single"
    datasets.Dataset.from_list(PAIRS).save_to_disk(str(single))
    assert [r.data for r in load_rows(str(single))] == PAIRS

    multi = tmp_path / "multi"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS[:2]),
                          "test": datasets.Dataset.from_list(PAIRS[2:])}
                         ).save_to_disk(str(multi))
    rows = load_rows(str(multi), split="test")
    assert [r.data for r in rows] == PAIRS[2:] and rows[0].line == 1
    with pytest.raises(DataError, match="available splits: test, train"):
        load_rows(str(multi), split="validation")


def test_directory_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError, match="not one written by"):
        load_rows(str(tmp_path))


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        load_rows("./some/dir")
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="contains no rows"):
        load_rows(str(empty))


def test_unknown_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(path))


def test_hub_names_go_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        if name == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub")
        return datasets.Dataset.from_list(PAIRS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_rows("org/prefs", split="test")
    assert calls == [("org/prefs", "test")]
    assert [(r.line, r.source) for r in rows] == [(1, "org/prefs"), (2, "org/prefs"),
                                                  (3, "org/prefs")]
    with pytest.raises(DataError, match="could not be loaded from the local cache or the "
                                        "Hugging Face Hub: FileNotFoundError"):
        load_rows("org/missing")


def test_split_rows_is_deterministic_and_ordered():
    rows = rows_of(*[{"prompt": str(i)} for i in range(20)])
    train, evaluation = split_rows(rows, 0.25, seed=3)
    assert len(evaluation) == 5 and len(train) == 15
    assert split_rows(rows, 0.25, seed=3) == (train, evaluation)
    assert [r.line for r in train] == sorted(r.line for r in train)
    assert {r.line for r in train} | {r.line for r in evaluation} == set(range(1, 21))
    assert split_rows(rows, 0.0, seed=3) == (rows, [])
    assert len(split_rows(rows[:2], 0.01, seed=0)[1]) == 1
    with pytest.raises(ConfigError):
        split_rows(rows, 1.0, seed=0)


# --- format detection -----------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    (PAIRS[0], "standard"),
    (CONV, "conversational"),
    ({"prompt": "q", "chosen": CONV["chosen"], "rejected": CONV["rejected"]},
     "conversational"),
    ({"chosen": "The sky is blue", "rejected": "The sky is green"}, "implicit_prompt"),
    ({"chosen": CONV["prompt"] + CONV["chosen"], "rejected": CONV["prompt"] + CONV["rejected"]},
     "implicit_conversational"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
     "hh"),
    ({"prompt": "q", "completion": "a", "label": True}, "unpaired"),
    ({"prompt": "q", "completion": "a"}, "completion"),
    ({"messages": CONV["prompt"] + CONV["chosen"]}, "messages"),
])
def test_detect_format(record, expected):
    assert detect_format(rows_of(record)) == expected


def test_detect_format_skips_null_first_values_and_remaps():
    rows = rows_of({"q": None, "good": "a", "bad": "b"},
                   {"q": CONV["prompt"], "good": CONV["chosen"], "bad": CONV["rejected"]})
    assert detect_format(rows, "q", "good", "bad") == "conversational"
    assert detect_format(rows, fields=Fields(prompt="q", chosen="good", rejected="bad")) \
        == "conversational"


def test_detect_format_unknown_fields_lists_them():
    with pytest.raises(DataError, match="from the fields answer, question"):
        detect_format(rows_of({"question": "q", "answer": "a"}))


# --- conversion to pairs --------------------------------------------------------------

def test_standard_pairs_from_fixture_file():
    rows = load_rows(str(FIXTURES / "standard.jsonl"))
    pairs = to_pairs(rows, detect_format(rows))
    assert len(pairs) == 4
    assert pairs[0] == PreferencePair("What is the capital of France?",
                                      " The capital of France is Paris.",
                                      " The capital of France is London.", 1,
                                      str(FIXTURES / "standard.jsonl"))


def test_field_remapping():
    rows = rows_of({"question": "Q", "good": " yes", "bad": " no", "other": 1})
    pairs = to_pairs(rows, "standard", prompt_field="question", chosen_field="good",
                     rejected_field="bad")
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ("Q", " yes", " no")


def test_conversational_pairs_strip_repeated_prompt_and_wrap_strings():
    rows = rows_of(CONV,
                   {"prompt": "hi", "chosen": CONV["prompt"] + CONV["chosen"],
                    "rejected": CONV["prompt"] + CONV["rejected"]},
                   {"prompt": CONV["prompt"], "chosen": "hello", "rejected": "go away"})
    pairs = to_pairs(rows, detect_format(rows))
    for pair in pairs:
        assert pair.prompt == CONV["prompt"]
        assert pair.chosen == CONV["chosen"] and pair.rejected == CONV["rejected"]


def test_conversational_fixture_file():
    rows = load_rows(str(FIXTURES / "conversational.jsonl"))
    pairs = to_pairs(rows, detect_format(rows))
    assert [m["role"] for m in pairs[1].prompt] == ["system", "user"]


@pytest.mark.parametrize("chosen, rejected, prompt, c_rest, r_rest", [
    ("The capital is Paris", "The capital is London", "The capital is", " Paris", " London"),
    ("I like cats a lot", "I like cattle", "I like", " cats a lot", " cattle"),
    ("Yes. Sure", "Yes, but", "Yes", ". Sure", ", but"),
    ("Answer:\nParis", "Answer:\nLondon", "Answer:", "\nParis", "\nLondon"),
    ("你好世界", "你好朋友", "你好", "世界", "朋友"),
])
def test_implicit_prompt_cuts_at_word_boundary(chosen, rejected, prompt, c_rest, r_rest):
    pair = to_pairs(rows_of({"chosen": chosen, "rejected": rejected}), "implicit_prompt")[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, c_rest, r_rest)
    assert pair.prompt + pair.chosen == chosen and pair.prompt + pair.rejected == rejected


def test_implicit_prompt_without_shared_start_is_an_error():
    with pytest.raises(DataError, match="share no beginning") as err:
        to_pairs(rows_of({"chosen": "It is Paris", "rejected": "It is London"},
                         {"chosen": "Paris", "rejected": "London"}),
                 "implicit_prompt")
    assert err.value.line == 2


def test_implicit_conversational_prefix_by_message():
    user = {"role": "user", "content": "hi"}
    a1 = {"role": "assistant", "content": "hello"}
    u2, u3 = {"role": "user", "content": "joke?"}, {"role": "user", "content": "poem?"}
    a2, a3 = {"role": "assistant", "content": "ha"}, {"role": "assistant", "content": "roses"}
    rows = rows_of({"chosen": [user, a1, u2, a2], "rejected": [user, a1, u2, a3]},
                   {"chosen": [user, a1, u2, a2], "rejected": [user, a1, u3, a3]},
                   {"chosen": [user, a1], "rejected": [user, a1, u2, a2]})
    pairs = to_pairs(rows, detect_format(rows))
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ([user, a1, u2], [a2], [a3])
    # parting at a user turn: the prompt moves back to before the shared assistant reply
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == (
        [user], [a1, u2, a2], [a1, u3, a3])
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == ([user], [a1], [a1, u2, a2])


def test_hh_parsing_from_fixture_file():
    rows = load_rows(str(FIXTURES / "hh.jsonl"))
    assert detect_format(rows) == "hh"
    pairs = to_pairs(rows, "hh")
    assert pairs[0].prompt == "\n\nHuman: What is the capital of France?\n\nAssistant:"
    assert pairs[0].chosen == " Paris is the capital."
    assert pairs[0].rejected == " I don't know."
    assert pairs[1].prompt.endswith("Tell me a joke\n\nAssistant:")
    assert pairs[1].prompt.count("\n\nAssistant:") == 2
    assert (pairs[1].chosen, pairs[1].rejected) == (" Why did the chicken cross the road?",
                                                    " No.")


def test_hh_without_shared_assistant_turn():
    rows = rows_of({"chosen": "\n\nHuman: a\n\nAssistant: b",
                    "rejected": "\n\nHuman: c\n\nAssistant: d"})
    with pytest.raises(DataError, match="share no"):
        to_pairs(rows, "hh")


@pytest.mark.parametrize("record, field, message", [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing (the row has fields: prompt, chosen)"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "chosen", "is null"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", "expected a string, got int"),
    ({"prompt": "q", "chosen": ["x"], "rejected": "b"}, "chosen", "expected a string, got a list"),
    ({"prompt": " \n", "chosen": "a", "rejected": "b"}, "prompt", "is empty"),
])
def test_standard_field_errors_name_line_and_field(record, field, message):
    rows = rows_of(PAIRS[0], PAIRS[1], record, source="f.jsonl")
    with pytest.raises(DataError) as err:
        to_pairs(rows, "standard")
    assert (err.value.source, err.value.line, err.value.field) == ("f.jsonl", 3, field)
    assert str(err.value) == f"f.jsonl, line 3, field '{field}': {message}"


@pytest.mark.parametrize("chosen, message", [
    ([{"role": "assistant"}], "message 1: missing 'content'"),
    ([{"role": "assistant", "content": None}], "message 1: 'content' must be a string, got null"),
    (["hello"], "message 1: expected an object with 'role' and 'content', got str"),
    ([], "is an empty list of messages"),
    ([{"role": "assistant", "content": "  "}], "every message is empty"),
])
def test_message_field_errors(chosen, message):
    rows = rows_of({**CONV, "chosen": chosen})
    with pytest.raises(DataError, match="field 'chosen': " + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        to_pairs(rows, "conversational")


def test_validate_rows_collects_every_problem():
    rows = rows_of(PAIRS[0], {"prompt": "", "chosen": None, "rejected": "x"}, PAIRS[1],
                   {"prompt": "q", "chosen": 1, "rejected": "y"})
    problems = validate_rows(rows, "standard")
    assert [(p.line, p.field) for p in problems] == [(2, "prompt"), (2, "chosen"), (4, "chosen")]
    implicit = rows_of({"chosen": "same start a", "rejected": "same start b"},
                       {"chosen": "Paris", "rejected": "London"})
    assert [p.line for p in validate_rows(implicit, "implicit_prompt")] == [2]
    assert validate_rows(rows_of(PAIRS[0]), "standard") == []


def test_to_pairs_rejects_non_preference_data():
    with pytest.raises(DataError, match="not preference pairs"):
        to_pairs(rows_of({"prompt": "q", "completion": "a"}), "completion")


# --- unpaired (KTO) and SFT -----------------------------------------------------------

def test_unpaired_rows_and_csv_labels(tmp_path):
    rows = load_rows(str(FIXTURES / "unpaired.jsonl"))
    assert detect_format(rows) == "unpaired"
    examples = to_unpaired(rows)
    assert [(e.completion, e.label) for e in examples] == [(" 4", True), (" 5", False),
                                                           (" Hello!", True)]
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\nq,a,true\nq,b,False\nq,c,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected true or false, got '1'") as err:
        to_unpaired(load_rows(str(path)))
    assert (err.value.line, err.value.field) == (4, "label")
    assert [e.label for e in to_unpaired(load_rows(str(path))[:2])] == [True, False]


def test_pairs_to_unpaired():
    pairs = to_pairs(rows_of(*PAIRS[:2]), "standard")
    examples = pairs_to_unpaired(pairs)
    assert [(e.prompt, e.completion, e.label, e.line) for e in examples] == [
        ("Q1", " good one", True, 1), ("Q1", " bad one", False, 1),
        ("Q2", " good two", True, 2), ("Q2", " bad two", False, 2)]


def test_sft_from_preference_completion_and_messages():
    sft = to_sft(rows_of(*PAIRS[:1]), "standard")
    assert (sft[0].prompt, sft[0].completion) == ("Q1", " good one")

    sft = to_sft(rows_of({"prompt": "q", "completion": " a"}), "completion")
    assert (sft[0].prompt, sft[0].completion, sft[0].line) == ("q", " a", 1)

    system = {"role": "system", "content": "be nice"}
    user = {"role": "user", "content": "hi"}
    a1, a2 = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "bye"}
    sft = to_sft(rows_of({"messages": [system, user, a1, user, a2, user]}), "messages")
    assert sft[0].prompt == [system, user, a1, user] and sft[0].completion == [a2]

    with pytest.raises(DataError, match="no assistant message"):
        to_sft(rows_of({"messages": [user]}), "messages")

    kto = rows_of({"prompt": "q", "completion": "good", "label": True},
                  {"prompt": "q", "completion": "bad", "label": False})
    assert [e.completion for e in to_sft(kto, "unpaired")] == ["good"]


# --- text checks ----------------------------------------------------------------------

def test_text_checks():
    pairs = [
        PreferencePair("Q", " A reasonable answer here.", " A reasonable answer here!", 1, "m"),
        PreferencePair("Q", " the same answer here", " the same answer here", 2, "m"),
        PreferencePair("Q", " ok", " A long and detailed reply.", 3, "m"),
        PreferencePair("Q", " A reasonable answer here.", " A reasonable answer here!", 4, "m"),
        PreferencePair("Q", "   ", " fine answer text", 5, "m"),
        PreferencePair("Q", " The answer is 4.", " The answer is 5, sorry.", 6, "m"),
    ]
    assert [(f.line, f.field) for f in check_near_duplicates(pairs)] == [(1, "rejected"),
                                                                        (4, "rejected")]
    assert [f.line for f in check_identical(pairs)] == [2]
    assert [(f.line, f.field) for f in check_short_answers(pairs)] == [(3, "chosen")]
    assert [(f.line, f.message) for f in check_duplicate_rows(pairs)] == [
        (4, "same prompt, chosen and rejected as line 1")]
    assert [(f.line, f.field) for f in check_empty_fields(pairs)] == [(5, "chosen")]
    kinds = [(f.line, f.kind) for f in check_pairs(pairs)]
    assert kinds[0] == (1, "near_duplicate") and (6, "short") not in kinds
    assert check_near_duplicates(pairs, threshold=0.999) == []


def test_checks_on_conversations():
    empty_msg = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": " "}]
    pairs = [PreferencePair(CONV["prompt"], CONV["chosen"], CONV["chosen"], 1, "m"),
             PreferencePair(CONV["prompt"], empty_msg, CONV["rejected"], 2, "m")]
    assert [f.line for f in check_identical(pairs)] == [1]
    assert [(f.line, f.message) for f in check_empty_fields(pairs)] == [
        (2, "message 2 (user) is empty")]
