"""The malformed-input corpus: one Case per bad data file, bad option or bad model.

Every case is run twice by tests/test_errors.py: the command's own function must raise
``error`` (the library call), and ``prefopt ARGV`` through the CLI must exit with status 2,
print no traceback, and say each of ``expect`` on stderr (the file, line and field, or
the option and its allowed values).

``argv`` placeholders: {M} a good tiny model, {D} a good data file, {O} an output
directory, {X} this folder (the static bad files), {W} a scratch folder that ``setup``
fills (corrupt model copies, occupied output directories).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prefopt.errors import CheckpointError, ConfigError, DataError, ModelError

TRAIN = ["train", "--model", "{M}", "--output-dir", "{O}", "--no-progress", "--max-steps", "1"]


@dataclass
class Context:
    """What setups build from: the good tiny model, and a finished 1-step run (made on first use)."""

    model: Path
    finished_run: Callable[[], Path]


@dataclass
class Case:
    id: str
    argv: list[str]
    error: type[BaseException]
    expect: tuple[str, ...]
    setup: Callable[[Path, "Context"], None] | None = None
    must_not_exist: str | None = None  # what only unsafe code would create ({W}-relative)


def data(name: str, *extra: str) -> list[str]:
    return [*TRAIN, "--data", "{X}/" + name, *extra]


# ---------------------------------------------------------------------------- model setups


def _copy(work: Path, ctx: Context, name: str) -> Path:
    target = work / name
    shutil.copytree(ctx.model, target)
    return target


def corrupt_weights(work: Path, ctx: Context) -> None:
    d = _copy(work, ctx, "corrupt_weights")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # a download cut in half


def no_weights(work: Path, ctx: Context) -> None:
    (_copy(work, ctx, "no_weights") / "model.safetensors").unlink()


def bad_config(work: Path, ctx: Context) -> None:
    (_copy(work, ctx, "bad_config") / "config.json").write_text('{"model_type": "llama",')


def empty_dir(work: Path, ctx: Context) -> None:
    (work / "empty_model").mkdir()


class _Payload:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def pickled_weights(work: Path, ctx: Context) -> None:
    d = _copy(work, ctx, "pickled_weights")
    (d / "model.safetensors").unlink()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(work / "UNPICKLED"), f, protocol=2)


def remote_code(work: Path, ctx: Context) -> None:
    d = _copy(work, ctx, "remote_code")
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="prefopt_custom", auto_map={"AutoConfig": "custom.Config",
                                                         "AutoModelForCausalLM": "custom.Model"})
    (d / "config.json").write_text(json.dumps(config))
    (d / "custom.py").write_text(f"open({str(work / 'REMOTE_CODE_RAN')!r}, 'w').close()\n"
                                 "from transformers import LlamaConfig as Config, LlamaForCausalLM as Model\n")


def no_eos_no_pad(work: Path, ctx: Context) -> None:
    d = _copy(work, ctx, "no_eos_no_pad")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(eos_token=None, pad_token=None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))


def no_chat_template(work: Path, ctx: Context) -> None:
    d = _copy(work, ctx, "no_chat_template")
    (d / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(config))


def occupied_output(work: Path, ctx: Context) -> None:
    (work / "out").mkdir()
    (work / "out" / "metrics.jsonl").write_text('{"step": 1}\n')


def output_is_file(work: Path, ctx: Context) -> None:
    (work / "out").write_text("not a directory")


def _checkpoint(work: Path, ctx: Context, payload: bytes) -> None:
    """A real checkpoint whose optimizer state (a torch pickle) is replaced by ``payload``."""
    shutil.copytree(ctx.finished_run(), work / "out")
    (work / "out" / "checkpoints" / "step-1" / "optimizer.bin").write_bytes(payload)


def truncated_checkpoint(work: Path, ctx: Context) -> None:
    """A checkpoint whose weights file was cut short (written by hand, not by prefopt's atomic save)."""
    shutil.copytree(ctx.finished_run(), work / "out")
    weights = work / "out" / "checkpoints" / "step-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def pickled_checkpoint(work: Path, ctx: Context) -> None:
    _checkpoint(work, ctx, pickle.dumps(_Payload(work / "UNPICKLED"), protocol=2))


# ---------------------------------------------------------------------------- the corpus

CASES: list[Case] = [
    # -- data files ---------------------------------------------------------------------
    Case("jsonl-invalid-json", data("invalid_json.jsonl"), DataError,
         ("invalid_json.jsonl, line 3", "invalid JSON")),
    Case("jsonl-invalid-utf8", data("invalid_utf8.jsonl"), DataError,
         ("invalid_utf8.jsonl, line 2", "invalid UTF-8")),
    Case("jsonl-row-not-object", data("not_object.jsonl"), DataError,
         ("not_object.jsonl, line 2", "expected a JSON object, got a list")),
    Case("jsonl-missing-field", data("missing_field.jsonl"), DataError,
         ("missing_field.jsonl, line 2, field 'rejected'", "missing", "--on-invalid skip")),
    Case("jsonl-null-field", data("null_field.jsonl"), DataError,
         ("null_field.jsonl, line 3, field 'chosen'", "is null")),
    Case("jsonl-wrong-type", data("wrong_type.jsonl"), DataError,
         ("wrong_type.jsonl, line 2, field 'chosen'", "expected a string, got int")),
    Case("jsonl-whitespace-field", data("empty_field.jsonl"), DataError,
         ("empty_field.jsonl, line 2, field 'prompt'", "is empty")),
    Case("jsonl-bad-message", data("bad_messages.jsonl"), DataError,
         ("bad_messages.jsonl, line 2, field 'chosen'", "message 1: missing 'content'")),
    Case("jsonl-empty-file", data("empty.jsonl"), DataError, ("empty.jsonl", "contains no rows")),
    Case("jsonl-blank-lines-only", data("blank_lines.jsonl"), DataError, ("blank_lines.jsonl", "contains no rows")),
    Case("jsonl-unknown-fields", data("unknown_fields.jsonl"), DataError,
         ("unknown_fields.jsonl", "cannot tell the data format", "answer, question")),
    Case("field-remap-missing", data("remapped.jsonl", "--prompt-field", "q", "--chosen-field", "good",
                                      "--rejected-field", "bad"), DataError,
         ("remapped.jsonl, line 2, field 'bad'", "missing")),
    Case("field-remap-wrong-name", data("remapped.jsonl", "--chosen-field", "best"), DataError,
         ("remapped.jsonl", "cannot tell the data format", "'best'")),
    Case("unpaired-data-for-dpo", data("unpaired.jsonl"), DataError,
         ("unpaired.jsonl", "needs prompt/chosen/rejected data", "--loss-type kto")),
    Case("kto-bad-label", data("bad_label.jsonl", "--loss-type", "kto"), DataError,
         ("bad_label.jsonl, line 2, field 'label'", "expected true or false")),
    Case("all-pairs-identical", data("all_identical.jsonl"), DataError,
         ("all_identical.jsonl", "no usable examples", "2 chosen==rejected")),
    Case("implicit-prompt-not-shared", data("no_shared_prefix.jsonl"), DataError,
         ("no_shared_prefix.jsonl, line 2", "share no beginning", "add a 'prompt' field")),
    Case("hh-no-shared-turn", data("hh_no_shared_turn.jsonl"), DataError,
         ("hh_no_shared_turn.jsonl, line 2", "Assistant:")),
    Case("sft-messages-without-reply", ["sft", "--model", "{M}", "--output-dir", "{O}", "--no-progress",
                                        "--data", "{X}/messages_no_assistant.jsonl"], DataError,
         ("messages_no_assistant.jsonl, line 2, field 'messages'", "no assistant message")),
    Case("csv-wrong-column-count", data("bad_columns.csv"), DataError,
         ("bad_columns.csv, line 3", "expected 3 columns")),
    Case("csv-invalid-utf8", data("invalid_utf8.csv"), DataError, ("invalid_utf8.csv, line 3", "invalid UTF-8")),
    Case("json-invalid", data("invalid.json"), DataError, ("invalid.json, line 3", "invalid JSON")),
    Case("json-not-a-list", data("scalar.json"), DataError, ("scalar.json", "expected a list of objects")),
    Case("json-unknown-split", data("splits.json", "--data-split", "validation"), DataError,
         ("splits.json", "split 'validation' not found", "'train', 'test'")),
    Case("parquet-garbage", data("garbage.parquet"), DataError, ("garbage.parquet", "cannot read Parquet")),
    Case("unsupported-suffix", data("pairs.txt"), DataError, ("pairs.txt", "unsupported file type '.txt'")),
    Case("directory-not-a-dataset", data("not_a_dataset"), DataError, ("not_a_dataset", "save_to_disk")),
    Case("data-file-missing", data("no_such_file.jsonl"), DataError, ("no_such_file.jsonl", "file not found")),
    Case("eval-data-invalid", [*data("single_row.jsonl"), "--eval-data", "{X}/invalid_json.jsonl"], DataError,
         ("invalid_json.jsonl, line 3", "invalid JSON")),
    Case("eval-fraction-one-row", data("single_row.jsonl", "--eval-fraction", "0.5"), DataError,
         ("single_row.jsonl", "cannot hold out an evaluation split from 1 row")),
    Case("no-data-option", TRAIN, DataError, ("--data",)),
    # -- options ------------------------------------------------------------------------
    Case("beta-zero", data("single_row.jsonl", "--beta", "0"), ConfigError, ("--beta", "must be > 0")),
    Case("beta-nan", data("single_row.jsonl", "--beta", "nan"), ConfigError, ("--beta", "must be > 0")),
    Case("label-smoothing-one", data("single_row.jsonl", "--label-smoothing", "1"), ConfigError,
         ("--label-smoothing", "[0, 1)")),
    Case("eval-fraction-one", data("single_row.jsonl", "--eval-fraction", "1.0"), ConfigError,
         ("--eval-fraction", "[0, 1)")),
    Case("warmup-ratio-above-one", data("single_row.jsonl", "--warmup-ratio", "1.5"), ConfigError,
         ("--warmup-ratio", "[0, 1)")),
    Case("prompt-length-fills-max-length", data("single_row.jsonl", "--max-length", "64", "--max-prompt-length", "64"),
         ConfigError, ("--max-prompt-length", "below --max-length (64)", "completion")),
    Case("max-length-one", data("single_row.jsonl", "--max-length", "1", "--max-prompt-length", "none"), ConfigError,
         ("--max-length", ">= 2")),
    Case("batch-size-zero", data("single_row.jsonl", "--batch-size", "0"), ConfigError, ("--batch-size", ">= 1")),
    Case("loss-weights-count", data("single_row.jsonl", "--loss-type", "sigmoid", "hinge", "--loss-weights", "1"),
         ConfigError, ("--loss-weights", "2 loss types")),
    Case("unknown-loss-type", data("single_row.jsonl", "--loss-type", "sigmoidd"), ConfigError,
         ("--loss-type", "sigmoidd")),
    Case("overwrite-with-resume", data("single_row.jsonl", "--overwrite", "--resume", "latest"), ConfigError,
         ("--overwrite", "--resume")),
    Case("4bit-without-lora", data("single_row.jsonl", "--load-in-4bit"), ConfigError,
         ("--load-in-4bit", "--lora-r")),
    Case("merge-lora-without-lora", data("single_row.jsonl", "--merge-lora"), ConfigError, ("--merge-lora",)),
    Case("ref-sync-with-lora", data("single_row.jsonl", "--ref-sync", "soft", "--lora-r", "4"), ConfigError,
         ("--ref-sync", "LoRA")),
    Case("ref-sync-without-reference", data("single_row.jsonl", "--ref-sync", "hard", "--loss-type", "simpo"),
         ConfigError, ("--ref-sync", "uses none")),
    Case("output-dir-holds-other-run", [*data("single_row.jsonl"), "--output-dir", "{W}/out"], ConfigError,
         ("--output-dir", "already holds a run", "--resume latest", "--overwrite"), setup=occupied_output),
    Case("output-dir-is-a-file", [*data("single_row.jsonl"), "--output-dir", "{W}/out"], ConfigError,
         ("--output-dir", "not a directory"), setup=output_is_file),
    Case("output-dir-unwritable", [*data("single_row.jsonl"), "--output-dir", "{W}/out/run"], ConfigError,
         ("--output-dir", "cannot write there"), setup=output_is_file),
    Case("missing-model-option", ["train", "--data", "{D}", "--output-dir", "{O}"], ConfigError, ("--model",)),
    Case("eval-missing-model", ["eval", "--data", "{D}", "--output", "{W}/r.json"], ConfigError, ("--model",)),
    Case("resume-without-checkpoint", data("single_row.jsonl", "--resume", "latest"), CheckpointError,
         ("--resume latest", "no complete checkpoint")),
    Case("resume-not-a-checkpoint", data("single_row.jsonl", "--resume", "{W}"), CheckpointError,
         ("--resume", "not a complete prefopt checkpoint")),
    Case("config-unknown-key", data("single_row.jsonl", "--config", "{X}/unknown_key.yaml"), ConfigError,
         ("unknown_key.yaml", "unknown option 'bta'", "did you mean 'beta'")),
    Case("config-invalid-yaml", data("single_row.jsonl", "--config", "{X}/bad_yaml.yaml"), ConfigError,
         ("bad_yaml.yaml, line", "invalid YAML")),
    Case("config-wrong-type", data("single_row.jsonl", "--config", "{X}/wrong_type.yaml"), ConfigError,
         ("wrong_type.yaml", "'beta' must be float", "'lots'")),
    Case("config-file-missing", data("single_row.jsonl", "--config", "{X}/nope.yaml"), ConfigError,
         ("config file not found", "nope.yaml")),
    Case("dtype-not-a-choice", data("single_row.jsonl", "--dtype", "float8"), SystemExit,
         ("--dtype", "invalid choice: 'float8'", "'float32', 'bfloat16', 'float16'")),
    Case("beta-not-a-number", data("single_row.jsonl", "--beta", "high"), SystemExit,
         ("--beta", "invalid float value: 'high'")),
    Case("on-invalid-not-a-choice", data("single_row.jsonl", "--on-invalid", "drop"), SystemExit,
         ("--on-invalid", "invalid choice: 'drop'", "'error', 'skip'")),
    Case("data-without-action", ["data"], SystemExit, ("ACTION",)),
    # -- prefopt data check: user errors (problems in the file itself exit 1, tested apart) ------
    Case("check-missing-file", ["data", "check", "{X}/no_such_file.jsonl"], DataError,
         ("no_such_file.jsonl", "file not found")),
    Case("check-unsupported-suffix", ["data", "check", "{X}/pairs.txt"], DataError, ("pairs.txt", "unsupported")),
    Case("check-not-preference-data", ["data", "check", "{X}/unpaired.jsonl"], DataError,
         ("unpaired.jsonl", "'unpaired' format", "preference pairs")),
    Case("check-prompt-length", ["data", "check", "{D}", "--max-length", "32", "--max-prompt-length", "40"],
         ConfigError, ("--max-prompt-length", "below --max-length (32)")),
    Case("check-threshold", ["data", "check", "{D}", "--near-duplicate-threshold", "1.5"], ConfigError,
         ("--near-duplicate-threshold", "(0, 1]")),
    Case("check-example-line", ["data", "check", "{D}", "--model", "{M}", "--example-line", "999"], ConfigError,
         ("--example-line 999",)),
    Case("check-format-not-a-choice", ["data", "check", "{D}", "--format", "yaml"], SystemExit,
         ("--format", "invalid choice: 'yaml'", "'table', 'json'")),
    Case("check-tokenizer-missing", ["data", "check", "{D}", "--tokenizer", "{W}/nope"], ModelError,
         ("tokenizer not found", "nope")),
    # -- models, tokenizers, checkpoints ------------------------------------------------------
    Case("model-dir-missing", ["train", "--model", "{W}/no_model", "--data", "{D}", "--output-dir", "{O}"],
         ModelError, ("not found", "no_model")),
    Case("model-is-a-file", ["train", "--model", "{X}/single_row.jsonl", "--data", "{D}", "--output-dir", "{O}"],
         ModelError, ("single_row.jsonl", "is a file")),
    Case("model-dir-empty", ["train", "--model", "{W}/empty_model", "--data", "{D}", "--output-dir", "{O}"],
         ModelError, ("cannot load a tokenizer", "empty_model"), setup=empty_dir),
    Case("model-weights-missing", ["train", "--model", "{W}/no_weights", "--data", "{D}", "--output-dir", "{O}",
                                   "--no-progress"], ModelError, ("cannot load a causal LM", "no_weights"),
         setup=no_weights),
    Case("model-weights-truncated", ["train", "--model", "{W}/corrupt_weights", "--data", "{D}", "--output-dir",
                                     "{O}", "--no-progress"], ModelError,
         ("cannot load a causal LM", "corrupt_weights"), setup=corrupt_weights),
    Case("model-config-invalid", ["train", "--model", "{W}/bad_config", "--data", "{D}", "--output-dir", "{O}"],
         ModelError, ("bad_config", "config.json"), setup=bad_config),
    Case("model-pickled-weights", ["train", "--model", "{W}/pickled_weights", "--data", "{D}", "--output-dir",
                                   "{O}", "--no-progress"], ModelError,
         ("pickled_weights", "never unpickles", "safetensors"), setup=pickled_weights, must_not_exist="UNPICKLED"),
    Case("model-remote-code", ["train", "--model", "{W}/remote_code", "--data", "{D}", "--output-dir", "{O}",
                               "--no-progress"], ModelError, ("remote_code", "--trust-remote-code"),
         setup=remote_code, must_not_exist="REMOTE_CODE_RAN"),
    Case("model-hub-name-offline", ["train", "--model", "prefopt-no-such-org/no-such-model", "--data", "{D}",
                                    "--output-dir", "{O}"], ModelError, ("prefopt-no-such-org/no-such-model",)),
    Case("ref-model-missing", ["train", "--model", "{M}", "--ref-model", "{W}/no_ref", "--data", "{D}",
                               "--output-dir", "{O}", "--no-progress"], ModelError, ("not found", "no_ref")),
    Case("tokenizer-without-eos-or-pad", ["train", "--model", "{M}", "--tokenizer", "{W}/no_eos_no_pad", "--data",
                                          "{D}", "--output-dir", "{O}"], ModelError,
         ("no_eos_no_pad", "neither a pad nor an EOS"), setup=no_eos_no_pad),
    Case("chat-data-without-template", ["train", "--model", "{M}", "--tokenizer", "{W}/no_chat_template",
                                        "--data", "{X}/conversational.jsonl", "--output-dir", "{O}"], ModelError,
         ("conversational", "no chat template"), setup=no_chat_template),
    Case("resume-truncated-checkpoint", [*data("single_row.jsonl", "--resume", "latest"), "--output-dir", "{W}/out"],
         CheckpointError, ("--resume", "step-1", "cannot load this checkpoint", "SafetensorError"),
         setup=truncated_checkpoint),
    Case("resume-pickled-checkpoint", [*data("single_row.jsonl", "--resume", "latest"), "--output-dir", "{W}/out"],
         CheckpointError, ("--resume", "step-1", "never unpickles"), setup=pickled_checkpoint,
         must_not_exist="UNPICKLED"),
]
