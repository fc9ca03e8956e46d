"""From the config's data options to tokenized examples, with one summary line.

This is the seam between the data layer (which knows nothing of training) and the
trainer: it picks the sources, splits off evaluation rows, turns rows into the shape
the loss needs (pairs, single completions for SFT, labelled completions for KTO),
handles invalid rows as ``--on-invalid`` says, and tokenizes.
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

from prefopt.data import (
    RANKED_FORMATS,
    Fields,
    TokenizeSettings,
    detect_format,
    load_rows,
    pairs_to_unpaired,
    split_rows,
    to_pairs,
    to_ranked,
    to_sft,
    to_unpaired,
    tokenize_pairs,
    tokenize_ranked,
    tokenize_sft,
    tokenize_unpaired,
    validate_rows,
)
from prefopt.data.tokenize import TokenizedExample
from prefopt.errors import DataError

log = logging.getLogger("prefopt")

PAIRED_FORMATS = {"standard", "conversational", "implicit_prompt", "implicit_conversational", "hh"}


@dataclass
class Examples:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    fmt: str
    summary: str


def _fields(cfg) -> dict[str, Fields]:
    return {"fields": Fields(prompt=cfg.prompt_field, chosen=cfg.chosen_field, rejected=cfg.rejected_field,
                             completions=cfg.completions_field, scores=cfg.scores_field, rating=cfg.rating_field)}


def _screen(rows, fmt: str, cfg, output_dir: Path | None, source: str):
    """Apply --on-invalid: stop listing the first problems, or drop and record the bad rows."""
    problems = validate_rows(rows, fmt, **_fields(cfg))
    if not problems:
        return rows
    if cfg.on_invalid == "error":
        shown = "\n  ".join(str(p) for p in problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(f"{len(problems)} invalid row(s) in {source}; fix them or pass --on-invalid skip:"
                        f"\n  {shown}{more}")
    bad_lines = {p.line for p in problems}
    kept = [r for r in rows if r.line not in bad_lines]
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / "rejected_rows.jsonl", "a", encoding="utf-8") as f:
            by_line = {}
            for p in problems:
                by_line.setdefault(p.line, []).append(p.bare_message if hasattr(p, "bare_message") else str(p))
            for r in rows:
                if r.line in by_line:
                    f.write(json.dumps({"source": r.source, "line": r.line, "errors": by_line[r.line],
                                        "row": r.data}, ensure_ascii=False, default=str) + "\n")
    log.warning("skipped %d invalid row(s) of %s (--on-invalid skip); they are listed in %s",
                len(bad_lines), source, (output_dir or Path(".")) / "rejected_rows.jsonl")
    return kept


def _kl_partner(examples: list[TokenizedExample], seed: int, max_length: int) -> list[TokenizedExample]:
    """KTO: give each example a second completion taken from another row (a fixed derangement).

    The KL reference point of KTO (arXiv 2402.01306) is estimated from completions scored
    under prompts they do not belong to. The paper mismatches within a batch; a fixed
    seeded pairing is the same estimator, and makes those log-probs cacheable.
    """
    n = len(examples)
    if n < 2:
        raise DataError("KTO needs at least two examples to estimate its KL reference point")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = {order[i]: order[(i + 1) % n] for i in range(n)}
    out = []
    for ex in examples:
        room = max_length - len(ex.prompt_ids)
        source = examples[partner[ex.index]]
        other = source.completions[0][:room]
        masks = (None if ex.completion_masks is None and source.completion_masks is None
                 else [ex.scored(0), source.scored(0)[:room]])
        out.append(replace(ex, completions=[ex.completions[0], other], completion_masks=masks))
    return out


def _tokenize(rows, fmt: str, mode: str, tokenizer, settings: TokenizeSettings, cfg):
    if mode == "sft":
        return tokenize_sft(to_sft(rows, fmt, **_fields(cfg)), tokenizer, settings)
    if mode == "kto":
        if fmt == "unpaired":
            unpaired = to_unpaired(rows, **_fields(cfg))
        elif fmt in PAIRED_FORMATS:
            unpaired = pairs_to_unpaired(to_pairs(rows, fmt, **_fields(cfg)))
        elif fmt in RANKED_FORMATS:
            raise DataError(f"KTO trains on pairs or labelled completions; '{fmt}' data holds K scored answers "
                            "per prompt: train it with a pairwise loss (over the derived pairs) or "
                            "--loss-type plackett_luce", source=rows[0].source if rows else None)
        else:
            raise DataError(f"KTO needs preference pairs or prompt/completion/label rows, got '{fmt}' data",
                            source=rows[0].source if rows else None)
        return tokenize_unpaired(unpaired, tokenizer, settings)
    if fmt in RANKED_FORMATS:
        return tokenize_ranked(to_ranked(rows, fmt, **_fields(cfg)), tokenizer, settings)
    if fmt not in PAIRED_FORMATS:
        hint = " (unpaired data trains with --loss-type kto)" if fmt == "unpaired" else ""
        raise DataError(f"preference training needs prompt/chosen/rejected data, got '{fmt}' data{hint}",
                        source=rows[0].source if rows else None)
    return tokenize_pairs(to_pairs(rows, fmt, **_fields(cfg)), tokenizer, settings)


def ranked_layout(train: list[TokenizedExample], evals: list[TokenizedExample], tokenizer,
                  ) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """Give every K-answer example the same number of completions, K = the most any row has.

    Batching, the reference cache and the losses work on ``[examples, K]`` tensors, so a row
    with fewer answers gets one-token filler completions whose score is NaN: the losses mask
    them (``valid``), and each costs one token of compute. Pairs among K-answer data (an
    eval file of pairs, say) become two answers scored 1 (chosen) and 0 (rejected).
    """
    def scored(ex: TokenizedExample) -> TokenizedExample:
        return ex if ex.scores is not None else replace(ex, scores=[1.0, 0.0])

    train, evals = [scored(ex) for ex in train], [scored(ex) for ex in evals]
    k = max(len(ex.completions) for ex in (*train, *evals))
    filler = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id

    def padded(ex: TokenizedExample) -> TokenizedExample:
        missing = k - len(ex.completions)
        if not missing:
            return ex
        masks = None if ex.completion_masks is None else ex.completion_masks + [[True]] * missing
        return replace(ex, completions=ex.completions + [[filler]] * missing,
                       scores=list(ex.scores) + [math.nan] * missing, completion_masks=masks)

    return [padded(ex) for ex in train], [padded(ex) for ex in evals]


def prepare_examples(cfg, tokenizer, mode: str, output_dir: Path | None) -> Examples:
    """Load, screen, split and tokenize the config's training (and eval) data.

    ``mode`` is "pairs" (two completions: chosen, rejected), "sft" (one completion) or
    "kto" (own completion + a mismatched one for the KL estimate, with a label).
    """
    if not cfg.data:
        raise DataError("no training data: pass --data FILE")
    if output_dir is not None:  # rows skipped by an earlier start or before a resume are listed again below
        (output_dir / "rejected_rows.jsonl").unlink(missing_ok=True)
    rows = load_rows(cfg.data, split=cfg.data_split)
    if not rows:
        raise DataError("no rows", source=cfg.data)
    fmt = detect_format(rows, **_fields(cfg))
    rows = _screen(rows, fmt, cfg, output_dir, cfg.data)
    if cfg.eval_data:
        eval_rows = load_rows(cfg.eval_data, split=cfg.data_split)
        eval_rows = _screen(eval_rows, detect_format(eval_rows, **_fields(cfg)), cfg, output_dir, cfg.eval_data)
    elif cfg.eval_fraction > 0:
        rows, eval_rows = split_rows(rows, cfg.eval_fraction, cfg.seed)
    else:
        eval_rows = []
    settings = TokenizeSettings(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                                all_assistant_turns=cfg.all_assistant_turns)
    train, stats = _tokenize(rows, fmt, mode, tokenizer, settings, cfg)
    if not train:
        raise DataError(f"no usable examples left after tokenization ({stats.summary_line()})", source=cfg.data)
    evals, eval_stats = ([], None)
    if eval_rows:
        eval_fmt = detect_format(eval_rows, **_fields(cfg))
        evals, eval_stats = _tokenize(eval_rows, eval_fmt, mode, tokenizer, settings, cfg)
    if mode == "kto":
        train = _kl_partner(train, cfg.seed, cfg.max_length)
        evals = _kl_partner(evals, cfg.seed, cfg.max_length) if len(evals) > 1 else []
    # Plackett-Luce on pairs is DPO: two answers scored 1 and 0 take the K-answer path
    if mode == "pairs" and (cfg.loss_type == ["plackett_luce"] or any(ex.scores is not None for ex in (*train, *evals))):
        train, evals = ranked_layout(train, evals, tokenizer)
    summary = f"format: {fmt}; train {stats.summary_line()}"
    if eval_stats is not None:
        summary += f"; eval {eval_stats.summary_line()}"
    return Examples(train=train, eval=evals, fmt=fmt, summary=summary)
