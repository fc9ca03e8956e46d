"""Turn text examples into token ids, with the prompt kept apart from the completions.

The rules here decide which tokens are trained on, so they are strict:

* The prompt and each completion are tokenized **separately** and concatenated. The
  completion's ids are then exactly the tokens whose log-probabilities the losses use,
  with no token straddling the prompt/completion boundary. When tokenizing the joined
  text would have given different ids (a "boundary merge", e.g. ``"ab"`` + ``"c"`` ->
  ``"abc"``), the row is counted in :attr:`TokenizeStats.boundary_merges` so users can
  see how often their split point fights the tokenizer.
* BOS appears once, at the start of the prompt: the tokenizer adds it unless the prompt
  text already starts with it (chat templates often write it themselves). A trailing
  special token that the tokenizer's post-processor appends (some add EOS as well as
  BOS) is removed from the prompt, which is not the end of anything.
* Each completion ends with exactly one EOS (``add_eos``), so the model learns to stop.
  A conversational completion the chat template already closes with its end-of-turn
  token (Qwen's ``<|im_end|>``, Llama 3's ``<|eot_id|>``) ends at that token instead:
  no second stop token is appended, and whitespace the template writes after it (a
  newline between turns) is not trained on, since generation stops at the end of turn.
* Conversations are rendered with the tokenizer's chat template: the prompt with the
  generation prompt, prompt + completion without it; the completion text is what the
  second adds to the first.
* Truncation keeps the prompt's end (the most recent turns, nearest the answer) behind
  its BOS, and each completion's start. Pairs left degenerate (an empty completion, or
  chosen and rejected identical) are dropped and counted by reason.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prefopt.data.formats import (PreferencePair, RankedExample, SFTExample, UnpairedExample, Value,
                                  is_messages)
from prefopt.errors import ConfigError, DataError, ModelError

DROP_EMPTY = "empty completion"
DROP_IDENTICAL = "chosen==rejected"
DROP_IDENTICAL_AFTER_TRUNCATION = "chosen==rejected after truncation"
DROP_TIED = "every answer scored the same"

#: Text tokenized with and without special tokens to learn what the tokenizer adds.
_PROBE_TEXT = "hello world"


@dataclass
class TokenizedExample:
    """Token ids of one example, ready for batching."""

    prompt_ids: list[int]            # includes BOS once if the model uses one
    completions: list[list[int]]     # [chosen, rejected] for pairs; [completion] otherwise
    index: int                       # 0-based position in the list returned (after drops)
    line: int                        # 1-based line (JSONL/CSV) or row number of the source row
    label: bool | None = None        # KTO only: True = desirable
    truncated: bool = False
    scores: list[float] | None = None  # K-answer rows only: one per completion, higher is better


@dataclass
class TokenizeSettings:
    """Length limits (in tokens) and whether to end completions with EOS."""

    max_length: int = 1024
    max_prompt_length: int | None = 512
    add_eos: bool = True

    def __post_init__(self) -> None:
        """Reject limits that would leave no room for a completion."""
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and not (
                1 <= self.max_prompt_length < self.max_length):
            raise ConfigError(f"max_prompt_length must be between 1 and max_length - 1 "
                              f"({self.max_length - 1}), got {self.max_prompt_length}")


@dataclass
class TokenizeStats:
    """What tokenization did to the data, for one summary line in the logs."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated_rows: int = 0          # among the rows kept
    boundary_merges: int = 0         # rows where joined text tokenizes differently

    def summary_line(self) -> str:
        """One line such as ``data: 500 rows read, 3 dropped (...), 17 truncated, ...``."""
        total = sum(self.dropped.values())
        dropped = f"{total} dropped"
        if total:
            reasons = sorted(self.dropped.items(), key=lambda item: (-item[1], item[0]))
            dropped += " (" + ", ".join(f"{n} {reason}" for reason, n in reasons) + ")"
        merges = "boundary merge" if self.boundary_merges == 1 else "boundary merges"
        return (f"data: {self.rows_read} rows read, {dropped}, {self.truncated_rows} "
                f"truncated, {self.boundary_merges} {merges}")


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens of a tokenizer that tokenization and audits care about.

    ``prefix``/``suffix`` are the ids the tokenizer's post-processor puts around a text
    when asked to add special tokens (``[bos]`` / ``[]`` for Llama, ``[]`` / ``[]`` for
    Qwen, ``[bos]`` / ``[eos]`` for some others).
    """

    bos_id: int | None
    bos_text: str | None
    eos_id: int | None
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialTokens:
        """Inspect ``tokenizer`` once, by encoding a probe text both ways."""
        plain = _encode(tokenizer, [_PROBE_TEXT], add_special_tokens=False)[0]
        full = _encode(tokenizer, [_PROBE_TEXT], add_special_tokens=True)[0]
        prefix: list[int] = []
        suffix: list[int] = []
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                prefix, suffix = full[:start], full[start + len(plain):]
                break
        return cls(bos_id=getattr(tokenizer, "bos_token_id", None),
                   bos_text=getattr(tokenizer, "bos_token", None) or None,
                   eos_id=getattr(tokenizer, "eos_token_id", None),
                   prefix=tuple(prefix), suffix=tuple(suffix))


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any,
                   settings: TokenizeSettings | None = None,
                   ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize preference pairs; each example's completions are ``[chosen, rejected]``."""
    rendered = [_render_texts(p.prompt, [p.chosen, p.rejected], tokenizer, p.source, p.line)
                for p in pairs]
    return _tokenize(rendered, [p.line for p in pairs], None, tokenizer,
                     settings or TokenizeSettings(),
                     [_templated(p.prompt, [p.chosen, p.rejected]) for p in pairs])


def tokenize_sft(examples: Sequence[SFTExample], tokenizer: Any,
                 settings: TokenizeSettings | None = None,
                 ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize supervised examples; each example has one completion."""
    rendered = [_render_texts(e.prompt, [e.completion], tokenizer, e.source, e.line)
                for e in examples]
    return _tokenize(rendered, [e.line for e in examples], None, tokenizer,
                     settings or TokenizeSettings(),
                     [_templated(e.prompt, [e.completion]) for e in examples])


def tokenize_unpaired(examples: Sequence[UnpairedExample], tokenizer: Any,
                      settings: TokenizeSettings | None = None,
                      ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize KTO examples; each has one completion and its ``label``."""
    rendered = [_render_texts(e.prompt, [e.completion], tokenizer, e.source, e.line)
                for e in examples]
    return _tokenize(rendered, [e.line for e in examples], [e.label for e in examples],
                     tokenizer, settings or TokenizeSettings(),
                     [_templated(e.prompt, [e.completion]) for e in examples])


def tokenize_ranked(examples: Sequence[RankedExample], tokenizer: Any,
                    settings: TokenizeSettings | None = None,
                    ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize K-answer examples; completions keep the row's order, ``scores`` beside them.

    A row whose answers all have the same score says nothing about which is better, so it
    is dropped (counted as ``every answer scored the same``).
    """
    rendered = [_render_texts(e.prompt, e.completions, tokenizer, e.source, e.line) for e in examples]
    return _tokenize(rendered, [e.line for e in examples], None, tokenizer, settings or TokenizeSettings(),
                     [_templated(e.prompt, e.completions) for e in examples],
                     scores=[list(e.scores) for e in examples])


def truncate_ids(prompt_ids: list[int], completions: list[list[int]], max_length: int,
                 max_prompt_length: int | None, bos_id: int | None,
                 ) -> tuple[list[int], list[list[int]], bool]:
    """Apply the truncation rules; returns ``(prompt, completions, truncated)``.

    The prompt keeps its last ``max_prompt_length`` tokens, behind its leading BOS if it
    has one (the BOS counts towards the limit); each completion then keeps as many of its
    first tokens as fit in ``max_length`` after the prompt.
    """
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        truncated = True
        if bos_id is not None and prompt_ids[0] == bos_id:
            keep = max_prompt_length - 1
            prompt_ids = prompt_ids[:1] + (prompt_ids[-keep:] if keep > 0 else [])
        else:
            prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max(0, max_length - len(prompt_ids))
    if any(len(c) > budget for c in completions):
        truncated = True
        completions = [c[:budget] for c in completions]
    return prompt_ids, completions, truncated


def render_example(example: TokenizedExample, tokenizer: Any) -> str:
    """Show one example as the model sees it, marking what is trained.

    The prompt (masked: its tokens get no loss) is shown in ``[...]`` and each completion
    (trained) in ``«...»``, decoded with special tokens visible so a doubled BOS or a
    missing EOS shows up. Completions are decoded together with the prompt and then cut,
    so leading spaces look as they do in the real sequence. Output contains square
    brackets: print it without markup interpretation (e.g. rich's ``markup=False``).
    """
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    prompt_text = decode(example.prompt_ids)
    notes = [f"line {example.line}"]
    if example.truncated:
        notes.append("truncated")
    if example.label is not None:
        notes.append("desirable" if example.label else "undesirable")
    out = [f"example {example.index} ({', '.join(notes)})",
           f"  prompt    (masked, {len(example.prompt_ids)} tokens): [{prompt_text}]"]
    if example.scores is not None:
        names = [f"answer {i + 1}, score {score:g}" for i, score in enumerate(example.scores)]
    elif len(example.completions) == 2:
        names = ["chosen", "rejected"]
    else:
        names = [f"completion {i + 1}" if len(example.completions) > 1 else "completion"
                 for i in range(len(example.completions))]
    for name, ids in zip(names, example.completions):
        full = decode(example.prompt_ids + ids)
        text = full[len(prompt_text):] if full.startswith(prompt_text) else decode(ids)
        out.append(f"  {name:<9} (trained, {len(ids)} tokens): «{text}»")
    return "\n".join(out)


# --- rendering ------------------------------------------------------------------------

def _templated(prompt: Value, completions: list[Value]) -> bool:
    """True when the example is rendered through the chat template (see :func:`_render_texts`)."""
    return is_messages(prompt) or any(is_messages(c) for c in completions)


def _render_texts(prompt: Value, completions: list[Value], tokenizer: Any, source: str,
                  line: int) -> tuple[str, list[str]]:
    """The prompt text and completion texts, through the chat template for conversations."""
    if not is_messages(prompt) and not any(is_messages(c) for c in completions):
        return prompt, list(completions)  # type: ignore[return-value]
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the data is conversational but this tokenizer has no chat "
                         "template; pass --chat-template FILE or use a model whose tokenizer "
                         "has one, or convert the data to the standard string format")
    prompt_msgs = prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]
    prompt_text = _apply_template(tokenizer, prompt_msgs, True, source, line)
    texts = []
    for completion in completions:
        msgs = (completion if is_messages(completion)
                else [{"role": "assistant", "content": completion}])
        full = _apply_template(tokenizer, prompt_msgs + msgs, False, source, line)
        if not full.startswith(prompt_text):
            raise DataError("the chat template does not render the prompt as a prefix of "
                            "prompt + completion (rendered with the generation prompt: "
                            f"{prompt_text[-60:]!r}; with the completion: "
                            f"{full[:len(prompt_text)][-60:]!r}), so the completion tokens "
                            "cannot be separated; use a chat template whose generation "
                            "prompt matches how it renders assistant messages",
                            source=source, line=line)
        texts.append(full[len(prompt_text):])
    return prompt_text, texts


def _apply_template(tokenizer: Any, messages: list[dict], generation_prompt: bool,
                    source: str, line: int) -> str:
    """Render messages to text; template errors (e.g. role order) become DataErrors."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja raises its own types, including template-raised ones
        raise DataError(f"the chat template cannot render this conversation: {exc}",
                        source=source, line=line) from exc
    if not isinstance(text, str):
        raise ModelError("the tokenizer's apply_chat_template(tokenize=False) did not "
                         f"return text (got {type(text).__name__})")
    return text


# --- tokenization ---------------------------------------------------------------------

def _encode(tokenizer: Any, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """Batch-encode with the (fast) tokenizer: one call for the whole list.

    ``verbose=False`` silences the "longer than the model maximum" warning: lengths are
    handled by our own truncation, after the prompt/completion split is known.
    """
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False,
                        return_attention_mask=False, return_token_type_ids=False)
    return [list(ids) for ids in encoded["input_ids"]]


def _encode_prompts(tokenizer: Any, texts: list[str], specials: SpecialTokens,
                    ) -> list[list[int]]:
    """Encode texts that start a sequence: BOS once, no trailing post-processor tokens."""
    has_bos = [specials.bos_text is not None and t.startswith(specials.bos_text)
               for t in texts]
    result: list[list[int]] = [[] for _ in texts]
    for add_special in (True, False):
        idx = [i for i, b in enumerate(has_bos) if b != add_special]
        encoded = _encode(tokenizer, [texts[i] for i in idx], add_special_tokens=add_special)
        for i, ids in zip(idx, encoded):
            n = len(specials.suffix)
            if add_special and n and tuple(ids[-n:]) == specials.suffix:
                ids = ids[:-n]
            result[i] = ids
    return result


def _tokenize(rendered: list[tuple[str, list[str]]], lines: list[int],
              labels: list[bool] | None, tokenizer: Any, settings: TokenizeSettings,
              templated: list[bool] | None = None, scores: list[list[float]] | None = None,
              ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Shared path of the three public tokenize functions (see the module docstring)."""
    specials = SpecialTokens.of(tokenizer)
    turn_end = (_TurnEnd(tokenizer, specials)
                if settings.add_eos and templated and any(templated) else None)
    if settings.add_eos and specials.eos_id is None:
        raise ModelError("the tokenizer has no EOS token, so completions cannot be ended; "
                         "set one on the tokenizer or turn off add_eos")
    prompts = [prompt for prompt, _ in rendered]
    flat = [c for _, completions in rendered for c in completions]
    joined = [prompt + c for prompt, completions in rendered for c in completions]
    prompt_ids = _encode_prompts(tokenizer, prompts, specials)
    completion_ids = _encode(tokenizer, flat, add_special_tokens=False)
    joined_ids = _encode_prompts(tokenizer, joined, specials)

    stats = TokenizeStats(rows_read=len(rendered))
    examples: list[TokenizedExample] = []
    pos = 0
    for row, (_, completions) in enumerate(rendered):
        span = range(pos, pos + len(completions))
        pos += len(completions)
        prompt = prompt_ids[row]
        if any(joined_ids[j] != prompt + completion_ids[j] for j in span):
            stats.boundary_merges += 1
        closed = ([turn_end.cut(completion_ids[j]) for j in span]
                  if turn_end is not None and templated is not None and templated[row]
                  else [None for _ in span])
        comps = [ids if ids is not None else _with_eos(completion_ids[j], specials.eos_id, settings.add_eos)
                 for j, ids in zip(span, closed)]
        identical_before = len(comps) == 2 and comps[0] == comps[1]
        prompt, comps, truncated = truncate_ids(prompt, comps, settings.max_length,
                                                settings.max_prompt_length, specials.bos_id)
        reason = _drop_reason(comps, identical_before)
        if reason is None and scores is not None and len(set(scores[row])) == 1:
            reason = DROP_TIED
        if reason is not None:
            stats.dropped[reason] = stats.dropped.get(reason, 0) + 1
            continue
        stats.truncated_rows += truncated
        examples.append(TokenizedExample(prompt_ids=prompt, completions=comps,
                                         index=len(examples), line=lines[row],
                                         label=None if labels is None else labels[row],
                                         truncated=truncated,
                                         scores=None if scores is None else scores[row]))
    stats.rows_kept = len(examples)
    return examples, stats


def _with_eos(ids: list[int], eos_id: int | None, add_eos: bool) -> list[int]:
    """``ids`` ending in exactly one EOS (when asked), without doubling an existing one."""
    if not add_eos or eos_id is None or (ids and ids[-1] == eos_id):
        return ids
    return ids + [eos_id]


class _TurnEnd:
    """Finds the end-of-turn token a chat template closes a completion with.

    A rendered conversational completion "ends its turn" when its last token, after any
    tokens that decode to whitespace only, is a special token of the tokenizer (other than
    BOS and UNK): ``<|im_end|>`` and a newline for Qwen, ``<|eot_id|>`` for Llama 3,
    the EOS itself for templates that write it.
    """

    def __init__(self, tokenizer: Any, specials: SpecialTokens) -> None:
        ids = set(getattr(tokenizer, "all_special_ids", None) or [])
        for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(added, "special", False):
                ids.add(int(tid))
        ids.discard(specials.bos_id)
        ids.discard(getattr(tokenizer, "unk_token_id", None))
        self.special = ids
        self.tokenizer = tokenizer
        self._blank: dict[int, bool] = {}

    def blank(self, tid: int) -> bool:
        if tid not in self._blank:
            text = self.tokenizer.decode([tid], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            self._blank[tid] = tid not in self.special and text != "" and not text.strip()
        return self._blank[tid]

    def cut(self, ids: list[int]) -> list[int] | None:
        """``ids`` up to and including their closing end-of-turn token, or None if they have none."""
        end = len(ids)
        while end and self.blank(ids[end - 1]):
            end -= 1
        if end and ids[end - 1] in self.special:
            return ids[:end]
        return None


def _drop_reason(completions: list[list[int]], identical_before: bool) -> str | None:
    """Why a truncated example is useless for training, or None if it is fine."""
    if any(not c for c in completions):
        return DROP_EMPTY
    if len(completions) == 2 and completions[0] == completions[1]:
        return DROP_IDENTICAL if identical_before else DROP_IDENTICAL_AFTER_TRUNCATION
    return None
