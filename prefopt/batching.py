"""Lay tokenized examples out as packed rows for one forward pass.

A DPO step needs log pi(y|x) for every completion of every example. The naive layout
(TRL's) pads [prompt|chosen] and [prompt|rejected] to one common length, so the prompt
is computed twice and up to half the slots are padding. Here:

* **Prefix sharing.** An example with several completions is one *segment*
  ``[prompt | c_1 | c_2 | ...]``. The attention mask lets each completion see the
  prompt and itself only, and positions restart after the prompt for each
  completion, so every completion sees exactly what it would see alone. The prompt
  is computed once.
* **Packing.** Segments are packed first-fit-decreasing into rows no longer than the
  longest segment of the micro-batch; the mask is block-diagonal across segments.
  Rows are therefore never longer than an unpacked padded batch would be, and there
  are fewer of them.
* **A gather plan.** For every scored completion token we record which hidden state
  predicts it (the previous position, or the prompt's last token for a completion's first
  token), its target id, and the sequence it belongs to. The LM head then runs on
  those positions only (see :mod:`prefopt.logprobs`). A completion's masked tokens (the
  user turns between its assistant turns, ``TokenizedExample.completion_masks``) are in
  the row as context and get no entry.

Switching either technique off gives the plain layouts, which are kept for the
benchmark's ablations and as the reference in the equivalence tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from prefopt.data.tokenize import TokenizedExample


@dataclass
class PackedBatch:
    """Tensors for one micro-batch.

    Sequences are numbered ``example_slot * num_completions + j``: for preference pairs,
    even ids are chosen completions and odd ids rejected ones.
    """

    input_ids: torch.Tensor        # [R, L] long
    position_ids: torch.Tensor     # [R, L] long
    seg_ids: torch.Tensor          # [R, L] long, row-local segment number, -1 = padding
    part_ids: torch.Tensor         # [R, L] long, 0 = prompt, j + 1 = the segment's completion j
    hidden_index: torch.Tensor     # [T] flat index (r * L + position) of the predicting hidden state
    target_ids: torch.Tensor       # [T] the completion token to score
    token_seq: torch.Tensor        # [T] sequence id of each scored token
    token_pos: torch.Tensor        # [T] 0-based position of the token among its completion's scored tokens
    num_seqs: int
    num_completions: int
    example_index: torch.Tensor    # [E] dataset index of each example in the batch
    labels: torch.Tensor | None    # [E] bool, KTO rows only
    real_tokens: int               # tokens computed that are not padding
    slots: int                     # R * L, padding included
    # per row, every segment as (start, prompt length, completion lengths): the mask in a form
    # attention kernels can use to skip what it hides (see prefopt.attention)
    segments: tuple[tuple[tuple[int, int, tuple[int, ...]], ...], ...] = ()
    # one [prompt | completion] per row, right-padded, with a 2-D padding mask: the layout every causal
    # LM understands, run through the model's own forward (see prefopt.logprobs and prefopt.fastpath)
    plain: bool = False
    # [E, K] float32, K-answer data only: each completion's score, NaN for a filler completion
    scores: torch.Tensor | None = None

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[R, 1, L, L]`` bool, True = may attend (``[R, L]``, the real positions, when plain).

        Built on demand from the per-token layout: a kernel that reads the layout itself (block
        attention, FlexAttention's block masks) never pays for the dense ``L x L`` mask.
        """
        seg, part = self.seg_ids, self.part_ids
        if self.plain:
            return seg >= 0
        L = seg.shape[1]
        same_seg = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        causal = torch.ones(L, L, dtype=torch.bool, device=seg.device).tril()
        visible_part = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
        mask = same_seg & causal & visible_part
        mask |= torch.eye(L, dtype=torch.bool, device=seg.device)  # padding attends to itself: no all-masked rows
        return mask[:, None]

    @property
    def num_examples(self) -> int:
        return int(self.example_index.numel())

    @property
    def head_rows(self) -> torch.Tensor:
        """The distinct flat positions whose final hidden state the LM head reads.

        ``hidden_index`` repeats a prompt's last position once per completion (prefix sharing);
        code that works per position, not per read, needs each position once.
        """
        return torch.unique(self.hidden_index)

    @property
    def real_positions(self) -> torch.Tensor:
        """``[R, L]`` bool: True where a row holds a token, False on its padding (segments start at 0)."""
        R, L = self.input_ids.shape
        used = torch.tensor([sum(p + sum(c) for _, p, c in row) for row in self.segments], dtype=torch.long,
                            device=self.input_ids.device)
        return torch.arange(L, device=used.device)[None, :] < used[:, None]

    def to(self, device: torch.device | str) -> "PackedBatch":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedBatch(**moved)


def _segments(examples: list["TokenizedExample"], prefix_sharing: bool,
              group: bool) -> tuple[list[list[tuple[int, list[int], int]]], dict[int, int]]:
    """Split examples into segments; each segment is a list of parts (seq_id or -1 for prompt, ids, part_no).

    With ``group`` (and prefix sharing), examples whose prompt ids are equal share one segment
    ``[prompt | their completions ...]``, and a completion equal to one already in the segment is not
    laid out again: the second dict maps its sequence id to the id of the copy it is scored from.
    """
    n_comp = len(examples[0].completions)
    segments: list[list[tuple[int, list[int], int]]] = []
    alias: dict[int, int] = {}
    by_prompt: dict[tuple[int, ...], tuple[list, dict[tuple[int, ...], int]]] = {}
    for slot, ex in enumerate(examples):
        if len(ex.completions) != n_comp:
            raise ValueError("all examples of a batch must have the same number of completions")
        if not ex.prompt_ids:
            raise ValueError(f"example at line {ex.line} has an empty prompt: the first completion token "
                             "has no position to be predicted from")
        if not prefix_sharing:
            segments.extend([(-1, ex.prompt_ids, 0), (slot * n_comp + j, c, 1)] for j, c in enumerate(ex.completions))
            continue
        key = tuple(ex.prompt_ids)
        if not group or key not in by_prompt:
            by_prompt[key] = ([(-1, ex.prompt_ids, 0)], {})
            segments.append(by_prompt[key][0])
        seg, laid = by_prompt[key]
        for j, c in enumerate(ex.completions):
            seq = slot * n_comp + j
            same = (tuple(c), _mask_key(ex, j))  # a copy is scored from the first: same tokens, same mask
            if group and same in laid:
                alias[seq] = laid[same]
                continue
            laid[same] = seq
            seg.append((seq, c, len(seg)))
    return segments, alias


def _mask_key(ex: "TokenizedExample", j: int) -> tuple[bool, ...] | None:
    """Completion ``j``'s mask as a key, None when every token is scored (examples without
    ``completion_masks`` -- any object with prompt ids and completions -- score every token)."""
    masks = getattr(ex, "completion_masks", None)
    return None if masks is None or all(masks[j]) else tuple(masks[j])


def _scored(examples: list["TokenizedExample"], seq: int) -> range | list[int]:
    """The indices of sequence ``seq``'s scored tokens (all of them unless its example masks some)."""
    slot, j = divmod(seq, len(examples[0].completions))
    ex = examples[slot]
    masks = getattr(ex, "completion_masks", None)
    if masks is None:
        return range(len(ex.completions[j]))
    if len(masks[j]) != len(ex.completions[j]):
        raise ValueError(f"example at line {ex.line}: completion {j} has {len(masks[j])} mask entries "
                         f"for {len(ex.completions[j])} tokens")
    return [k for k, keep in enumerate(masks[j]) if keep]


def _pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of segment indices into rows of ``capacity`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def collate(
    examples: list["TokenizedExample"],
    *,
    pad_token_id: int,
    prefix_sharing: bool = True,
    packing: bool = True,
    pad_to_multiple_of: int = 1,
    plain: bool = False,
    capacity: int | None = None,
    group_prompts: bool = True,
) -> PackedBatch:
    """Build a :class:`PackedBatch` from examples that all have the same number of completions.

    ``plain`` lays out one sequence per row with a 2-D padding mask (no prefix sharing, no
    packing): the fallback for models whose attention cannot take prefopt's 4-D masks.
    ``capacity``: the longest a packed row may be (default: the longest segment, so rows are never
    longer than a padded batch would be). ``group_prompts``: examples of the batch with the same
    prompt share one segment and a completion repeated among them is computed once (its tokens are
    scored again from the first copy's hidden states); log-probs are those of the ungrouped layout.
    """
    if plain:
        prefix_sharing = packing = False
    segments, alias = _segments(examples, prefix_sharing, group_prompts)
    seg_len = [sum(len(ids) for _, ids, _ in seg) for seg in segments]
    capacity = max(max(seg_len), capacity or 0)
    rows = _pack(seg_len, capacity) if packing else [[i] for i in range(len(segments))]
    L = -(-max(sum(seg_len[i] for i in row) for row in rows) // pad_to_multiple_of) * pad_to_multiple_of
    R = len(rows)

    input_ids = torch.full((R, L), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    seg_id = torch.full((R, L), -1, dtype=torch.long)   # row-local segment number, -1 = padding
    part_id = torch.zeros((R, L), dtype=torch.long)     # 0 = prompt, j + 1 = completion j
    hidden_index: list[int] = []
    target_ids: list[int] = []
    token_seq: list[int] = []
    token_pos: list[int] = []
    layout: list[tuple[tuple[int, int, tuple[int, ...]], ...]] = []
    plan: dict[int, list[int]] = {}  # sequence id -> the flat positions predicting its tokens

    for r, row in enumerate(rows):
        cursor = 0
        row_layout = []
        for local, s in enumerate(row):
            seg = segments[s]
            prompt_ids = seg[0][1]
            prompt_start, P = cursor, len(prompt_ids)
            row_layout.append((cursor, P, tuple(len(ids) for _, ids, _ in seg[1:])))
            for seq, ids, part in seg:
                n = len(ids)
                sl = slice(cursor, cursor + n)
                input_ids[r, sl] = torch.tensor(ids, dtype=torch.long)
                start_pos = 0 if part == 0 else P
                position_ids[r, sl] = torch.arange(start_pos, start_pos + n)
                seg_id[r, sl] = local
                part_id[r, sl] = part
                if part != 0:
                    # token k is predicted by the hidden state before it; token 0 by the prompt's last.
                    preds = [prompt_start + P - 1] + list(range(cursor, cursor + n - 1))
                    keep = _scored(examples, seq)
                    plan[seq] = [r * L + preds[k] for k in keep]
                    hidden_index.extend(plan[seq])
                    target_ids.extend(ids[k] for k in keep)
                    token_seq.extend([seq] * len(keep))
                    token_pos.extend(range(len(keep)))
                cursor += n
        layout.append(tuple(row_layout))
    for seq, source in sorted(alias.items()):  # a repeated completion: scored again from its first copy
        slot, j = divmod(source, len(examples[0].completions))
        ids = examples[slot].completions[j]
        keep = _scored(examples, source)
        hidden_index.extend(plan[source])
        target_ids.extend(ids[k] for k in keep)
        token_seq.extend([seq] * len(keep))
        token_pos.extend(range(len(keep)))

    labels = None
    if examples[0].label is not None:
        labels = torch.tensor([bool(ex.label) for ex in examples])
    scores = None
    if getattr(examples[0], "scores", None) is not None:
        scores = torch.tensor([ex.scores for ex in examples], dtype=torch.float32)
    n_comp = len(examples[0].completions)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        seg_ids=seg_id,
        part_ids=part_id,
        hidden_index=torch.tensor(hidden_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        token_seq=torch.tensor(token_seq, dtype=torch.long),
        token_pos=torch.tensor(token_pos, dtype=torch.long),
        num_seqs=len(examples) * n_comp,
        num_completions=n_comp,
        example_index=torch.tensor([ex.index for ex in examples], dtype=torch.long),
        labels=labels,
        real_tokens=int(sum(seg_len)),
        slots=R * L,
        segments=tuple(layout),
        plain=plain,
        scores=scores,
    )


def prompt_groups(examples: list["TokenizedExample"]) -> list[list[int]]:
    """Indices of the examples, grouped by equal prompt ids, groups in order of first appearance.

    Data with several pairs per prompt (UltraFeedback-binarized, sampled pairs) keeps each prompt's
    rows together this way, so :func:`collate` can compute the prompt once for all of them."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(tuple(ex.prompt_ids), []).append(i)
    return list(groups.values())


def padded_token_count(example: "TokenizedExample") -> int:
    """Tokens a padded trainer feeds for this example: the prompt once per completion.

    The benchmark counts throughput this way for every trainer, so numbers compare.
    """
    return sum(len(example.prompt_ids) + len(c) for c in example.completions)


def split_rows(batch: PackedBatch) -> list[PackedBatch]:
    """The rows of ``batch`` as batches of one row each, cut to the row's own length.

    Log-probs are unchanged (every sequence sees the same tokens at the same positions),
    padding disappears, and a trainer that runs forward + backward row by row holds the
    activations of one row at a time instead of the whole micro-batch. Valid only when
    every example lies within one row, as with prefix sharing; otherwise (or for a
    single row) the batch comes back whole, as ``[batch]``.
    """
    R, L = batch.input_ids.shape
    if R == 1:
        return [batch]
    n_comp = batch.num_completions
    row_of_token = torch.div(batch.hidden_index, L, rounding_mode="floor")
    slot_of_token = torch.div(batch.token_seq, n_comp, rounding_mode="floor")
    n_ex = batch.num_examples
    rows_of_slot = torch.zeros(n_ex, R, dtype=torch.bool, device=row_of_token.device)
    rows_of_slot[slot_of_token, row_of_token] = True
    if bool((rows_of_slot.sum(1) != 1).any()):
        return [batch]
    parts = []
    for r in range(R):
        n = sum(prompt + sum(comps) for _, prompt, comps in batch.segments[r])  # the row without its padding
        sel = (row_of_token == r).nonzero().squeeze(1)
        slots = rows_of_slot[:, r].nonzero().squeeze(1)
        local = torch.full((n_ex,), -1, dtype=torch.long, device=slots.device)
        local[slots] = torch.arange(slots.numel(), device=slots.device)
        seq = batch.token_seq[sel]
        parts.append(PackedBatch(
            input_ids=batch.input_ids[r:r + 1, :n],
            position_ids=batch.position_ids[r:r + 1, :n],
            seg_ids=batch.seg_ids[r:r + 1, :n],
            part_ids=batch.part_ids[r:r + 1, :n],
            hidden_index=batch.hidden_index[sel] - r * L,
            target_ids=batch.target_ids[sel],
            token_seq=local[torch.div(seq, n_comp, rounding_mode="floor")] * n_comp + seq % n_comp,
            token_pos=batch.token_pos[sel],
            num_seqs=int(slots.numel()) * n_comp,
            num_completions=n_comp,
            example_index=batch.example_index[slots],
            labels=batch.labels[slots] if batch.labels is not None else None,
            real_tokens=n,
            slots=n,
            segments=batch.segments[r:r + 1],
            plain=batch.plain,
            scores=batch.scores[slots] if batch.scores is not None else None,
        ))
    return parts
