"""`prefopt data check`: every known problem of tests/malformed/problems.jsonl is found on
its line, the numbers agree with what training's tokenization does, and exit statuses
are 0 (clean), 1 (problems) and 2 (user error)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import corpus, write_jsonl
from prefopt import cli
from prefopt.commands.data_check import check_file, scan_jsonl
from prefopt.data import TokenizeSettings, detect_format, load_rows, to_pairs, tokenize_pairs
from prefopt.data.tokenize import DROP_IDENTICAL
from prefopt.errors import DataError

os.environ["HF_HUB_OFFLINE"] = "1"
MALFORMED = Path(__file__).resolve().parent / "malformed"
PROBLEMS = MALFORMED / "problems.jsonl"
LIMITS = ["--max-length", "14", "--max-prompt-length", "8"]

# (line, kind, field) of every problem planted in problems.jsonl; nothing else may be reported.
EXPECTED = {
    (2, "schema", None),                       # invalid JSON
    (4, "schema", "rejected"),                 # missing field
    (5, "schema", "chosen"),                   # null
    (6, "schema", "chosen"),                   # a number instead of text
    (7, "empty", "chosen"),                    # whitespace only
    (8, "identical", "rejected"),              # chosen == rejected
    (9, "near_duplicate", "rejected"),         # "...clear." vs "...clear!"
    (9, "destroyed_by_truncation", None),      # ... and identical once cut to 14 tokens
    (10, "short", "chosen"),                   # " ok"
    (11, "duplicate", None),                   # repeats line 1
    (12, "schema", None),                      # invalid UTF-8
    (13, "schema", None),                      # a list, not an object
    (15, "double_bos", "prompt"),              # the prompt text starts with <bos><bos>
    (16, "eos_inside", "chosen"),              # <eos> in the middle of the answer
    (18, "destroyed_by_truncation", None),     # long shared start: identical after truncation
    (20, "identical_tokens", "rejected"),      # " ...day<eos>" vs " ...day": same ids once EOS is added
}


@pytest.fixture(scope="module")
def merging_tokenizer(tmp_path_factory):
    """A BPE with whole-word tokens, so a prompt ending mid-word merges with its completion."""
    from prefopt.tiny import train_tokenizer

    tok = train_tokenizer(corpus(), vocab_size=400)
    path = tmp_path_factory.mktemp("tok400")
    tok.save_pretrained(path)
    return path


def _json(argv: list[str], capsys) -> tuple[int, dict]:
    code = cli.main([*argv, "--format", "json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_every_planted_problem_is_found_on_its_line(merging_tokenizer, capsys):
    code, report = _json(["data", "check", str(PROBLEMS), "--tokenizer", str(merging_tokenizer), *LIMITS], capsys)
    assert code == 1 and not report["clean"]
    found = {(p["line"], p["kind"], p["field"]) for p in report["problems"]}
    assert found == EXPECTED
    by_line = {p["line"]: p for p in report["problems"] if p["kind"] == "schema"}
    assert by_line[2]["message"].startswith("invalid JSON")
    assert by_line[4]["message"].startswith("missing")
    assert by_line[5]["message"] == "is null"
    assert by_line[6]["message"] == "expected a string, got int"
    assert by_line[12]["message"].startswith("invalid UTF-8")
    assert by_line[13]["message"].startswith("expected a JSON object, got a list")
    assert report["rows_read"] == 20 and report["pairs"] == 13  # line 14 is blank
    assert report["errors"] == 14 and report["warnings"] == 2

    assert report["boundary_merges"] == {"count": 1, "lines": [19]}
    t = report["truncation"]
    assert t["truncated_lines"] == [17] and t["destroyed"] == {"chosen==rejected after truncation": 2}
    assert t["prompt_truncated"] == 1 and t["truncated"] == 3
    assert set(report["lengths"]) == {"prompt", "chosen", "rejected"}
    assert report["lengths"]["prompt"]["max"] > 8  # line 17's prompt, before truncation
    assert report["tokenizer"]["adds_bos"] and report["tokenizer"]["bos"] == "<bos>"


def test_numbers_agree_with_training_tokenization(merging_tokenizer):
    """Truncation and drop counts are those tokenize_pairs gives with the same limits."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merging_tokenizer)
    report = check_file(str(PROBLEMS), tokenizer=tok, max_length=14, max_prompt_length=8)
    rows = [r for r in scan_jsonl(PROBLEMS)[0] if r.line not in {4, 5, 6, 7}]
    pairs = to_pairs(rows, detect_format(rows))
    examples, stats = tokenize_pairs(pairs, tok, TokenizeSettings(max_length=14, max_prompt_length=8))
    t = report["truncation"]
    destroyed = {k: v for k, v in stats.dropped.items() if k != DROP_IDENTICAL}
    assert t["destroyed"] == destroyed and stats.dropped[DROP_IDENTICAL] == 2  # lines 8 and 20
    assert t["truncated"] - t["destroyed_total"] == stats.truncated_rows
    assert stats.boundary_merges == report["boundary_merges"]["count"]
    # the rendered example is exactly the training example of its line
    ex = report["example"]
    train_ex = next(e for e in examples if e.line == ex["line"])
    ids = {s["part"]: s["ids"] for s in ex["segments"]}
    assert ids == {"prompt": train_ex.prompt_ids, "chosen": train_ex.completions[0],
                   "rejected": train_ex.completions[1]}


def test_rendered_example_marks_trained_tokens(merging_tokenizer, capsys):
    code, report = _json(["data", "check", str(PROBLEMS), "--tokenizer", str(merging_tokenizer), *LIMITS,
                          "--example-line", "17"], capsys)
    ex = report["example"]
    assert ex["line"] == 17 and ex["truncated"]
    assert [(s["part"], s["trained"]) for s in ex["segments"]] == [("prompt", False), ("chosen", True),
                                                                  ("rejected", True)]
    prompt = ex["segments"][0]
    assert len(prompt["ids"]) == 8 and prompt["tokens"][0] == "<bos>"  # BOS kept, the prompt's end kept
    assert prompt["tokens"][-1].endswith(":")
    assert "prompt    (masked, 8 tokens): [<bos>" in ex["rendered"]
    assert "chosen    (trained, 4 tokens): « calm and happy<eos>»" in ex["rendered"]

    assert cli.main(["data", "check", str(PROBLEMS), "--tokenizer", str(merging_tokenizer), *LIMITS]) == 1
    table = capsys.readouterr().out
    assert "«...» = completion, trained" in table and "« sunny and warm<eos>»" in table
    assert "Problems" in table and "14 error(s), 2 warning(s)" in table
    assert "boundary merges: 1 rows (lines 19)" in table


def test_all_bad_jsonl_lines_are_listed_and_match_the_loader(tmp_path):
    good = '{"prompt": "p", "chosen": " a", "rejected": " b"}'
    lines = [good, "{bad", good, "", b'{"prompt": "\xc3"}', "[]", good, '{"x": 1,}']
    path = tmp_path / "many.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    rows, errors, records = scan_jsonl(path)
    assert [e.line for e in errors] == [2, 5, 6, 8] and [r.line for r in rows] == [1, 3, 7] and records == 7
    # each kind of bad line is reported word for word as the loader reports it when it comes first
    for index, line in enumerate([2, 5, 6, 8]):
        single = tmp_path / f"one{index}.jsonl"
        single.write_bytes(b"\n".join([good.encode(), b"", path.read_bytes().split(b"\n")[line - 1]]))
        with pytest.raises(DataError) as info:
            load_rows(str(single))
        assert str(info.value) == str(scan_jsonl(single)[1][0])
        assert info.value.line == 3


def test_clean_file_exits_0(pref_files, tiny_model_dir, capsys):
    code, report = _json(["data", "check", str(pref_files[1]), "--model", str(tiny_model_dir)], capsys)
    assert code == 0 and report["clean"] and report["errors"] == 0
    assert report["truncation"]["truncated"] == 0 and report["example"]["line"] == 1
    assert cli.main(["data", "check", str(pref_files[1])]) == 0
    out = capsys.readouterr().out
    assert "token checks skipped" in out and "clean" in out


def test_model_reports_its_fast_paths(pref_files, tiny_model_dir, capsys, cache_dir):
    code, report = _json(["data", "check", str(pref_files[1]), "--model", str(tiny_model_dir)], capsys)
    fast = report["fast_paths"]
    assert code == 0 and fast["architecture"] == "LlamaForCausalLM" and fast["off"] == {}
    assert "block attention" in fast["on"] and "prefix sharing" in fast["on"]
    assert cli.main(["data", "check", str(pref_files[1]), "--model", str(tiny_model_dir)]) == 0
    assert "fast paths for LlamaForCausalLM (float32)" in capsys.readouterr().out


def test_without_a_tokenizer_text_checks_still_run(capsys):
    code, report = _json(["data", "check", str(PROBLEMS)], capsys)
    assert code == 1 and report["tokenizer"] is None and "truncation" not in report
    kinds = {(p["line"], p["kind"]) for p in report["problems"]}
    assert {(2, "schema"), (8, "identical"), (9, "near_duplicate"), (11, "duplicate"), (10, "short")} <= kinds
    assert not any(k in {"double_bos", "destroyed_by_truncation"} for _, k in kinds)


def test_field_remapping(tmp_path, capsys):
    rows = [{"q": "the sky was:", "good": " sunny and warm", "bad": " stormy and cold"},
            {"q": "the town:", "good": " happy and bright", "bad": " happy and bright"}]
    path = write_jsonl(rows, tmp_path / "remapped.jsonl")
    code, report = _json(["data", "check", str(path), "--prompt-field", "q", "--chosen-field", "good",
                          "--rejected-field", "bad"], capsys)
    assert code == 1 and [(p["line"], p["kind"]) for p in report["problems"]] == [(2, "identical")]
    assert cli.main(["data", "check", str(path)]) == 2
    assert "cannot tell the data format" in capsys.readouterr().err


def test_other_file_formats_report_their_first_problem(capsys):
    code, report = _json(["data", "check", str(MALFORMED / "bad_columns.csv")], capsys)
    assert code == 1 and [(p["line"], p["kind"]) for p in report["problems"]] == [(3, "schema")]
    assert "expected 3 columns" in report["problems"][0]["message"]
    code, report = _json(["data", "check", str(MALFORMED / "empty.jsonl")], capsys)
    assert code == 1 and report["rows_read"] == 0 and report["problems"][0]["message"] == "contains no rows"


def test_conversational_data_is_rendered_through_the_chat_template(tiny_model_dir, capsys):
    data = Path(__file__).resolve().parent / "data" / "conversational.jsonl"
    code, report = _json(["data", "check", str(data), "--model", str(tiny_model_dir)], capsys)
    assert report["format"] == "conversational"
    prompt, chosen, _ = report["example"]["segments"]
    assert "".join(prompt["tokens"]).endswith("<|assistant|>") and not prompt["trained"]
    assert "".join(chosen["tokens"]).endswith("<eos>") and chosen["trained"]
    assert not {p["kind"] for p in report["problems"]} & {"double_bos", "missing_bos", "missing_eos"}
