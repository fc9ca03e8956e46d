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
* Conversations are rendered with the tokenizer's chat template (given the row's ``tools``
  and ``chat_template_kwargs``): the prompt with the generation prompt, prompt +
  completion without it; the completion text is what the second adds to the first.
* A completion of several messages is trained on whole by default. With
  ``all_assistant_turns`` only its assistant turns are (each closed by its end-of-turn
  token, as above); the user and tool turns between them stay in the sequence, masked
  (``TokenizedExample.completion_masks``). Turns are found by rendering the conversation
  up to each message, which must give a prefix of the whole rendering.
* Truncation keeps the prompt's end (the most recent turns, nearest the answer) behind
  its BOS, and each completion's start (masks are cut with it). Pairs left degenerate (an
  empty completion, one with no trained token left, or chosen and rejected identical) are
  dropped and counted by reason.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from prefopt.data.formats import (PreferencePair, RankedExample, SFTExample, UnpairedExample, Value,
                                  is_messages)
from prefopt.errors import ConfigError, DataError, ModelError

DROP_EMPTY = "empty completion"
DROP_IDENTICAL = "chosen==rejected"
DROP_IDENTICAL_AFTER_TRUNCATION = "chosen==rejected after truncation"
DROP_TIED = "every answer scored the same"
DROP_UNTRAINED = "no trained token left"

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
    # per completion, which tokens are scored (False: context only, e.g. a user turn between two
    # assistant turns); None when every completion token is
    completion_masks: list[list[bool]] | None = None

    def scored(self, j: int) -> list[bool]:
        """Which tokens of completion ``j`` are scored."""
        if self.completion_masks is None:
            return [True] * len(self.completions[j])
        return self.completion_masks[j]


@dataclass
class TokenizeSettings:
    """Length limits (in tokens), whether to end completions with EOS, which turns are trained."""

    max_length: int = 1024
    max_prompt_length: int | None = 512
    add_eos: bool = True
    all_assistant_turns: bool = False   # score every assistant turn of a completion, mask the turns between

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
    settings = settings or TokenizeSettings()
    rendered = [_render_texts(p, [p.chosen, p.rejected], tokenizer, settings.all_assistant_turns)
                for p in pairs]
    return _tokenize(rendered, [p.line for p in pairs], None, tokenizer, settings)


def tokenize_sft(examples: Sequence[SFTExample], tokenizer: Any,
                 settings: TokenizeSettings | None = None,
                 ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize supervised examples; each example has one completion."""
    settings = settings or TokenizeSettings()
    rendered = [_render_texts(e, [e.completion], tokenizer, settings.all_assistant_turns)
                for e in examples]
    return _tokenize(rendered, [e.line for e in examples], None, tokenizer, settings)


def tokenize_unpaired(examples: Sequence[UnpairedExample], tokenizer: Any,
                      settings: TokenizeSettings | None = None,
                      ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize KTO examples; each has one completion and its ``label``."""
    settings = settings or TokenizeSettings()
    rendered = [_render_texts(e, [e.completion], tokenizer, settings.all_assistant_turns)
                for e in examples]
    return _tokenize(rendered, [e.line for e in examples], [e.label for e in examples],
                     tokenizer, settings)


def tokenize_ranked(examples: Sequence[RankedExample], tokenizer: Any,
                    settings: TokenizeSettings | None = None,
                    ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize K-answer examples; completions keep the row's order, ``scores`` beside them.

    A row whose answers all have the same score says nothing about which is better, so it
    is dropped (counted as ``every answer scored the same``).
    """
    settings = settings or TokenizeSettings()
    rendered = [_render_texts(e, e.completions, tokenizer, settings.all_assistant_turns) for e in examples]
    return _tokenize(rendered, [e.line for e in examples], None, tokenizer, settings,
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


def cut_masks(masks: list[list[bool]] | None, completions: list[list[int]]) -> list[list[bool]] | None:
    """Completion masks cut to ``completions``, each a start of the completion its mask was made for
    (as truncation and the fast-path check's shortened rows leave them)."""
    return None if masks is None else [m[:len(c)] for m, c in zip(masks, completions)]


def truncate_example(example: TokenizedExample, max_length: int, max_prompt_length: int | None,
                     bos_id: int | None) -> TokenizedExample:
    """:func:`truncate_ids` applied to an example, its completion masks cut along."""
    prompt, comps, truncated = truncate_ids(example.prompt_ids, example.completions, max_length,
                                            max_prompt_length, bos_id)
    return replace(example, prompt_ids=prompt, completions=comps, truncated=example.truncated or truncated,
                   completion_masks=cut_masks(example.completion_masks, comps))


def render_example(example: TokenizedExample, tokenizer: Any) -> str:
    """Show one example as the model sees it, marking what is trained.

    The prompt (masked: its tokens get no loss) is shown in ``[...]`` and each completion
    (trained) in ``«...»``, with the turns inside it that are masked (``all_assistant_turns``)
    in ``[...]`` again, decoded with special tokens visible so a doubled BOS or a missing EOS
    shows up. Completions are decoded together with the prompt and then cut, so leading
    spaces look as they do in the real sequence. Output contains square brackets: print it
    without markup interpretation (e.g. rich's ``markup=False``).
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
    for j, (name, ids) in enumerate(zip(names, example.completions)):
        mask = example.scored(j)
        pieces = []
        for start, end, trained in _runs(mask):
            before = decode(example.prompt_ids + ids[:start])
            upto = decode(example.prompt_ids + ids[:end])
            text = upto[len(before):] if upto.startswith(before) else decode(ids[start:end])
            pieces.append(text if trained else f"[{text}]")
        count = f"{len(ids)} tokens" if all(mask) else f"{sum(mask)} of {len(ids)} tokens"
        out.append(f"  {name:<9} (trained, {count}): «{''.join(pieces)}»")
    return "\n".join(out)


def _runs(mask: list[bool]) -> list[tuple[int, int, bool]]:
    """``mask`` as maximal runs ``(start, end, value)``."""
    runs: list[tuple[int, int, bool]] = []
    for k, value in enumerate(mask):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], k + 1, value)
        else:
            runs.append((k, k + 1, value))
    return runs


# --- rendering ------------------------------------------------------------------------

def _templated(prompt: Value, completions: list[Value]) -> bool:
    """True when the example is rendered through the chat template (see :func:`_render_texts`)."""
    return is_messages(prompt) or any(is_messages(c) for c in completions)


@dataclass
class _Rendered:
    """One example as text, and which characters of each completion text are trained."""

    prompt: str
    completions: list[str]
    templated: bool                            # rendered through the chat template
    trained: list[list[tuple[int, int]] | None]  # per completion: trained [start, end) spans; None = all


def _render_texts(example: Any, completions: list[Value], tokenizer: Any, turns: bool) -> _Rendered:
    """The prompt text and completion texts, through the chat template for conversations.

    ``example`` supplies the prompt, the row's template inputs and its place (for errors).
    ``turns``: find the assistant turns of completions of several messages, which alone are
    trained (see :func:`_assistant_spans`).
    """
    prompt = example.prompt
    if not _templated(prompt, completions):
        return _Rendered(prompt, list(completions), False, [None] * len(completions))
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the data is conversational but this tokenizer has no chat "
                         "template; pass --chat-template FILE or use a model whose tokenizer "
                         "has one, or convert the data to the standard string format")

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return _apply_template(tokenizer, messages, generation_prompt, example.source, example.line,
                               tools=example.tools, template_kwargs=example.chat_template_kwargs)

    prompt_msgs = prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]
    prompt_text = render(prompt_msgs, True)
    texts, trained = [], []
    for completion in completions:
        msgs = (completion if is_messages(completion)
                else [{"role": "assistant", "content": completion}])
        full = render(prompt_msgs + msgs, False)
        if not full.startswith(prompt_text):
            raise DataError("the chat template does not render the prompt as a prefix of "
                            "prompt + completion (rendered with the generation prompt: "
                            f"{prompt_text[-60:]!r}; with the completion: "
                            f"{full[:len(prompt_text)][-60:]!r}), so the completion tokens "
                            "cannot be separated; use a chat template whose generation "
                            "prompt matches how it renders assistant messages",
                            source=example.source, line=example.line)
        texts.append(full[len(prompt_text):])
        trained.append(_assistant_spans(render, prompt_msgs, msgs, full, len(prompt_text), example)
                       if turns and (len(msgs) > 1 or msgs[0]["role"] != "assistant") else None)
    return _Rendered(prompt_text, texts, True, trained)


def _assistant_spans(render: Callable[[list[dict], bool], str], prompt_msgs: list[dict], msgs: list[dict],
                     full: str, offset: int, example: Any) -> list[tuple[int, int]]:
    """Where each assistant message of a completion lies in its text (``full[offset:]``).

    Assistant message ``i`` starts where the conversation up to it, rendered with the
    generation prompt, ends (so its header is context, as the prompt's is) and ends where
    the conversation up to and including it ends. Both must be prefixes of ``full``: a
    template that renders earlier turns differently once later ones follow (some drop the
    reasoning of earlier turns) gives no such positions, and the row is refused.
    """
    spans = []
    for i, message in enumerate(msgs):
        if message["role"] != "assistant":
            continue
        start = offset if i == 0 else len(_prefix_of(full, render(prompt_msgs + msgs[:i], True), i, example))
        end = len(_prefix_of(full, render(prompt_msgs + msgs[:i + 1], False), i + 1, example))
        spans.append((start - offset, end - offset))
    return spans


def _prefix_of(full: str, part: str, messages: int, example: Any) -> str:
    """``part``, checked to be how ``full`` starts."""
    if not full.startswith(part):
        raise DataError(f"--all-assistant-turns: the chat template renders the completion's first {messages} "
                        "message(s) differently from how the whole conversation starts "
                        f"({part[-60:]!r} against {full[:len(part)][-60:]!r}), so its assistant turns "
                        "cannot be told apart; templates that rewrite earlier turns (dropping their "
                        "reasoning, say) do this: pass --chat-template with one that does not, or train "
                        "on whole completions", source=example.source, line=example.line)
    return part


def _apply_template(tokenizer: Any, messages: list[dict], generation_prompt: bool,
                    source: str, line: int, *, tools: list[dict] | None = None,
                    template_kwargs: dict | None = None) -> str:
    """Render messages to text; template errors (e.g. role order) become DataErrors.

    ``tools`` and ``template_kwargs`` (a row's ``chat_template_kwargs``, such as
    ``enable_thinking``) reach the template the way ``apply_chat_template`` takes them.
    """
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=generation_prompt,
                                             **(template_kwargs or {}))
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


def _encode_with_offsets(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """:func:`_encode` without special tokens, with each token's character span in its text: the ids
    are those of a plain encode, the spans say which turn each token belongs to."""
    if not texts:
        return [], []
    try:
        encoded = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False,
                            return_token_type_ids=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise ModelError("--all-assistant-turns needs a fast tokenizer (one that reports where each token "
                         "lies in the text); this one is a slow, Python tokenizer") from None
    return ([list(ids) for ids in encoded["input_ids"]],
            [[tuple(span) for span in spans] for spans in encoded["offset_mapping"]])


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


def _tokenize(rendered: list[_Rendered], lines: list[int], labels: list[bool] | None, tokenizer: Any,
              settings: TokenizeSettings, scores: list[list[float]] | None = None,
              ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Shared path of the public tokenize functions (see the module docstring)."""
    specials = SpecialTokens.of(tokenizer)
    turn_end = (_TurnEnd(tokenizer, specials)
                if settings.add_eos and any(r.templated for r in rendered) else None)
    if settings.add_eos and specials.eos_id is None:
        raise ModelError("the tokenizer has no EOS token, so completions cannot be ended; "
                         "set one on the tokenizer or turn off add_eos")
    flat = [c for r in rendered for c in r.completions]
    prompt_ids = _encode_prompts(tokenizer, [r.prompt for r in rendered], specials)
    if any(spans is not None for r in rendered for spans in r.trained):
        completion_ids, offsets = _encode_with_offsets(tokenizer, flat)
    else:
        completion_ids, offsets = _encode(tokenizer, flat, add_special_tokens=False), None
    joined_ids = _encode_prompts(tokenizer, [r.prompt + c for r in rendered for c in r.completions],
                                 specials)

    stats = TokenizeStats(rows_read=len(rendered))
    examples: list[TokenizedExample] = []
    pos = 0
    for row, r in enumerate(rendered):
        span = range(pos, pos + len(r.completions))
        pos += len(r.completions)
        prompt = prompt_ids[row]
        if any(joined_ids[j] != prompt + completion_ids[j] for j in span):
            stats.boundary_merges += 1
        closed = [_closed(completion_ids[j],
                          None if spans is None else _turn_mask(offsets[j], spans, completion_ids[j], turn_end),
                          turn_end if r.templated else None, specials.eos_id, settings.add_eos)
                  for j, spans in zip(span, r.trained)]
        comps = [ids for ids, _ in closed]
        masks = ([mask if mask is not None else [True] * len(ids) for ids, mask in closed]
                 if any(mask is not None and not all(mask) for _, mask in closed) else None)
        identical_before = len(comps) == 2 and comps[0] == comps[1]
        prompt, comps, truncated = truncate_ids(prompt, comps, settings.max_length,
                                                settings.max_prompt_length, specials.bos_id)
        masks = cut_masks(masks, comps)
        reason = _drop_reason(comps, identical_before, masks)
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
                                         scores=None if scores is None else scores[row],
                                         completion_masks=masks))
    stats.rows_kept = len(examples)
    return examples, stats


def _turn_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], ids: list[int],
               turn_end: _TurnEnd | None) -> list[bool]:
    """Which tokens of a completion its assistant turns hold: a token belongs to the turn its
    first character lies in. Like a completion, each turn ends at its end-of-turn token: the
    whitespace a template writes after that token is context, not trained."""
    mask = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    if turn_end is not None:
        for start, end, trained in _runs(mask):
            cut = turn_end.cut(ids[start:end]) if trained else None
            if cut is not None:
                mask[start + len(cut):end] = [False] * (end - start - len(cut))
    return mask


def _closed(ids: list[int], mask: list[bool] | None, turn_end: _TurnEnd | None, eos_id: int | None,
            add_eos: bool) -> tuple[list[int], list[bool] | None]:
    """A completion ended as the module docstring says, and its mask (None: all trained).

    Masked tokens at the end (a trailing user turn) are dropped first: nothing after the last
    trained token changes a log-prob the loss reads, and the completion then closes at its last
    assistant turn's end."""
    if mask is not None:
        if not any(mask):
            return ids, mask  # no assistant turn: dropped, counted as such
        while not mask[-1]:
            mask = mask[:-1]
        ids = ids[:len(mask)]
    cut = turn_end.cut(ids) if turn_end is not None else None
    if cut is not None:
        return cut, None if mask is None else mask[:len(cut)]
    ended = _with_eos(ids, eos_id, add_eos)
    return ended, None if mask is None else mask + [True] * (len(ended) - len(ids))


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


def _drop_reason(completions: list[list[int]], identical_before: bool,
                 masks: list[list[bool]] | None = None) -> str | None:
    """Why a truncated example is useless for training, or None if it is fine."""
    if any(not c for c in completions):
        return DROP_EMPTY
    if masks is not None and not all(any(m) for m in masks):
        return DROP_UNTRAINED
    if len(completions) == 2 and completions[0] == completions[1]:
        return DROP_IDENTICAL if identical_before else DROP_IDENTICAL_AFTER_TRUNCATION
    return None
