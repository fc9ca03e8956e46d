"""Read raw rows from wherever the user keeps their data.

Every source is reduced to the same thing: a list of :class:`Row`, each a plain ``dict``
plus the place it came from. Keeping the place (file and line) on every row is what lets
later stages say "pairs.jsonl, line 812, field 'chosen': is empty" instead of "row 811",
so users can jump straight to the problem.

``Row.line`` means:

* JSONL: the 1-based physical line of the file (blank lines are skipped but counted).
* CSV: the 1-based physical line where the record starts (the header is line 1, so the
  first record is line 2; a quoted cell that spans lines pushes later records down).
* JSON, Parquet, ``save_to_disk`` directories and hub datasets: the 1-based row number.
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError, DataError

#: Suffixes read directly from a file; anything else that is not an existing path is
#: treated as a dataset name on the Hugging Face Hub.
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

#: How many characters of an offending line to quote back in an error message.
_QUOTE_CHARS = 60


@dataclass
class Row:
    """One record of the source, as a dict, with where it came from."""

    data: dict
    line: int
    source: str


def load_rows(source: str, *, split: str = "train") -> list[Row]:
    """Read every row of ``source``: a file, a ``save_to_disk`` directory or a hub name.

    ``split`` picks the split of a ``DatasetDict`` directory, of a hub dataset, or of a
    JSON file holding several named lists. Raises :class:`DataError` for anything the
    user has to fix (missing file, malformed line, unknown split, empty data).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _load_saved_dataset(path, split)
    elif path.is_file():
        rows = _load_file(path, split)
    elif path.suffix.lower() in FILE_SUFFIXES or _looks_like_local_path(source):
        raise DataError("file not found", source=source)
    else:
        rows = _load_hub_dataset(source, split)
    if not rows:
        raise DataError("contains no rows", source=source)
    return rows


def split_rows(rows: list[Row], eval_fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Hold out ``eval_fraction`` of ``rows`` for evaluation, reproducibly.

    The choice depends only on ``seed`` and the number of rows, so a resumed run holds out
    the same rows. Both parts keep the source order, which keeps error messages and
    ``prefopt data check`` output easy to follow. At least one row is held out whenever
    ``eval_fraction`` is positive, and at least one is kept for training.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    if eval_fraction == 0.0 or not rows:
        return list(rows), []
    if len(rows) < 2:
        raise DataError(f"cannot hold out an evaluation split from {len(rows)} row",
                        source=rows[0].source)
    n_eval = min(max(1, round(len(rows) * eval_fraction)), len(rows) - 1)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_eval])
    train = [row for i, row in enumerate(rows) if i not in held_out]
    evaluation = [row for i, row in enumerate(rows) if i in held_out]
    return train, evaluation


def _looks_like_local_path(source: str) -> bool:
    """True for strings that can only be meant as local paths, never hub names."""
    return source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in source


def _load_file(path: Path, split: str) -> list[Row]:
    """Dispatch on the file suffix."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".json":
        return _load_json(path, split)
    if suffix == ".csv":
        return _load_csv(path)
    if suffix == ".parquet":
        return _load_parquet(path)
    raise DataError(f"unsupported file type '{path.suffix}': use one of "
                    + ", ".join(FILE_SUFFIXES) + ", or a directory written by save_to_disk",
                    source=str(path))


def _read_bytes(path: Path) -> bytes:
    """Read a whole file, turning OS errors into a :class:`DataError`."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", source=str(path)) from exc


def _load_jsonl(path: Path) -> list[Row]:
    """One JSON object per line; decoded line by line so bad UTF-8 gets its line number."""
    source = str(path)
    rows: list[Row] = []
    for number, raw in enumerate(_read_bytes(path).split(b"\n"), start=1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte-order mark written by some editors
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"invalid UTF-8 at byte {exc.start + 1} of the line",
                            source=source, line=number) from exc
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg} at column {exc.colno}",
                            source=source, line=number) from exc
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {_json_type(value)}: "
                            + _quote(text), source=source, line=number)
        rows.append(Row(value, number, source))
    return rows


def _read_text(path: Path) -> str:
    """The whole file as text; invalid UTF-8 is reported with the line it is on."""
    data = _read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError("invalid UTF-8", source=str(path), line=line) from exc


def _load_json(path: Path, split: str) -> list[Row]:
    """A list of objects, an object holding such a list, or a dict of equal-length columns."""
    source = str(path)
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} at column {exc.colno}",
                        source=source, line=exc.lineno) from exc
    records = _json_records(value, split, source)
    rows: list[Row] = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {_json_type(record)}",
                            source=source, line=number)
        rows.append(Row(record, number, source))
    return rows


def _json_records(value: Any, split: str, source: str) -> list:
    """Find the list of records inside a parsed JSON document.

    Accepted shapes, in the order they are tried: a list of records; an object with one
    list of records (``{"data": [...]}``), or several keyed by split name
    (``{"train": [...], "test": [...]}``, where ``split`` picks one); an object of
    equal-length columns as written by ``Dataset.to_dict()``.
    """
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        raise DataError(f"expected a list of objects, got {_json_type(value)}", source=source)
    record_keys = [key for key, column in value.items()
                   if isinstance(column, list) and column
                   and all(isinstance(item, dict) for item in column)]
    if split in record_keys:
        return value[split]
    if len(record_keys) == 1:
        return value[record_keys[0]]
    if len(record_keys) > 1:
        raise DataError(f"split '{split}' not found; the file holds lists under "
                        + ", ".join(f"'{key}'" for key in record_keys)
                        + ": choose one as the split", source=source)
    columns = list(value.values())
    if columns and all(isinstance(column, list) for column in columns):
        lengths = {len(column) for column in columns}
        if len(lengths) != 1:
            raise DataError("columns have different lengths: "
                            + ", ".join(f"'{k}': {len(c)}" for k, c in value.items()),
                            source=source)
        names = list(value)
        return [dict(zip(names, cells)) for cells in zip(*columns)]
    raise DataError("expected a list of objects, an object holding such a list, "
                    "or an object of equal-length column lists", source=source)


def _load_csv(path: Path) -> list[Row]:
    """CSV with a header row; cells holding JSON message lists are decoded to lists."""
    source = str(path)
    text = _read_text(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return []
        header = [name.strip() for name in header]
        rows: list[Row] = []
        start = reader.line_num + 1
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise DataError(f"expected {len(header)} columns (as in the header), "
                                f"found {len(cells)}", source=source, line=line)
            rows.append(Row({name: _decode_cell(cell) for name, cell in zip(header, cells)},
                            line, source))
    except csv.Error as exc:
        raise DataError(f"malformed CSV: {exc}", source=source, line=reader.line_num) from exc
    return rows


def _decode_cell(cell: str) -> Any:
    """Decode a CSV cell that holds a JSON list of chat messages; keep anything else as text.

    Conversational data exported to CSV carries its message lists as JSON text. Only
    lists of ``{"role", "content"}`` objects (or tool-call messages, ``{"role", "tool_calls"}``)
    are decoded, so an answer that merely looks like JSON (``"[1, 2, 3]"``) stays the string
    the author wrote.
    """
    stripped = cell.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return cell
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        return cell
    if value and isinstance(value, list) and all(
            isinstance(m, dict) and "role" in m and ("content" in m or "tool_calls" in m) for m in value):
        return value
    return cell


def _load_parquet(path: Path) -> list[Row]:
    """Parquet via pyarrow; nested columns (message lists) come back as Python lists."""
    import pyarrow.parquet as pq

    source = str(path)
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read Parquet file: {exc}", source=source) from exc
    return [Row(record, number, source) for number, record in enumerate(records, start=1)]


def _load_saved_dataset(path: Path, split: str) -> list[Row]:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    import datasets

    source = str(path)
    try:
        loaded = datasets.load_from_disk(source)
    except FileNotFoundError as exc:
        raise DataError("is a directory but not one written by Dataset.save_to_disk or "
                        "DatasetDict.save_to_disk", source=source) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"split '{split}' not found; available splits: "
                            + ", ".join(sorted(loaded)), source=source)
        loaded = loaded[split]
    return [Row(record, number, source) for number, record in enumerate(loaded.to_list(), 1)]


def _load_hub_dataset(name: str, split: str) -> list[Row]:
    """Load ``name`` with ``datasets.load_dataset`` (local cache first, then the Hub)."""
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth, missing repo, bad split: all user-facing
        detail = " ".join(str(exc).split())[:300]
        raise DataError(f"not a local file or directory, and dataset '{name}' (split "
                        f"'{split}') could not be loaded from the local cache or the "
                        f"Hugging Face Hub: {type(exc).__name__}: {detail}",
                        source=name) from exc
    return [Row(record, number, name) for number, record in enumerate(loaded.to_list(), 1)]


def _json_type(value: Any) -> str:
    """Name a parsed JSON value's type the way a user writing JSON would."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _quote(text: str) -> str:
    """Short excerpt of an offending line for an error message."""
    text = text.strip()
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "..."
