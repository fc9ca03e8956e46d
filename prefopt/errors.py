"""User-facing errors.

Every mistake a user can make (a bad file, a bad option, a missing model) raises a
subclass of :class:`PrefoptError`. The CLI prints its message on one line of stderr and
exits with status 2, with no traceback; anything else that escapes is a real bug and
keeps its traceback.
"""
from __future__ import annotations


class PrefoptError(Exception):
    """A user error: the message says what is wrong and what to do about it."""

    exit_code = 2


class ConfigError(PrefoptError):
    """An option is invalid, unknown, or incompatible with another option."""


class DataError(PrefoptError):
    """A data file or one of its rows is unusable.

    The message names the file, the line (1-based, for line-oriented files; the row
    number otherwise) and the field, so the user can open the file and fix it.
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.source, self.line, self.field = source, line, field
        where = ""
        if source is not None:
            where = str(source)
            if line is not None:
                where += f", line {line}"
            if field is not None:
                where += f", field '{field}'"
            where += ": "
        elif field is not None:
            where = f"field '{field}': "
        super().__init__(where + message)
        self.bare_message = message


class ModelError(PrefoptError):
    """A model or tokenizer cannot be loaded or is unfit for the requested job."""


class CheckpointError(PrefoptError):
    """A checkpoint cannot be written or read (disk full, unwritable directory, corrupt)."""


class TrainingError(PrefoptError):
    """Training cannot continue (for example, too many non-finite steps in a row)."""
