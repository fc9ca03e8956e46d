"""The data layer: load rows, recognise their format, convert them, tokenize them.

A typical path for DPO::

    rows = load_rows("pairs.jsonl")
    fmt = detect_format(rows)
    pairs = to_pairs(rows, fmt)
    examples, stats = tokenize_pairs(pairs, tokenizer, TokenizeSettings(max_length=1024))
    print(stats.summary_line())

Nothing here knows about models or training: the output is plain token ids with the
prompt kept apart from the completions, which is all the batching code needs.
"""
from prefopt.data.checks import (Finding, LengthStats, TruncationReport, audit_special_tokens,
                                 check_duplicate_rows, check_empty_fields, check_identical,
                                 check_near_duplicates, check_pairs, check_short_answers,
                                 length_stats, truncation_report)
from prefopt.data.formats import (FORMAT_DESCRIPTIONS, PREFERENCE_FORMATS, RANKED_FORMATS, Fields,
                                  PreferencePair, RankedExample, SFTExample, UnpairedExample,
                                  detect_format, pairs_to_unpaired, to_pairs, to_ranked, to_sft,
                                  to_unpaired, validate_rows)
from prefopt.data.load import Row, load_rows, split_rows
from prefopt.data.tokenize import (SpecialTokens, TokenizedExample, TokenizeSettings,
                                   TokenizeStats, render_example, tokenize_pairs, tokenize_ranked,
                                   tokenize_sft, tokenize_unpaired, truncate_ids)

__all__ = [
    "FORMAT_DESCRIPTIONS", "PREFERENCE_FORMATS", "RANKED_FORMATS", "Fields", "Finding", "LengthStats",
    "PreferencePair", "RankedExample", "Row", "SFTExample", "SpecialTokens", "TokenizeSettings",
    "TokenizeStats", "TokenizedExample", "TruncationReport", "UnpairedExample",
    "audit_special_tokens", "check_duplicate_rows", "check_empty_fields", "check_identical",
    "check_near_duplicates", "check_pairs", "check_short_answers", "detect_format",
    "length_stats", "load_rows", "pairs_to_unpaired", "render_example", "split_rows",
    "to_pairs", "to_ranked", "to_sft", "to_unpaired", "tokenize_pairs", "tokenize_ranked", "tokenize_sft",
    "tokenize_unpaired", "truncate_ids", "truncation_report", "validate_rows",
]
