"""Recognise the shape of a data set and turn its rows into typed examples.

Preference data comes in several shapes (see :data:`FORMAT_DESCRIPTIONS`). This module
finds out which one a file uses from its field names and value types, then converts each
row into a :class:`PreferencePair` (DPO and friends), an :class:`UnpairedExample` (KTO) or
an :class:`SFTExample` (supervised fine-tuning), validating as it goes so every problem is
reported with its file, line and field.

Values are either text (``str``) or conversations: lists of ``{"role", "content"}``
messages, which keep what chat templates read besides (``tool_calls``, ``name``,
``tool_call_id``, reasoning). Within one example the prompt and completions are always the
same kind; a conversational prompt with a plain-string answer is turned into a one-message
assistant reply so the chat template can render it. A conversational row may also carry
``tools`` (JSON schemas) and ``chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``),
both handed to the chat template when the row is rendered.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Union

from prefopt.data.load import Row
from prefopt.errors import DataError

Messages = list[dict]
Value = Union[str, Messages]

#: What each format name means; used in messages and by ``prefopt data check``.
FORMAT_DESCRIPTIONS: dict[str, str] = {
    "standard": "preference pairs of strings: prompt, chosen, rejected",
    "conversational": "preference pairs of chat messages: prompt, chosen, rejected",
    "implicit_prompt": "preference pairs of strings without a prompt field: the prompt is "
                       "the text chosen and rejected share",
    "implicit_conversational": "preference pairs of full conversations without a prompt "
                               "field: the prompt is the messages they share",
    "hh": "Anthropic HH text: chosen and rejected are whole dialogues with "
          "'\\n\\nHuman:' and '\\n\\nAssistant:' turns",
    "unpaired": "unpaired (KTO) examples: prompt, completion and a true/false label",
    "completion": "supervised examples: prompt and completion",
    "messages": "supervised chat examples: a list of messages",
    "ranked": "K answers per prompt with scores: prompt, completions (a list of K >= 2 answers), "
              "scores (one number per answer, higher is better; ties allowed)",
    "ultrafeedback": "UltraFeedback rows: a prompt (or instruction) and a completions list of objects "
                     "holding a response and its ratings (the rating chosen with --rating-field)",
}

#: Formats that hold a chosen and a rejected answer per row.
PREFERENCE_FORMATS = ("standard", "conversational", "implicit_prompt",
                      "implicit_conversational", "hh")

#: Formats that hold K >= 2 scored answers per row.
RANKED_FORMATS = ("ranked", "ultrafeedback")

#: UltraFeedback names its prompt ``instruction``; used when the prompt field is absent.
ULTRAFEEDBACK_PROMPT = "instruction"

HUMAN_MARKER = "\n\nHuman:"
ASSISTANT_MARKER = "\n\nAssistant:"

#: How many leading rows detection looks at to find a non-null value for each field.
_DETECT_ROWS = 100

#: Row fields handed to ``tokenizer.apply_chat_template`` when a conversational row is rendered.
TOOLS_FIELD = "tools"
TEMPLATE_KWARGS_FIELD = "chat_template_kwargs"

#: The message keys chat templates read; the rest of a message (ids, timestamps, nulls that
#: Arrow fills in for keys other messages have) is dropped.
_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "thinking")

#: Arguments of ``apply_chat_template`` (and the template's own ``messages``) that prefopt sets
#: itself, so a row's ``chat_template_kwargs`` cannot.
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})


@dataclass(frozen=True)
class Fields:
    """Names of the fields in the user's data, for data sets that use other names.

    For example ``Fields(prompt="question", chosen="good", rejected="bad")``.
    """

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    messages: str = "messages"
    completions: str = "completions"
    scores: str = "scores"
    response: str = "response"
    rating: str = "overall_score"   # UltraFeedback: a key of each completion object, or a dotted path


@dataclass
class PreferencePair:
    """One prompt with a preferred and a dispreferred answer, in text or message form."""

    prompt: Value
    chosen: Value
    rejected: Value
    line: int
    source: str
    tools: list[dict] | None = None                  # JSON schemas for the chat template
    chat_template_kwargs: dict | None = None         # extra chat-template variables


@dataclass
class RankedExample:
    """One prompt with K >= 2 answers and a score for each (higher is better, ties allowed)."""

    prompt: Value
    completions: list[Value]
    scores: list[float]
    line: int
    source: str
    tools: list[dict] | None = None                  # JSON schemas for the chat template
    chat_template_kwargs: dict | None = None         # extra chat-template variables


@dataclass
class UnpairedExample:
    """One prompt and one answer judged good (``label=True``) or bad, for KTO."""

    prompt: Value
    completion: Value
    label: bool
    line: int
    source: str
    tools: list[dict] | None = None                  # JSON schemas for the chat template
    chat_template_kwargs: dict | None = None         # extra chat-template variables


@dataclass
class SFTExample:
    """One prompt and the answer to imitate."""

    prompt: Value
    completion: Value
    line: int
    source: str
    tools: list[dict] | None = None                  # JSON schemas for the chat template
    chat_template_kwargs: dict | None = None         # extra chat-template variables


def is_messages(value: Any) -> bool:
    """True when ``value`` is a conversation (a list), as opposed to plain text."""
    return isinstance(value, list)


def template_inputs(example: Any) -> dict[str, Any]:
    """The row-level chat-template inputs of an example, to carry them onto one derived from it."""
    return {"tools": example.tools, "chat_template_kwargs": example.chat_template_kwargs}


def detect_format(rows: Sequence[Row], prompt_field: str = "prompt",
                  chosen_field: str = "chosen", rejected_field: str = "rejected", *,
                  fields: Fields | None = None) -> str:
    """Name the format of ``rows``: one of the keys of :data:`FORMAT_DESCRIPTIONS`.

    Decided from which fields exist and whether their values are strings or message
    lists, looking at the first rows (the first non-null value of each field), so a file
    with a null in row 1 is still recognised. Pass ``fields`` (or the three ``*_field``
    names) when the data uses other field names.
    """
    f = _fields(fields, prompt_field, chosen_field, rejected_field)
    if not rows:
        raise DataError("no rows to detect a format from")
    sample = rows[:_DETECT_ROWS]
    present = set().union(*(row.data.keys() for row in sample))

    def first(field: str) -> Any:
        return next((row.data[field] for row in sample if row.data.get(field) is not None), None)

    if f.chosen in present and f.rejected in present:
        chosen, rejected = first(f.chosen), first(f.rejected)
        if f.prompt in present:
            if is_messages(first(f.prompt)) or is_messages(chosen) or is_messages(rejected):
                return "conversational"
            return "standard"
        if is_messages(chosen) or is_messages(rejected):
            return "implicit_conversational"
        if all(isinstance(text, str) and HUMAN_MARKER in text and ASSISTANT_MARKER in text
               for text in (chosen, rejected)):
            return "hh"
        return "implicit_prompt"
    if f.completions in present:
        answers = first(f.completions)
        if isinstance(answers, list) and answers and isinstance(answers[0], dict) and f.response in answers[0]:
            return "ultrafeedback"
        if f.scores in present:
            return "ranked"
    if f.prompt in present and f.completion in present:
        return "unpaired" if f.label in present else "completion"
    if f.messages in present:
        return "messages"
    raise DataError(
        "cannot tell the data format from the fields " + ", ".join(sorted(map(str, present)))
        + f": expected preference pairs ('{f.prompt}', '{f.chosen}', '{f.rejected}', or "
        f"just '{f.chosen}' and '{f.rejected}'), K scored answers ('{f.prompt}', '{f.completions}', "
        f"'{f.scores}'), unpaired examples ('{f.prompt}', "
        f"'{f.completion}', '{f.label}'), prompt-completion examples ('{f.prompt}', "
        f"'{f.completion}') or chat examples ('{f.messages}'); if your fields have other "
        "names, map them with the prompt/chosen/rejected field options",
        source=rows[0].source)


def to_pairs(rows: Sequence[Row], fmt: str, prompt_field: str = "prompt",
             chosen_field: str = "chosen", rejected_field: str = "rejected", *,
             fields: Fields | None = None) -> list[PreferencePair]:
    """Convert preference rows to :class:`PreferencePair`, stopping at the first bad row.

    How the prompt is found depends on ``fmt``:

    * ``standard`` / ``conversational``: the prompt field. In conversational data a
      chosen/rejected conversation that repeats the prompt messages first has them
      removed, and plain strings become one user (prompt) or assistant (answer) message.
    * ``implicit_prompt``: the longest common prefix of chosen and rejected, cut so that
      no word is split: when the two texts part inside a word, the cut moves back to the
      start of that word, and then back over the whitespace before it, so each
      completion starts with its separating space and a whole word (" Paris" rather than
      "Paris" after a prompt ending in a space: BPE and SentencePiece vocabularies
      tokenize the word with its leading space, so this matches how the full text would
      be tokenized). Text without spaces (for example Chinese) that has no earlier word
      boundary is cut where the texts part.
    * ``implicit_conversational``: the longest run of leading messages both share, moved
      back so each completion starts with an assistant message.
    * ``hh``: everything up to and including the last ``"\\n\\nAssistant:"`` both share;
      completions keep their leading space (``" Sure, ..."``).
    """
    f = _fields(fields, prompt_field, chosen_field, rejected_field)
    if fmt not in PREFERENCE_FORMATS:
        _raise_not_preference(rows, fmt)
    convert = _PAIR_CONVERTERS[fmt]
    pairs: list[PreferencePair] = []
    for row in rows:
        problems = _row_problems(row, fmt, f)
        if problems:
            raise problems[0]
        pairs.append(convert(row, f))
    return pairs


def validate_rows(rows: Sequence[Row], fmt: str, prompt_field: str = "prompt",
                  chosen_field: str = "chosen", rejected_field: str = "rejected", *,
                  fields: Fields | None = None) -> list[DataError]:
    """Every problem in ``rows`` for format ``fmt``, instead of stopping at the first.

    Used by ``prefopt data check`` so a user can fix a file in one pass. A row with a bad
    field is reported once per bad field; rows whose fields are fine are also converted,
    to catch problems only conversion finds (no shared prompt, an HH dialogue without a
    shared assistant turn, a message list without an assistant reply).
    """
    f = _fields(fields, prompt_field, chosen_field, rejected_field)
    if fmt not in FORMAT_DESCRIPTIONS:
        raise DataError(f"unknown data format '{fmt}'; known formats: "
                        + ", ".join(FORMAT_DESCRIPTIONS))
    convert = _row_converter(fmt)
    problems: list[DataError] = []
    for row in rows:
        row_problems = _row_problems(row, fmt, f)
        if row_problems:
            problems.extend(row_problems)
            continue
        try:
            convert(row, f)
        except DataError as exc:
            problems.append(exc)
    return problems


def to_ranked(rows: Sequence[Row], fmt: str, fields: Fields | None = None) -> list[RankedExample]:
    """Convert K-answer rows to :class:`RankedExample`, stopping at the first bad row.

    ``ranked``: the prompt field, a list of answers (text or conversations) and a list of
    as many numeric scores. ``ultrafeedback``: the prompt (or ``instruction``) field and a
    list of objects, each with the answer under ``Fields.response`` and its score at
    ``Fields.rating`` (a key, or a dotted path such as ``annotations.helpfulness.Rating``;
    numeric text such as ``"4"`` is read as a number, anything else is an error naming
    the answer). Conversational answers follow the same alignment as pairs.
    """
    f = fields or Fields()
    if fmt not in RANKED_FORMATS:
        raise DataError(f"'{fmt}' data does not hold K scored answers per prompt (expected one of "
                        + ", ".join(RANKED_FORMATS) + ")", source=rows[0].source if rows else None)
    examples: list[RankedExample] = []
    for row in rows:
        problems = _row_problems(row, fmt, f)
        if problems:
            raise problems[0]
        examples.append(_ranked_from_row(row, f, fmt))
    return examples


def best_and_worst(scores: Sequence[float]) -> tuple[int, int]:
    """Indices of the best and the worst score: the first of those tied, a fixed rule."""
    best = max(range(len(scores)), key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], k))
    return best, worst


def best_answers(examples: Sequence[RankedExample]) -> list[SFTExample]:
    """The highest-scored answer of each prompt (the first of those tied for best), for SFT."""
    return [SFTExample(e.prompt, e.completions[best_and_worst(e.scores)[0]], e.line, e.source, **template_inputs(e))
            for e in examples]


def to_unpaired(rows: Sequence[Row], fields: Fields | None = None) -> list[UnpairedExample]:
    """Convert KTO rows (prompt, completion, label) to :class:`UnpairedExample`.

    The label must be a boolean; the strings ``"true"``/``"false"`` (any case) are
    accepted because CSV has no boolean type. For preference data use
    ``pairs_to_unpaired(to_pairs(...))`` instead.
    """
    f = fields or Fields()
    examples: list[UnpairedExample] = []
    for row in rows:
        problems = _row_problems(row, "unpaired", f)
        if problems:
            raise problems[0]
        examples.append(_unpaired_from_row(row, f))
    return examples


def pairs_to_unpaired(pairs: Sequence[PreferencePair]) -> list[UnpairedExample]:
    """Split each pair into a desirable (chosen) and an undesirable (rejected) example.

    This is how KTO trains on preference data; the two examples are kept adjacent so a
    batch usually holds both halves of a pair.
    """
    examples: list[UnpairedExample] = []
    for pair in pairs:
        examples.append(UnpairedExample(pair.prompt, pair.chosen, True, pair.line, pair.source,
                                        **template_inputs(pair)))
        examples.append(UnpairedExample(pair.prompt, pair.rejected, False, pair.line,
                                        pair.source, **template_inputs(pair)))
    return examples


def to_sft(rows: Sequence[Row], fmt: str, fields: Fields | None = None) -> list[SFTExample]:
    """Convert rows of any format to prompt -> answer examples for supervised training.

    Preference data trains on the chosen answer; unpaired (KTO) data on the answers
    labelled desirable only, since imitating an undesirable answer is never wanted;
    ``messages`` data on the last assistant message, with every message before it as the
    prompt (messages after it, such as a trailing user turn, have nothing to train on and
    are left out).
    """
    f = fields or Fields()
    if fmt in PREFERENCE_FORMATS:
        return [SFTExample(p.prompt, p.chosen, p.line, p.source, **template_inputs(p))
                for p in to_pairs(rows, fmt, fields=f)]
    if fmt == "unpaired":
        return [SFTExample(e.prompt, e.completion, e.line, e.source, **template_inputs(e))
                for e in to_unpaired(rows, f) if e.label]
    if fmt in RANKED_FORMATS:
        return best_answers(to_ranked(rows, fmt, f))
    if fmt not in ("completion", "messages"):
        raise DataError(f"unknown data format '{fmt}'; known formats: "
                        + ", ".join(FORMAT_DESCRIPTIONS))
    convert = _sft_from_completion_row if fmt == "completion" else _sft_from_messages_row
    examples: list[SFTExample] = []
    for row in rows:
        problems = _row_problems(row, fmt, f)
        if problems:
            raise problems[0]
        examples.append(convert(row, f))
    return examples


# --- field checks ---------------------------------------------------------------------

#: Which kind of value each format needs in each field: "text", "messages", "any"
#: (text or messages) or "label".
_FIELD_KINDS: dict[str, Callable[[Fields], list[tuple[str, str]]]] = {
    "standard": lambda f: [(f.prompt, "text"), (f.chosen, "text"), (f.rejected, "text")],
    "conversational": lambda f: [(f.prompt, "any"), (f.chosen, "any"), (f.rejected, "any")],
    "implicit_prompt": lambda f: [(f.chosen, "text"), (f.rejected, "text")],
    "implicit_conversational": lambda f: [(f.chosen, "messages"), (f.rejected, "messages")],
    "hh": lambda f: [(f.chosen, "text"), (f.rejected, "text")],
    "unpaired": lambda f: [(f.prompt, "any"), (f.completion, "any"), (f.label, "label")],
    "completion": lambda f: [(f.prompt, "any"), (f.completion, "any")],
    "messages": lambda f: [(f.messages, "messages")],
    "ranked": lambda f: [(f.prompt, "any"), (f.completions, "answers"), (f.scores, "scores")],
    "ultrafeedback": lambda f: [(f.prompt, "any"), (f.completions, "objects")],
}


def _row_problems(row: Row, fmt: str, f: Fields) -> list[DataError]:
    """Every missing, null, mistyped or empty field of ``row`` for format ``fmt``."""
    if fmt == "ultrafeedback":
        f = _ultrafeedback_fields(row, f)
    problems = []
    for field, kind in _FIELD_KINDS[fmt](f):
        message = _field_problem(row.data, field, kind)
        if message is not None:
            problems.append(DataError(message, source=row.source, line=row.line, field=field))
    for field in (TOOLS_FIELD, TEMPLATE_KWARGS_FIELD):
        try:
            _template_input(row.data, field)
        except ValueError as exc:
            problems.append(DataError(str(exc), source=row.source, line=row.line, field=field))
    return problems


def _template_input(data: dict, field: str) -> list[dict] | dict | None:
    """A row's ``tools`` (a list of JSON-schema objects) or ``chat_template_kwargs`` (an object).

    JSON text is read too, since CSV cells and Arrow tables of mixed schemas hold them as
    strings. Absent, null or empty means none. Raises ValueError saying what is wrong.
    """
    value = data.get(field)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is text that is not valid JSON ({exc.msg})") from None
    if value is None:
        return None
    if field == TOOLS_FIELD:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of tool JSON schemas, got {type(value).__name__}")
        for k, tool in enumerate(value, start=1):
            if not isinstance(tool, dict):
                raise ValueError(f"tool {k}: expected a JSON schema object, got {type(tool).__name__}")
        return value or None
    if not isinstance(value, dict):
        raise ValueError(f"expected an object of chat-template variables, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise ValueError(f"keys must be strings, got {key!r}")
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"'{key}' is set by prefopt when it renders the row and cannot be given here")
    return value or None


def _field_problem(data: dict, field: str, kind: str) -> str | None:
    """Why ``data[field]`` is not a valid value of ``kind``, or None when it is."""
    if field not in data:
        return "missing (the row has fields: " + ", ".join(map(str, data)) + ")"
    value = data[field]
    if value is None:
        return "is null"
    if kind == "label":
        return None if _parse_label(value) is not None else (
            f"expected true or false, got {value!r}")
    if kind in ("answers", "scores", "objects"):
        return _list_problem(value, kind)
    if isinstance(value, str):
        if kind == "messages":
            return "expected a list of messages ({'role': ..., 'content': ...}), got a string"
        return "is empty" if not value.strip() else None
    if isinstance(value, list):
        if kind == "text":
            return "expected a string, got a list"
        return _messages_problem(value)
    expected = {"text": "a string", "messages": "a list of messages"}.get(
        kind, "a string or a list of messages")
    return f"expected {expected}, got {type(value).__name__}"


def _list_problem(value: Any, kind: str) -> str | None:
    """Why ``value`` is not a list of K >= 2 answers / numeric scores / answer objects, or None."""
    what = {"answers": "answers", "scores": "scores", "objects": "answer objects"}[kind]
    if not isinstance(value, list):
        return f"expected a list of {what}, got {type(value).__name__}"
    if kind != "scores" and len(value) < 2:
        return f"needs at least 2 answers to rank, got {len(value)}"
    for k, item in enumerate(value, start=1):
        if kind == "scores":
            if _number(item) is None:
                return f"score {k}: expected a finite number, got {item!r}"
        elif kind == "objects":
            if not isinstance(item, dict):
                return f"answer {k}: expected an object with the response and its ratings, got {type(item).__name__}"
        else:
            problem = _field_problem({"answer": item}, "answer", "any")
            if problem is not None:
                return f"answer {k}: {problem}"
    return None


def _number(value: Any) -> float | None:
    """A finite score as a float (numeric text too, as CSV and UltraFeedback's ratings hold), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _dotted(obj: Any, path: str) -> Any:
    """``obj["a"]["b"]`` for the path ``"a.b"``; a key that itself holds dots is tried whole first."""
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    for key in path.split("."):
        if not isinstance(obj, dict) or key not in obj:
            raise KeyError(key)
        obj = obj[key]
    return obj


def _ultrafeedback_fields(row: Row, f: Fields) -> Fields:
    """UltraFeedback calls its prompt ``instruction``: use that when the prompt field is absent."""
    if f.prompt not in row.data and ULTRAFEEDBACK_PROMPT in row.data:
        return replace(f, prompt=ULTRAFEEDBACK_PROMPT)
    return f


def _messages_problem(messages: list) -> str | None:
    """Why ``messages`` is not a usable text conversation, or None.

    ``content`` is a string, a list of text parts (``{"type": "text", "text": ...}``), or
    absent/null on an assistant message that makes ``tool_calls``. prefopt trains text
    models, so an image, audio or any other non-text part is refused by name rather than
    dropped, which would train on a conversation the data never held.
    """
    if not messages:
        return "is an empty list of messages"
    for number, message in enumerate(messages, start=1):
        problem = _message_problem(message, number)
        if problem is not None:
            return problem
    if not any(_content_text(m.get("content")).strip() or m.get("tool_calls") for m in messages):
        return "every message is empty"
    return None


def _message_problem(message: Any, number: int) -> str | None:
    """Why one message (numbered from 1) is unusable, or None."""
    if not isinstance(message, dict):
        return (f"message {number}: expected an object with 'role' and 'content', "
                f"got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str):
        return (f"message {number}: missing 'role'" if "role" not in message
                else f"message {number}: 'role' must be a string, got {_type_name(role)}")
    if not role.strip():
        return f"message {number}: 'role' is empty"
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
        return f"message {number}: 'tool_calls' must be a list of objects, got {_type_name(calls)}"
    for key in ("name", "tool_call_id", "reasoning_content", "thinking"):
        if message.get(key) is not None and not isinstance(message[key], str):
            return f"message {number}: '{key}' must be a string, got {_type_name(message[key])}"
    content = message.get("content")
    if content is None:
        if calls:
            return None
        return (f"message {number}: missing 'content'" if "content" not in message
                else f"message {number}: 'content' must be a string, got null")
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"message {number}: 'content' must be a string or a list of text parts, got {_type_name(content)}"
    for k, part in enumerate(content, start=1):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            return f"message {number}: content part {k} must be an object with a 'type', got {_type_name(part)}"
        if kind != "text":
            article = "an" if kind[:1].lower() in "aeiou" else "a"
            return f"prefopt is text-only: message {number} has {article} '{kind}' part"
        if not isinstance(part.get("text"), str):
            return f"message {number}: text part {k} has no string 'text'"
    return None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _content_text(content: Any) -> str:
    """A validated ``content`` as one string: text parts joined by newlines, null as empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def _parse_label(value: Any) -> bool | None:
    """A KTO label as a bool: booleans, or "true"/"false" text from CSV; None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return {"true": True, "false": False}.get(value.strip().lower())
    return None


# --- conversions ----------------------------------------------------------------------

def _clean_messages(messages: list[dict]) -> Messages:
    """Copy a validated conversation with the keys chat templates read (:data:`_MESSAGE_KEYS`).

    Content becomes one string (text parts joined by newlines, a tool-call message's null as
    ``""``), which every text template can render, where some fail on a list or on null. Keys
    that are null are left out, so a message without tool calls looks the same to the
    template whether or not the file's other messages have them.
    """
    cleaned = []
    for m in messages:
        msg = {k: m[k] for k in _MESSAGE_KEYS if m.get(k) is not None}
        msg["content"] = _content_text(m.get("content"))
        cleaned.append(msg)
    return cleaned


def _align(prompt: Value, answers: list[Value]) -> tuple[Value, list[Value]]:
    """Make the prompt and answers the same kind (all text or all messages).

    If either side is a conversation, text prompts become one user message and text
    answers one assistant message, and an answer conversation that starts by repeating
    the prompt messages (as in UltraFeedback-style data) has them removed.
    """
    if not is_messages(prompt) and not any(is_messages(a) for a in answers):
        return prompt, answers
    prompt_msgs = (_clean_messages(prompt) if is_messages(prompt)
                   else [{"role": "user", "content": prompt}])
    aligned: list[Value] = []
    for answer in answers:
        msgs = (_clean_messages(answer) if is_messages(answer)
                else [{"role": "assistant", "content": answer}])
        n = len(prompt_msgs)
        if len(msgs) > n and msgs[:n] == prompt_msgs:
            msgs = msgs[n:]
        aligned.append(msgs)
    return prompt_msgs, aligned


def _row_template_inputs(row: Row, converted: Value) -> dict[str, Any]:
    """The row's ``tools`` and ``chat_template_kwargs`` (checked by :func:`_row_problems`).

    ``converted`` is the example's prompt (or a completion): only a conversation goes through
    the chat template, so on plain text these would be silently ignored, and are refused.
    """
    found = {"tools": _template_input(row.data, TOOLS_FIELD),
             "chat_template_kwargs": _template_input(row.data, TEMPLATE_KWARGS_FIELD)}
    given = [field for field, value in zip((TOOLS_FIELD, TEMPLATE_KWARGS_FIELD), found.values())
             if value is not None]
    if given and not is_messages(converted):
        raise DataError("only conversations are rendered with the chat template, and this row holds plain "
                        "text: give its prompt and answers as lists of messages, or drop the field",
                        source=row.source, line=row.line, field=given[0])
    return found


def _pair_explicit(row: Row, f: Fields) -> PreferencePair:
    """Standard or conversational row: the prompt is given."""
    prompt, (chosen, rejected) = _align(row.data[f.prompt],
                                        [row.data[f.chosen], row.data[f.rejected]])
    return PreferencePair(prompt, chosen, rejected, row.line, row.source, **_row_template_inputs(row, prompt))


def _common_prefix_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common prefix of two strings or lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _word_boundary_cut(a: str, b: str) -> int:
    """Where to cut two texts into shared prompt and completions without splitting a word.

    See :func:`to_pairs` for the rule. Returns an index into both strings.
    """
    shared = _common_prefix_length(a, b)
    cut = shared
    mid_word = cut > 0 and a[cut - 1].isalnum() and any(
        cut < len(s) and s[cut].isalnum() for s in (a, b))
    if mid_word:
        while cut > 0 and a[cut - 1].isalnum():
            cut -= 1
        if cut == 0:
            cut = shared  # one unbroken "word" (text without spaces): cut where they part
    while cut > 0 and a[cut - 1].isspace():
        cut -= 1
    return cut


def _pair_implicit_text(row: Row, f: Fields) -> PreferencePair:
    """Text pair without a prompt: the shared beginning is the prompt."""
    chosen, rejected = row.data[f.chosen], row.data[f.rejected]
    cut = _word_boundary_cut(chosen, rejected)
    if cut == 0 or not chosen[:cut].strip():
        raise DataError(f"'{f.chosen}' and '{f.rejected}' share no beginning, so no prompt "
                        f"can be taken from them; add a '{f.prompt}' field",
                        source=row.source, line=row.line)
    return PreferencePair(chosen[:cut], chosen[cut:], rejected[cut:], row.line, row.source,
                          **_row_template_inputs(row, chosen))


def _pair_implicit_messages(row: Row, f: Fields) -> PreferencePair:
    """Conversation pair without a prompt: the shared leading messages are the prompt."""
    chosen = _clean_messages(row.data[f.chosen])
    rejected = _clean_messages(row.data[f.rejected])
    n = min(_common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
    while n > 0 and not (chosen[n]["role"] == rejected[n]["role"] == "assistant"):
        n -= 1
    if n <= 0:
        raise DataError(f"'{f.chosen}' and '{f.rejected}' do not start with the same "
                        "messages followed by an assistant reply, so no prompt can be taken "
                        f"from them; add a '{f.prompt}' field",
                        source=row.source, line=row.line)
    return PreferencePair(chosen[:n], chosen[n:], rejected[n:], row.line, row.source,
                          **_row_template_inputs(row, chosen))


def _pair_hh(row: Row, f: Fields) -> PreferencePair:
    """Anthropic HH dialogue pair: the prompt ends with the last shared assistant marker."""
    chosen, rejected = row.data[f.chosen], row.data[f.rejected]
    shared = _common_prefix_length(chosen, rejected)
    at = chosen.rfind(ASSISTANT_MARKER, 0, shared)
    if at < 0:
        raise DataError(f"'{f.chosen}' and '{f.rejected}' share no "
                        f"{ASSISTANT_MARKER!r} turn, so the prompt cannot be found "
                        "(Anthropic HH format)", source=row.source, line=row.line)
    cut = at + len(ASSISTANT_MARKER)
    return PreferencePair(chosen[:cut], chosen[cut:], rejected[cut:], row.line, row.source,
                          **_row_template_inputs(row, chosen))


_PAIR_CONVERTERS: dict[str, Callable[[Row, Fields], PreferencePair]] = {
    "standard": _pair_explicit,
    "conversational": _pair_explicit,
    "implicit_prompt": _pair_implicit_text,
    "implicit_conversational": _pair_implicit_messages,
    "hh": _pair_hh,
}


def _ranked_from_row(row: Row, f: Fields, fmt: str) -> RankedExample:
    """A K-answer row whose fields have been checked: read the answers and their scores."""
    if fmt == "ultrafeedback":
        f = _ultrafeedback_fields(row, f)
        answers, scores = [], []
        for k, item in enumerate(row.data[f.completions], start=1):
            where = f"answer {k}"
            problem = _field_problem(item, f.response, "any") if isinstance(item, dict) else "not an object"
            if problem is not None:
                raise DataError(f"{where}: '{f.response}' {problem}", source=row.source, line=row.line,
                                field=f.completions)
            try:
                rating = _dotted(item, f.rating)
            except KeyError:
                raise DataError(f"{where} has no rating '{f.rating}' (its keys: {', '.join(map(str, item))}); "
                                "choose the rating with --rating-field", source=row.source, line=row.line,
                                field=f.completions) from None
            score = _number(rating)
            if score is None:
                raise DataError(f"{where}: rating '{f.rating}' is {rating!r}, not a number", source=row.source,
                                line=row.line, field=f.completions)
            answers.append(item[f.response])
            scores.append(score)
    else:
        answers = list(row.data[f.completions])
        scores = [_number(v) for v in row.data[f.scores]]
        if len(scores) != len(answers):
            raise DataError(f"{len(answers)} answers but {len(scores)} scores; give one score per answer",
                            source=row.source, line=row.line, field=f.scores)
    prompt, aligned = _align(row.data[f.prompt], answers)
    return RankedExample(prompt, aligned, scores, row.line, row.source, **_row_template_inputs(row, prompt))


def _unpaired_from_row(row: Row, f: Fields) -> UnpairedExample:
    """KTO row whose fields have been checked."""
    prompt, (completion,) = _align(row.data[f.prompt], [row.data[f.completion]])
    label = _parse_label(row.data[f.label])
    assert label is not None  # guaranteed by _row_problems
    return UnpairedExample(prompt, completion, label, row.line, row.source, **_row_template_inputs(row, prompt))


def _sft_from_completion_row(row: Row, f: Fields) -> SFTExample:
    """Prompt/completion row whose fields have been checked."""
    prompt, (completion,) = _align(row.data[f.prompt], [row.data[f.completion]])
    return SFTExample(prompt, completion, row.line, row.source, **_row_template_inputs(row, prompt))


def _sft_from_messages_row(row: Row, f: Fields) -> SFTExample:
    """Chat row: train on the last assistant message, prompted by everything before it."""
    messages = _clean_messages(row.data[f.messages])
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise DataError("has no assistant message to learn from",
                        source=row.source, line=row.line, field=f.messages)
    if last == 0:
        raise DataError("the last assistant message has no messages before it to serve as "
                        "the prompt", source=row.source, line=row.line, field=f.messages)
    return SFTExample(messages[:last], [messages[last]], row.line, row.source,
                      **_row_template_inputs(row, messages))


def _row_converter(fmt: str) -> Callable[[Row, Fields], object]:
    """The single-row conversion for ``fmt`` (used by :func:`validate_rows`)."""
    if fmt in _PAIR_CONVERTERS:
        return _PAIR_CONVERTERS[fmt]
    if fmt in RANKED_FORMATS:
        return lambda row, f: _ranked_from_row(row, f, fmt)
    return {"unpaired": _unpaired_from_row, "completion": _sft_from_completion_row,
            "messages": _sft_from_messages_row}[fmt]


def _raise_not_preference(rows: Sequence[Row], fmt: str) -> None:
    """Explain that DPO-style training needs pairs, naming what the data is instead."""
    source = rows[0].source if rows else None
    if fmt in FORMAT_DESCRIPTIONS:
        raise DataError(f"this is {FORMAT_DESCRIPTIONS[fmt]} ('{fmt}' format), not "
                        "preference pairs: pairwise losses need a chosen and a rejected "
                        "answer for each prompt", source=source)
    raise DataError(f"unknown data format '{fmt}'; known formats: "
                    + ", ".join(FORMAT_DESCRIPTIONS), source=source)


def _fields(fields: Fields | None, prompt: str, chosen: str, rejected: str) -> Fields:
    """``fields`` if given, else a :class:`Fields` from the three ``*_field`` arguments."""
    if fields is not None:
        return fields
    return Fields(prompt=prompt, chosen=chosen, rejected=rejected)
