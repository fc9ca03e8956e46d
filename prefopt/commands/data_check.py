"""`prefopt data check FILE`: a report on a preference file, without training.

What it looks for, and how bad each finding is (errors make the exit status 1, warnings
do not):

* schema errors (error): invalid JSON or UTF-8, rows that are not objects, missing, null
  or mistyped fields, rows from which no prompt can be derived. For JSONL every bad line
  is listed (the loader stops at the first); other formats are read whole by the loader.
* empty or whitespace-only fields (error), chosen identical to rejected (error), answers
  at least ``--near-duplicate-threshold`` similar (error: nothing to learn from), rows
  repeating an earlier row (error), suspiciously short answers (warning).
* with a tokenizer (``--tokenizer`` or ``--model``): token lengths of prompt, chosen and
  rejected; what ``--max-length``/``--max-prompt-length`` would truncate (warning) or
  destroy (error: the pair would be dropped); rows whose prompt and completion merge
  into different tokens when joined (warning: informative, training tokenizes them
  apart); a BOS/EOS audit (doubled or missing BOS, missing EOS: errors; EOS inside a
  completion: warning); and one example rendered as the model sees it, with the masked
  prompt tokens marked apart from the trained completion tokens.

Exit status: 0 when no error was found, 1 when one was, 2 for a user error (a missing
file, a bad option, a tokenizer that cannot be loaded).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from prefopt.cli import command
from prefopt.config import FIELDS
from prefopt.errors import ConfigError, DataError

#: Rows tokenized per call; a chunk with boundary merges, drops or a template error is
#: redone row by row so the report can name the lines.
_CHUNK = 256
#: Problems shown in the table (all of them are in --format json).
_TABLE_ROWS = 50
#: Line numbers listed inline for a count (truncated rows, boundary merges) in the table.
_INLINE_LINES = 12

SEVERITY = {
    "schema": "error", "empty": "error", "identical": "error", "near_duplicate": "error",
    "duplicate": "error", "short": "warning", "identical_tokens": "error",
    "destroyed_by_truncation": "error", "double_bos": "error", "missing_bos": "error",
    "missing_eos": "error", "eos_inside": "warning", "tied": "warning",
}


@dataclass
class Problem:
    """One finding of the report; ``line`` is None for a problem of the whole file."""

    kind: str
    line: int | None
    field: str | None
    message: str

    @property
    def severity(self) -> str:
        return SEVERITY[self.kind]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "severity": self.severity}


def _from_error(error: DataError) -> Problem:
    kind = "empty" if error.bare_message == "is empty" else "schema"
    return Problem(kind, error.line, error.field, error.bare_message)


# ---------------------------------------------------------------------------- reading


def scan_jsonl(path: Path) -> tuple[list, list[DataError], int]:
    """Every row of a JSONL file and every bad line: ``(rows, errors, non-blank lines)``.

    The rules are the loader's (:func:`prefopt.data.load.load_rows`): the same line
    numbering, byte-order mark, blank-line skipping and messages, but a bad line is
    recorded instead of stopping the read.
    """
    from prefopt.data.load import Row, _json_type, _quote

    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", source=source) from None
    rows, errors, lines = [], [], 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            lines += 1
            errors.append(DataError(f"invalid UTF-8 at byte {exc.start + 1} of the line",
                                    source=source, line=number))
            continue
        if not text.strip():
            continue
        lines += 1
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            errors.append(DataError(f"invalid JSON: {exc.msg} at column {exc.colno}",
                                    source=source, line=number))
            continue
        if not isinstance(value, dict):
            errors.append(DataError(f"expected a JSON object, got {_json_type(value)}: "
                                    + _quote(text), source=source, line=number))
            continue
        rows.append(Row(value, number, source))
    return rows, errors, lines


def _read(file: str, split: str) -> tuple[list, list[DataError], int]:
    """Rows, content errors and the number of records of ``file``.

    A file that is missing, unreadable or of an unsupported type is a user error
    (raised); malformed contents of a readable file are what the report is for.
    """
    from prefopt.data.load import FILE_SUFFIXES, load_rows

    path = Path(file).expanduser()
    if path.is_file():
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise DataError(f"cannot read file: {exc.strerror or exc}", source=file) from None
        if path.suffix.lower() == ".jsonl":
            return scan_jsonl(path)
        if path.suffix.lower() in FILE_SUFFIXES:
            try:
                rows = load_rows(file, split=split)
            except DataError as exc:
                return [], [exc], 0
            return rows, [], len(rows)
    rows = load_rows(file, split=split)  # directories and hub names; raises for the rest
    return rows, [], len(rows)


# ---------------------------------------------------------------------------- tokens


def _tokenize(pairs: list, tokenizer, all_assistant_turns: bool = False,
              ) -> tuple[list, list[int], dict[int, str], list[DataError]]:
    """Untruncated examples, lines with boundary merges, dropped lines (-> reason), render errors."""
    from prefopt.data import TokenizeSettings, tokenize_pairs

    settings = TokenizeSettings(max_length=10**9, max_prompt_length=None, all_assistant_turns=all_assistant_turns)
    examples, merges, dropped, failures = [], [], {}, []
    for start in range(0, len(pairs), _CHUNK):
        chunk = pairs[start:start + _CHUNK]
        try:
            found, stats = tokenize_pairs(chunk, tokenizer, settings)
            if not stats.boundary_merges and not stats.dropped:
                examples.extend(found)
                continue
        except DataError:
            pass
        for pair in chunk:
            try:
                found, stats = tokenize_pairs([pair], tokenizer, settings)
            except DataError as exc:
                failures.append(exc)
                continue
            if stats.boundary_merges:
                merges.append(pair.line)
            if stats.dropped:
                dropped[pair.line] = next(iter(stats.dropped))
            examples.extend(found)
    return [replace(ex, index=i) for i, ex in enumerate(examples)], merges, dropped, failures


def _tokenizer_info(tokenizer, specials) -> dict[str, Any]:
    def text(token_id):
        return None if token_id is None else tokenizer.convert_ids_to_tokens(token_id)

    return {
        "name": getattr(tokenizer, "name_or_path", None),
        "bos": text(specials.bos_id), "eos": text(specials.eos_id),
        "pad": text(tokenizer.pad_token_id),
        "pad_is_eos": tokenizer.pad_token_id is not None and tokenizer.pad_token_id == specials.eos_id,
        "adds_bos": specials.bos_id is not None and specials.bos_id in specials.prefix,
        "adds_eos": specials.eos_id is not None and specials.eos_id in specials.suffix,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
    }


def _example(examples: list, tokenizer, max_length: int, max_prompt_length: int | None,
             bos_id: int | None, line: int | None) -> dict[str, Any] | None:
    """One example after truncation, rendered, with each token marked trained or masked."""
    from prefopt.data import render_example
    from prefopt.data.tokenize import truncate_example

    def seen(ex):
        cut = truncate_example(ex, max_length, max_prompt_length, bos_id)  # ex is untruncated
        usable = (all(any(cut.scored(j)) for j in range(len(cut.completions)))
                  and cut.completions[0] != cut.completions[1])
        return cut, usable

    if line is not None:
        chosen = [seen(ex) for ex in examples if ex.line == line]
        if not chosen or not chosen[0][1]:
            raise ConfigError(f"--example-line {line}: no pair on that line survives the checks "
                              "and truncation; pick another line")
        ex = chosen[0][0]
    else:
        ex = next((e for e, usable in map(seen, examples) if usable), None)
        if ex is None:
            return None
    segments = [{"part": "prompt", "trained": False, "ids": ex.prompt_ids}]
    for j, (part, ids) in enumerate(zip(("chosen", "rejected"), ex.completions)):
        segments.append({"part": part, "trained": True, "ids": ids})
        if ex.completion_masks is not None:  # --all-assistant-turns: which tokens the loss reads
            segments[-1]["trained_tokens"] = ex.scored(j)
    for seg in segments:
        seg["tokens"] = [tokenizer.decode([i], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False) for i in seg["ids"]]
    return {"line": ex.line, "truncated": ex.truncated, "rendered": render_example(ex, tokenizer),
            "segments": segments}


# ---------------------------------------------------------------------------- the report


def check_file(file: str, *, tokenizer=None, max_length: int = FIELDS["max_length"].default,
               max_prompt_length: int | None = FIELDS["max_prompt_length"].default,
               prompt_field: str = "prompt", chosen_field: str = "chosen",
               rejected_field: str = "rejected", split: str = "train",
               near_duplicate_threshold: float | None = None,
               example_line: int | None = None, completions_field: str = "completions",
               scores_field: str = "scores", rating_field: str = "overall_score",
               all_assistant_turns: bool = False) -> dict[str, Any]:
    """Check a preference file; returns the report as a JSON-ready dict (``clean`` says if it passed).

    Raises :class:`DataError`/:class:`ConfigError` only for user errors: a missing or
    unreadable file, options out of range, data that is not preference pairs, fields
    that cannot be found. K-answer data (ranked, UltraFeedback) is checked as the pair of
    each row's best and worst answer, which is what its pair checks and token checks need;
    a row whose answers all tie is reported (training drops it). ``all_assistant_turns``
    tokenizes as training with ``--all-assistant-turns`` does: the rendered example then
    shows the masked turns inside its completions.
    """
    from prefopt.data import (PREFERENCE_FORMATS, FORMAT_DESCRIPTIONS, RANKED_FORMATS, Fields, SpecialTokens,
                              audit_special_tokens, check_pairs, detect_format, length_stats,
                              to_pairs, to_ranked, truncation_report, validate_rows)
    from prefopt.data.checks import NEAR_DUPLICATE_THRESHOLD

    threshold = NEAR_DUPLICATE_THRESHOLD if near_duplicate_threshold is None else near_duplicate_threshold
    if not 0 < threshold <= 1:
        raise ConfigError(f"--near-duplicate-threshold: must be in (0, 1], got {threshold}")
    if max_length < 2:
        raise ConfigError(f"--max-length: must be >= 2, got {max_length}")
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ConfigError(f"--max-prompt-length: must be at least 1 and below --max-length ({max_length}) "
                          f"so a completion still fits, got {max_prompt_length}")

    fields = Fields(prompt=prompt_field, chosen=chosen_field, rejected=rejected_field,
                    completions=completions_field, scores=scores_field, rating=rating_field)
    rows, read_errors, records = _read(file, split)
    problems = [_from_error(e) for e in read_errors]
    if not records and not read_errors:
        problems.append(Problem("schema", None, None, "contains no rows"))
    report: dict[str, Any] = {"file": file, "format": None, "rows_read": records, "pairs": 0,
                              "limits": {"max_length": max_length, "max_prompt_length": max_prompt_length},
                              "tokenizer": None}
    pairs = []
    if rows:
        fmt = detect_format(rows, fields=fields)
        if fmt not in PREFERENCE_FORMATS and fmt not in RANKED_FORMATS:
            raise DataError(f"holds {FORMAT_DESCRIPTIONS[fmt]} ('{fmt}' format); prefopt data check reports "
                            "on preference pairs (prompt, chosen, rejected)", source=file)
        report["format"] = fmt
        invalid = validate_rows(rows, fmt, fields=fields)
        problems += [_from_error(e) for e in invalid]
        bad = {e.line for e in invalid}
        kept = [r for r in rows if r.line not in bad]
        if fmt in RANKED_FORMATS:
            pairs, tied, answers = _extreme_pairs(to_ranked(kept, fmt, fields))
            report["answers"] = answers
            problems += [Problem("tied", line, fields.scores, "every answer has the same score: nothing to "
                                 "learn, training drops the row") for line in tied]
        else:
            pairs = to_pairs(kept, fmt, fields=fields)
        problems += [Problem(f.kind, f.line, f.field, f.message)
                     for f in check_pairs(pairs, near_duplicate_threshold=threshold)]
    report["pairs"] = len(pairs)

    if tokenizer is not None and pairs:
        specials = SpecialTokens.of(tokenizer)
        examples, merges, dropped, failures = _tokenize(pairs, tokenizer, all_assistant_turns)
        problems += [_from_error(e) for e in failures]
        identical = {p.line for p in problems if p.kind == "identical"}
        for line, reason in sorted(dropped.items()):
            if line not in identical:
                problems.append(Problem("identical_tokens", line, "rejected",
                                        f"dropped by tokenization: {reason} (the texts differ, the tokens do not)"))
        problems += [Problem(f.kind, f.line, f.field, f.message)
                     for f in audit_special_tokens(examples, specials)]
        report["tokenizer"] = _tokenizer_info(tokenizer, specials)
        report["lengths"] = {k: asdict(v) for k, v in length_stats(examples).items()}
        totals = Counter()
        truncated_lines, destroyed = [], {}
        for ex in examples:
            one = truncation_report([ex], max_length, max_prompt_length, specials.bos_id)
            totals.update(prompt_truncated=one.prompt_truncated,
                          completion_truncated=one.completion_truncated, truncated=one.truncated)
            if one.destroyed:
                reason = next(iter(one.destroyed))
                destroyed[reason] = destroyed.get(reason, 0) + 1
                problems.append(Problem("destroyed_by_truncation", ex.line, None,
                                        f"{reason}: the length limits leave nothing to learn, so training "
                                        "would drop it"))
            elif one.truncated:
                truncated_lines.append(ex.line)
        report["truncation"] = {"rows": len(examples), "prompt_truncated": totals["prompt_truncated"],
                                "completion_truncated": totals["completion_truncated"],
                                "truncated": totals["truncated"], "truncated_lines": truncated_lines,
                                "destroyed": destroyed, "destroyed_total": sum(destroyed.values())}
        report["boundary_merges"] = {"count": len(merges), "lines": merges}
        report["example"] = _example(examples, tokenizer, max_length, max_prompt_length,
                                     specials.bos_id, example_line)
    elif example_line is not None:
        raise ConfigError("--example-line needs a tokenizer: give --tokenizer or --model")

    problems.sort(key=lambda p: (p.line or 0, p.kind))
    counts = Counter(p.kind for p in problems)
    report["problems"] = [p.to_dict() for p in problems]
    report["counts"] = dict(sorted(counts.items()))
    report["errors"] = sum(1 for p in problems if p.severity == "error")
    report["warnings"] = sum(1 for p in problems if p.severity == "warning")
    report["clean"] = report["errors"] == 0
    return report


def _extreme_pairs(examples) -> tuple[list, list[int], int]:
    """Each K-answer row as the pair of its best and worst answer (the first of those tied), the lines
    of rows whose answers all tie, and the number of answers in all."""
    from prefopt.data import PreferencePair
    from prefopt.data.formats import best_and_worst
    from prefopt.data.formats import template_inputs

    pairs, tied = [], []
    for e in examples:
        best, worst = best_and_worst(e.scores)
        if e.scores[best] == e.scores[worst]:
            tied.append(e.line)
        else:
            pairs.append(PreferencePair(e.prompt, e.completions[best], e.completions[worst], e.line, e.source,
                                        **template_inputs(e)))
    return pairs, tied, sum(len(e.scores) for e in examples)


# ---------------------------------------------------------------------------- output


def _lines(lines: list[int]) -> str:
    shown = ", ".join(map(str, lines[:_INLINE_LINES]))
    return shown + (f", ... ({len(lines) - _INLINE_LINES} more)" if len(lines) > _INLINE_LINES else "")


def print_table(report: dict[str, Any], file=None) -> None:
    """The human-readable report (rich tables)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout, highlight=False, soft_wrap=True)  # tables still fit the width
    console.print(f"[bold]{report['file']}[/bold]: {report['rows_read']} rows read, {report['pairs']} valid "
                  f"preference pairs, format {report['format'] or 'unknown'}")
    problems = report["problems"]
    if problems:
        table = Table(title="Problems", title_justify="left")
        for name in ("line", "severity", "kind", "field"):
            table.add_column(name, no_wrap=True)
        table.add_column("message", overflow="fold", ratio=1)
        for p in problems[:_TABLE_ROWS]:
            style = "red" if p["severity"] == "error" else "yellow"
            table.add_row(str(p["line"] or "-"), f"[{style}]{p['severity']}[/{style}]", p["kind"],
                          p["field"] or "-", p["message"])
        console.print(table)
        if len(problems) > _TABLE_ROWS:
            console.print(f"... and {len(problems) - _TABLE_ROWS} more (all of them with --format json)")
        console.print("by kind: " + ", ".join(f"{k} {n}" for k, n in report["counts"].items()))
    if report["tokenizer"] is None:
        console.print("token checks skipped: give --tokenizer or --model for lengths, truncation, "
                      "BOS/EOS and a rendered example")
    else:
        tok = report["tokenizer"]
        console.print(f"tokenizer {tok['name']}: BOS {tok['bos']!r} (added by the tokenizer: "
                      f"{'yes' if tok['adds_bos'] else 'no'}), EOS {tok['eos']!r}, pad {tok['pad']!r}"
                      f"{' (EOS is used for padding)' if tok['pad_is_eos'] else ''}, chat template: "
                      f"{'yes' if tok['chat_template'] else 'no'}", markup=False)
        lengths = Table(title="Length in tokens (before truncation)", title_justify="left")
        for name in ("part", "min", "median", "p95", "max"):
            lengths.add_column(name, justify="right" if name != "part" else "left")
        for part, s in report.get("lengths", {}).items():
            lengths.add_row(part, str(s["min"]), f"{s['median']:g}", str(s["p95"]), str(s["max"]))
        console.print(lengths)
        t, lim = report["truncation"], report["limits"]
        destroyed = ", ".join(f"{n} {why}" for why, n in t["destroyed"].items())
        console.print(f"--max-length {lim['max_length']} --max-prompt-length {lim['max_prompt_length']}: "
                      f"{t['truncated']} of {t['rows']} pairs cut "
                      f"({t['prompt_truncated']} prompts, {t['completion_truncated']} completions), "
                      f"{t['destroyed_total']} of them destroyed{f' ({destroyed})' if destroyed else ''}"
                      + (f"; truncated lines: {_lines(t['truncated_lines'])}" if t["truncated_lines"] else ""),
                      markup=False)
        merges = report["boundary_merges"]
        console.print(f"prompt/completion boundary merges: {merges['count']} rows"
                      + (f" (lines {_lines(merges['lines'])}): these tokens differ from tokenizing the "
                         "joined text; training keeps the split" if merges["count"] else ""))
        if report["example"] is not None:
            console.print("\nexample as the model sees it; [...] = masked (no loss): the prompt, and "
                          "turns inside a completion other than the assistant's; «...» = completion, trained:",
                          markup=False)
            console.print(report["example"]["rendered"], markup=False)
    fast = report.get("fast_paths")
    if fast is not None:
        console.print(fast.get("summary") or f"fast-path check skipped: {fast['skipped']}", markup=False)
        for label, why in fast.get("off", {}).items():
            console.print(f"  {label}: {why}", markup=False)
    verdict = ("[green]clean[/green]" if report["clean"] else
               f"[red]{report['errors']} error(s)[/red]") + f", {report['warnings']} warning(s)"
    console.print(verdict)


# ---------------------------------------------------------------------------- CLI


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def _add_args(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = actions.add_parser("check", help="report problems in a preference file, without training",
                           description="Report schema errors, degenerate pairs, token lengths, truncation, "
                           "BOS/EOS mistakes and one rendered example. Exit status 0 when clean, 1 when "
                           "errors were found, 2 for a user error.")
    p.add_argument("file", metavar="FILE", help="preference data: .jsonl/.json/.csv/.parquet, a save_to_disk "
                   "directory or a hub name")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--tokenizer", help="tokenizer for the token checks (directory or hub name)")
    who.add_argument("--model", help="model whose tokenizer to use for the token checks; also reports which of "
                     "prefopt's fast paths the model gets on these rows")
    p.add_argument("--max-length", type=int, default=FIELDS["max_length"].default,
                   help="max tokens of prompt + one completion, as in training (default: %(default)s)")
    p.add_argument("--max-prompt-length", type=_optional_int, default=FIELDS["max_prompt_length"].default,
                   help="max prompt tokens, or none (default: %(default)s)")
    for name in ("prompt", "chosen", "rejected", "completions", "scores"):
        p.add_argument(f"--{name}-field", default=name, help=f"name of the {name} field (default: %(default)s)")
    p.add_argument("--rating-field", default="overall_score",
                   help="UltraFeedback-shaped data: the rating of each completion object, a key or a dotted path "
                        "(default: %(default)s)")
    p.add_argument("--split", default="train", help="split of a dataset directory or hub dataset")
    p.add_argument("--near-duplicate-threshold", type=float, default=None,
                   help="flag answers at least this similar, 0..1 (default: 0.95)")
    p.add_argument("--example-line", type=int, default=None, help="render the pair of this line")
    p.add_argument("--all-assistant-turns", action=argparse.BooleanOptionalAction, default=False,
                   help="tokenize as training with --all-assistant-turns: in multi-turn completions only the "
                        "assistant turns are trained, the turns between them masked")
    p.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="run code shipped with the tokenizer (off unless you trust its author)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="with --model: the dtype to check the fast paths in (default: %(default)s)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="report format")


def fast_path_report(args: argparse.Namespace, tokenizer) -> dict[str, Any]:
    """Which of prefopt's fast paths ``--model`` gets on this file's rows, as training would check them."""
    from prefopt.config import TrainConfig
    from prefopt.fastpath import LABELS, ORDER, requested_features
    from prefopt.inputs import prepare_examples
    from prefopt.modeling import load_causal_lm
    from prefopt.train import settle_fast_paths

    cfg = TrainConfig(model=args.model, data=args.file, data_split=args.split, prompt_field=args.prompt_field,
                      chosen_field=args.chosen_field, rejected_field=args.rejected_field,
                      completions_field=args.completions_field, scores_field=args.scores_field,
                      rating_field=args.rating_field, max_length=args.max_length, max_prompt_length=args.max_prompt_length, dtype=args.dtype,
                      on_invalid="skip", trust_remote_code=args.trust_remote_code,
                      all_assistant_turns=args.all_assistant_turns)
    try:
        data = prepare_examples(cfg, tokenizer, "pairs", None)
    except (DataError, ConfigError) as e:
        return {"skipped": f"the rows cannot be tokenized for training: {e}"}
    model = load_causal_lm(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    _, fast = settle_fast_paths(cfg, model, data, tokenizer.pad_token_id, device="cpu",
                                requested=requested_features(cfg), with_grad=True, split=True)
    return {"architecture": fast.architecture, "dtype": fast.dtype, "summary": fast.describe(),
            "on": [LABELS[k] for k in ORDER if fast.features.get(k)],
            "off": {LABELS[k]: why for k, why in fast.off.items()}, "policy_train_mode": fast.train_mode,
            "seconds": round(fast.seconds, 2), "cached": fast.cached}


@command("data", "inspect preference data without training (prefopt data check FILE)")(_add_args)
def run(args: argparse.Namespace) -> int:
    tokenizer = None
    name = args.tokenizer or args.model
    if name:
        from prefopt.modeling import load_tokenizer

        tokenizer = load_tokenizer(name, trust_remote_code=args.trust_remote_code)
    report = check_file(args.file, tokenizer=tokenizer, max_length=args.max_length,
                        max_prompt_length=args.max_prompt_length, prompt_field=args.prompt_field,
                        chosen_field=args.chosen_field, rejected_field=args.rejected_field, split=args.split,
                        near_duplicate_threshold=args.near_duplicate_threshold, example_line=args.example_line,
                        completions_field=args.completions_field, scores_field=args.scores_field,
                        rating_field=args.rating_field, all_assistant_turns=args.all_assistant_turns)
    if args.model and report["pairs"]:
        report["fast_paths"] = fast_path_report(args, tokenizer)
    if args.format == "json":
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print_table(report)
    return 0 if report["clean"] else 1
