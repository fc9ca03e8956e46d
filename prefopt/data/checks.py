"""Data-quality checks over preference pairs and tokenized examples.

Each check is a pure function that returns structured results (lists of
:class:`Finding`, or small dataclasses of numbers) and never prints or raises for a bad
row, so ``prefopt data check`` and the trainer's start-up report can show them however
they like. Findings name fields by their canonical names (prompt, chosen, rejected,
completion), whatever the source data called them.

Thresholds, and why:

* near-duplicate answers: ``difflib.SequenceMatcher`` ratio >= 0.95. A pair whose answers
  differ by a few characters gives the loss almost nothing to learn from, and often
  comes from a generation bug (same sample twice, a trailing-space difference).
* short answers: fewer than 3 words *and* fewer than 12 characters. Catches placeholders
  and cut-off replies ("ok", "N/A", "I") while leaving real short answers such as
  "The answer is 4." alone; the character test keeps text without spaces (Chinese,
  Japanese) from being flagged for having one "word". These are warnings: "4" is a fine
  answer to "2+2?".
"""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher

from prefopt.data.formats import PreferencePair, Value, is_messages
from prefopt.data.tokenize import (DROP_EMPTY, DROP_IDENTICAL,
                                   DROP_IDENTICAL_AFTER_TRUNCATION, DROP_UNTRAINED, SpecialTokens,
                                   TokenizedExample, cut_masks, truncate_ids)

NEAR_DUPLICATE_THRESHOLD = 0.95
SHORT_ANSWER_WORDS = 3
SHORT_ANSWER_CHARS = 12


@dataclass
class Finding:
    """One problem (or suspicious thing) found in one row."""

    kind: str
    line: int
    field: str | None
    message: str


@dataclass
class LengthStats:
    """Token-length distribution of one part (prompt, chosen, ...) of the examples.

    ``p95`` is the nearest-rank 95th percentile: a length that 95% of rows do not exceed,
    which is what to compare with ``max_length`` when choosing it.
    """

    count: int
    min: int
    median: float
    p95: int
    max: int


@dataclass
class TruncationReport:
    """What ``max_length`` / ``max_prompt_length`` would do to untruncated examples."""

    rows: int
    prompt_truncated: int
    completion_truncated: int
    truncated: int                  # rows with the prompt or a completion truncated
    destroyed: dict[str, int] = field(default_factory=dict)  # reason -> rows lost

    @property
    def destroyed_total(self) -> int:
        """Rows that truncation would make useless (they would be dropped)."""
        return sum(self.destroyed.values())


def check_pairs(pairs: Sequence[PreferencePair], *,
                near_duplicate_threshold: float = NEAR_DUPLICATE_THRESHOLD,
                min_words: int = SHORT_ANSWER_WORDS,
                min_chars: int = SHORT_ANSWER_CHARS) -> list[Finding]:
    """All text-level checks on ``pairs``, sorted by line."""
    findings = (check_empty_fields(pairs) + check_identical(pairs)
                + check_near_duplicates(pairs, near_duplicate_threshold)
                + check_short_answers(pairs, min_words, min_chars)
                + check_duplicate_rows(pairs))
    return sorted(findings, key=lambda f: f.line)


def check_empty_fields(pairs: Sequence[PreferencePair]) -> list[Finding]:
    """Empty or whitespace-only prompts and answers, including single empty messages.

    Conversion already rejects empty fields given in the data, but a derived prompt or
    completion (implicit-prompt data) can still be empty, and one empty message inside a
    conversation passes conversion.
    """
    findings = []
    for pair in pairs:
        for name in ("prompt", "chosen", "rejected"):
            problem = _emptiness(getattr(pair, name))
            if problem:
                findings.append(Finding("empty", pair.line, name, problem))
    return findings


def check_identical(pairs: Sequence[PreferencePair]) -> list[Finding]:
    """Pairs whose chosen and rejected answers are the same: nothing to prefer."""
    return [Finding("identical", p.line, "rejected", "chosen and rejected are identical")
            for p in pairs if p.chosen == p.rejected]


def check_near_duplicates(pairs: Sequence[PreferencePair],
                          threshold: float = NEAR_DUPLICATE_THRESHOLD) -> list[Finding]:
    """Pairs whose answers differ but are at least ``threshold`` similar (0..1 ratio).

    The cheap upper bounds of ``SequenceMatcher`` are tried first so long, clearly
    different answers cost almost nothing.
    """
    findings = []
    for pair in pairs:
        chosen, rejected = _as_text(pair.chosen), _as_text(pair.rejected)
        if chosen == rejected:
            continue
        matcher = SequenceMatcher(None, chosen, rejected)
        if (matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold
                and (ratio := matcher.ratio()) >= threshold):
            findings.append(Finding("near_duplicate", pair.line, "rejected",
                                    f"chosen and rejected are {ratio:.0%} similar"))
    return findings


def check_short_answers(pairs: Sequence[PreferencePair], min_words: int = SHORT_ANSWER_WORDS,
                        min_chars: int = SHORT_ANSWER_CHARS) -> list[Finding]:
    """Answers with fewer than ``min_words`` words and fewer than ``min_chars`` characters."""
    findings = []
    for pair in pairs:
        for name in ("chosen", "rejected"):
            text = _answer_text(getattr(pair, name)).strip()
            if text and len(text.split()) < min_words and len(text) < min_chars:
                findings.append(Finding("short", pair.line, name,
                                        f"suspiciously short answer: {text!r}"))
    return findings


def check_duplicate_rows(pairs: Sequence[PreferencePair]) -> list[Finding]:
    """Rows repeating an earlier row's prompt, chosen and rejected exactly.

    Duplicates weight those examples twice and leak between train and eval splits.
    """
    first_seen: dict[str, int] = {}
    findings = []
    for pair in pairs:
        key = json.dumps([pair.prompt, pair.chosen, pair.rejected], ensure_ascii=False)
        if key in first_seen:
            findings.append(Finding("duplicate", pair.line, None,
                                    f"same prompt, chosen and rejected as line "
                                    f"{first_seen[key]}"))
        else:
            first_seen[key] = pair.line
    return findings


def audit_special_tokens(examples: Sequence[TokenizedExample],
                         specials: SpecialTokens) -> list[Finding]:
    """BOS/EOS mistakes in tokenized examples (``specials = SpecialTokens.of(tokenizer)``).

    Reports a doubled BOS at the prompt start (a chat template that writes BOS plus a
    tokenizer that adds another), a missing BOS when the tokenizer normally adds one, a
    completion not ending in EOS (skipped for truncated examples, whose completions are
    cut on purpose) and EOS inside a completion (the model would learn to stop and go on;
    expected only when a completion holds several chat messages).
    """
    bos, eos = specials.bos_id, specials.eos_id
    expect_bos = bos is not None and bos in specials.prefix
    names = ("chosen", "rejected")
    findings = []
    for ex in examples:
        prompt = ex.prompt_ids
        if bos is not None and prompt[:2] == [bos, bos]:
            findings.append(Finding("double_bos", ex.line, "prompt",
                                    "prompt starts with BOS twice"))
        elif expect_bos and (not prompt or prompt[0] != bos):
            findings.append(Finding("missing_bos", ex.line, "prompt",
                                    "prompt does not start with BOS, which this tokenizer "
                                    "normally adds"))
        if eos is None:
            continue
        for i, ids in enumerate(ex.completions):
            name = names[i] if len(ex.completions) == 2 else "completion"
            if not ex.truncated and (not ids or ids[-1] != eos):
                findings.append(Finding("missing_eos", ex.line, name,
                                        "completion does not end with EOS"))
            mask = ex.scored(i)
            # an EOS that ends a trained turn followed by masked ones (all_assistant_turns) is where it belongs
            inside = [k for k in range(len(ids) - 1) if ids[k] == eos and mask[k + 1]]
            if inside:
                findings.append(Finding("eos_inside", ex.line, name,
                                        f"EOS at token {inside[0] + 1} of {len(ids)} "
                                        "inside the completion"))
    return findings


def length_stats(examples: Sequence[TokenizedExample]) -> dict[str, LengthStats]:
    """Token-length statistics of prompts and completions.

    Keys are ``prompt`` plus ``chosen`` and ``rejected`` for pairs, or ``completion`` for
    single-completion examples; an empty input gives an empty dict.
    """
    if not examples:
        return {}
    parts: dict[str, list[int]] = {"prompt": [len(ex.prompt_ids) for ex in examples]}
    for ex in examples:
        names = ("chosen", "rejected") if len(ex.completions) == 2 else ("completion",)
        for name, ids in zip(names, ex.completions):
            parts.setdefault(name, []).append(len(ids))
    return {name: _describe(lengths) for name, lengths in parts.items()}


def truncation_report(examples: Sequence[TokenizedExample], max_length: int,
                      max_prompt_length: int | None, bos_id: int | None) -> TruncationReport:
    """How many rows given limits would truncate, and how many it would make useless.

    ``examples`` must be tokenized without truncation (for instance with
    ``TokenizeSettings(max_length=10**9, max_prompt_length=None)``); the rules applied are
    those of training (:func:`prefopt.data.tokenize.truncate_ids`).
    """
    report = TruncationReport(rows=len(examples), prompt_truncated=0,
                              completion_truncated=0, truncated=0)
    for ex in examples:
        prompt, comps, truncated = truncate_ids(ex.prompt_ids, ex.completions, max_length,
                                                max_prompt_length, bos_id)
        report.prompt_truncated += len(prompt) < len(ex.prompt_ids)
        report.completion_truncated += any(len(a) < len(b)
                                           for a, b in zip(comps, ex.completions))
        report.truncated += truncated
        reason = None
        masks = cut_masks(ex.completion_masks, comps)
        if any(not c for c in comps):
            reason = DROP_EMPTY
        elif masks is not None and not all(any(m) for m in masks):
            reason = DROP_UNTRAINED
        elif len(comps) == 2 and comps[0] == comps[1]:
            same_before = ex.completions[0] == ex.completions[1]
            reason = DROP_IDENTICAL if same_before else DROP_IDENTICAL_AFTER_TRUNCATION
        if reason is not None:
            report.destroyed[reason] = report.destroyed.get(reason, 0) + 1
    return report


def _describe(lengths: list[int]) -> LengthStats:
    """min / median / nearest-rank p95 / max of a non-empty list."""
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return LengthStats(count=len(ordered), min=ordered[0],
                       median=float(statistics.median(ordered)), p95=p95, max=ordered[-1])


def _as_text(value: Value) -> str:
    """A conversation as one text ("role: content" lines); text unchanged."""
    if is_messages(value):
        return "\n".join(f"{m['role']}: {m['content']}" + (f" {json.dumps(m['tool_calls'])}" if m.get("tool_calls")
                                                             else "") for m in value)
    return value


def _answer_text(value: Value) -> str:
    """The words of an answer: the message contents for a conversation."""
    if is_messages(value):
        return "\n".join(m["content"] for m in value)
    return value


def _emptiness(value: Value) -> str | None:
    """Why ``value`` is (partly) empty, or None."""
    if is_messages(value):
        if not value:
            return "no messages"
        for number, message in enumerate(value, start=1):
            if not str(message.get("content", "")).strip() and not message.get("tool_calls"):
                return f"message {number} ({message.get('role')}) is empty"
        return None
    return None if value.strip() else "empty or whitespace only"
