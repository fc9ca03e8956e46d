"""Block attention for GPUs: FlexAttention with a block mask read from the segment layout.

:mod:`prefopt.attention` skips what a packed, prefix-shared row's mask hides by calling SDPA
once or twice per segment. On a CPU that measures best; on a GPU a Python loop of small kernel
launches per segment and per layer is slow, and the dense ``[rows, L, L]`` mask it falls back on
is built on the host every step. Here the mask is a ``mask_mod`` over three per-token vectors
(segment, -1 on padding; part; position), and FlexAttention's ``BlockMask``
made from it lets one fused kernel per layer skip every fully hidden 128 x 128 block: no loop,
no dense mask on the host. The block mask is built once per forward (on the batch's device) and
shared by every layer of its kind; sliding windows and attention chunks are part of it, counted
in each sequence's own positions, exactly as :func:`prefopt.logprobs.layer_masks` does.

Rows are padded inside the attention call to a whole number of blocks (the padding attends only
to itself and is cut off again): torch's compiled CPU kernel gives wrong values when a length is
not a multiple of the block size (seen with torch 2.13), and on a GPU the kernel's tail handling
is then never exercised. Soft-capping becomes a ``score_mod``; attention sinks and position
biases are refused (the check then keeps another kernel).

Registered with transformers as the attention implementation ``prefopt_flex``; without a block
mask (generation, a model that builds its own mask) the call goes to transformers' SDPA function
unchanged. Chosen automatically on CUDA by :func:`prefopt.attention.use_segment_attention`, and
like every fast path proven against the plain computation on the model at hand by
:mod:`prefopt.fastpath` before it is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from prefopt.attention import mask_restrictions, register_implementation

NAME = "prefopt_flex"
BLOCK = 128


def available() -> bool:
    """FlexAttention importable (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _padded(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[1]), value=value)


def block_masks(config, seg_ids: torch.Tensor, part_ids: torch.Tensor, positions: torch.Tensor):
    """The BlockMask (or a dict of them by layer type) for rows laid out as ``seg_ids``/``part_ids``.

    ``seg_ids``: [R, L], the row-local segment of each token, -1 on padding; ``part_ids``: 0 for a
    segment's prompt, j + 1 for its completion j; ``positions``: the model's position ids. The mask
    has the length padded to a multiple of :data:`BLOCK`; padded and padding queries see themselves.
    Which blocks are hidden, partly or fully visible is found by :func:`block_layout` on the blocks
    that can see anything, not on a dense [R, L, L] mask.
    """
    R, L = seg_ids.shape
    Lp = -(-L // BLOCK) * BLOCK
    seg, part, pos = _padded(seg_ids, Lp, -1), _padded(part_ids, Lp, 0), _padded(positions, Lp, 0)

    def mod_for(window: int | None, chunk: int | None):
        def mask_mod(b, h, q, kv):
            sees = (seg[b, q] == seg[b, kv]) & (seg[b, q] >= 0) & (kv <= q)
            sees = sees & ((part[b, kv] == 0) | (part[b, q] == part[b, kv]))
            if window is not None:
                sees = sees & (pos[b, q] - pos[b, kv] < window)
            if chunk is not None:
                sees = sees & (pos[b, q] // chunk == pos[b, kv] // chunk)
            return sees | (q == kv)
        return _from_blocks(*block_layout(mask_mod, seg), mask_mod, Lp)

    kinds = mask_restrictions(config)
    if not isinstance(kinds, dict):
        return mod_for(*kinds)
    made = {r: mod_for(*r) for r in set(kinds.values())}  # layer types that see the same share one mask
    return {k: made[r] for k, r in kinds.items()}


# (query, key) pairs evaluated at once when the blocks are classified: 256 block pairs of 128 x 128.
CLASSIFY_ELEMENTS = 1 << 22


def _segment_bounds(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of each row, the least and the greatest segment of its real tokens ([R, blocks]
    each; least > greatest where a block is all padding)."""
    R, Lp = seg.shape
    v = seg.view(R, Lp // BLOCK, BLOCK)
    real = v >= 0
    big = torch.iinfo(seg.dtype).max
    return torch.where(real, v, big).amin(-1), torch.where(real, v, -big).amax(-1)


def block_layout(mask_mod, seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full): [R, 1, blocks, blocks] booleans of the (query block, key block) pairs where
    ``mask_mod`` hides some but not all pairs, and where it hides none; the kernel skips the rest.

    The same classification as torch's ``create_block_mask``, which evaluates ``mask_mod`` at every
    (query, key) of every row at once ([R, L, L] elements and their temporaries: ~1 GiB for 8 rows of
    3,500 tokens). Here it is evaluated only on the blocks that can see anything -- the diagonal, and
    earlier key blocks that hold a segment of the query block -- a bounded number at a time, so the
    work follows the attention the kernel will do, not the square of the row.
    """
    R, Lp = seg.shape
    n = Lp // BLOCK
    lo, hi = _segment_bounds(seg)
    index = torch.arange(n, device=seg.device)
    diagonal = index[:, None] == index[None, :]
    earlier = index[:, None] > index[None, :]
    shares = earlier & (lo[:, None, :] <= hi[:, :, None]) & (hi[:, None, :] >= lo[:, :, None])
    rows, qb, kb = (shares | diagonal).nonzero(as_tuple=True)
    some = torch.zeros(rows.numel(), dtype=torch.bool, device=seg.device)
    every = torch.zeros_like(some)
    offsets = torch.arange(BLOCK, device=seg.device)
    step = max(1, CLASSIFY_ELEMENTS // (BLOCK * BLOCK))
    for start in range(0, rows.numel(), step):
        at = slice(start, start + step)
        q = (qb[at] * BLOCK)[:, None, None] + offsets[None, :, None]
        kv = (kb[at] * BLOCK)[:, None, None] + offsets[None, None, :]
        sees = mask_mod(rows[at][:, None, None], None, q, kv).flatten(1)
        some[at], every[at] = sees.any(1), sees.all(1)
    partial = torch.zeros(R, n, n, dtype=torch.bool, device=seg.device)
    full = torch.zeros_like(partial)
    partial[rows, qb, kb] = some & ~every
    full[rows, qb, kb] = every
    return partial[:, None], full[:, None]


def _from_blocks(partial: torch.Tensor, full: torch.Tensor, mask_mod, length: int):
    """A BlockMask from [R, 1, blocks, blocks] partial and full block booleans (each row's key blocks
    listed first, in order, as torch's own create_block_mask lists them)."""
    from torch.nn.attention.flex_attention import BlockMask

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dense = blocks.to(torch.int32)
        return dense.sum(-1).to(torch.int32), torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)

    (kv_num, kv_index), (full_num, full_index) = ordered(partial), ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_index, full_num, full_index, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


_compiled = None


def _kernel(device: torch.device):
    """FlexAttention compiled into one fused kernel on a GPU; eager elsewhere (torch's compiled CPU
    template fails to build for some masks, seen with torch 2.13, and a CPU run uses
    :mod:`prefopt.attention` anyway)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled
    if device.type != "cuda":
        return flex_attention
    if _compiled is None:
        # dynamic: every micro-batch has its own length; compiled once for all of them (a static first
        # compile is followed by a dynamic one at the second length: ~9 s more, seen on an H200)
        _compiled = torch.compile(flex_attention, dynamic=True)
        allow_recompiles()
    return _compiled


# Compiled variants one process may need: each dtype (the fast-path check's float32 pass, the run's
# bf16) x grad mode (training, the reference pass) x mask kind (a sliding-window and a full layer close
# over different constants) x soft-capping; a model with two layer types already needs 8.
RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> int:
    """Raise dynamo's per-function recompile limit to ``limit`` (never lower it); returns the limit now.

    At the default of 8 (torch 2.13), the ninth variant of the compiled kernel is not compiled: dynamo
    runs FlexAttention eagerly from then on, the unfused implementation that builds the whole score
    matrix (seen on an H200 in benchmarks/gpu_check.py, which runs several models in one process).
    """
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), limit))
    return getattr(dynamo, name)


def prefopt_flex_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention-interface entry point (see the module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask

    kwargs.pop("prefopt_segments", None)
    L = query.shape[2]
    if not isinstance(attention_mask, BlockMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    unsupported = [name for name in ("s_aux", "position_bias") if kwargs.get(name) is not None]
    if dropout or key.shape[2] != L or unsupported:
        raise ValueError("prefopt_flex cannot run this layer (" + (", ".join(unsupported) or "attention dropout, or "
                         "keys of another length than the queries") + "); the fast-path check switches it off")
    softcap = kwargs.get("softcap")

    def capped(score, b, h, q, kv):
        return softcap * torch.tanh(score / softcap)

    Lp = attention_mask.seq_lengths[0]
    pad = (0, 0, 0, Lp - L)
    out = _kernel(query.device)(F.pad(query, pad), F.pad(key, pad), F.pad(value, pad),
                                score_mod=capped if softcap else None, block_mask=attention_mask, scale=scaling,
                                enable_gqa=key.shape[1] != query.shape[1])
    return out[:, :, :L].transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``prefopt_flex`` a transformers attention implementation."""
    register_implementation(NAME, prefopt_flex_forward)
