"""Attention that computes only the blocks a packed, prefix-shared row can see.

A row laid out by :func:`prefopt.batching.collate` holds segments ``[prompt | c_1 | c_2 ...]``
one after another. Its mask is block-diagonal across segments, causal inside, and hides
each completion from the others. SDPA with such an explicit mask still multiplies every
query by every key of the row (an explicit mask also turns off the kernel's causal
skipping), so a row of three packed pairs pays nine times the attention it needs.

Here each segment is two or more SDPA calls on slices of the same ``q``/``k``/``v``:

* ``[prompt | c_1]`` attends causally to itself (``is_causal=True``: the kernel skips the
  upper triangle);
* every later completion ``c_j`` attends to ``[prompt | c_1 .. c_j]`` with a small mask
  that shows the prompt and ``c_j`` causally and hides ``c_1 .. c_{j-1}``.

Slices are views, so nothing is copied on the way in; outputs are written once, in the
``[batch, length, heads, head_dim]`` layout the model expects. Padding positions get
zeros (nothing real attends to them). The result equals SDPA with the full mask up to
float rounding; ``tests/test_attention.py`` checks values and gradients.

It is registered with transformers as the attention implementation ``prefopt_sdpa``.
The segment layout travels as the keyword argument ``prefopt_segments`` that
transformers' decoders pass through to their attention function; without it (generation,
a model that does not pass keyword arguments down, soft-capping, dropout) the call goes to
transformers' own SDPA function unchanged. A sliding window (the ``sliding_window`` keyword
that transformers' decoders pass for such layers) is honoured in each block, counted in the
sequence's own positions; whether a model passes it is not assumed but proven, like every
fast path, by :mod:`prefopt.fastpath`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "prefopt_sdpa"

# One row's layout: for every segment, (start, prompt length, completion lengths).
Segment = tuple[int, int, tuple[int, ...]]


def text_config(config):
    """The language model's config of a multimodal config (the config itself otherwise)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def mask_restrictions(config) -> tuple[int | None, int | None] | dict[str, tuple[int | None, int | None]]:
    """What each kind of attention layer adds to the prefix-sharing mask: ``(window, chunk)``.

    A sliding window (a query sees keys fewer than ``window`` positions back) or an attention chunk
    (keys in the query's own ``chunk``-long block of positions). Models whose layers differ
    (``config.layer_types``: Gemma 2/3, Qwen2 with a sliding window, Cohere 2, GPT-OSS, ...) get a
    dict keyed by layer type; models with one window for every layer (Mistral, Phi-3, Starcoder2),
    or none, get one pair.
    """
    config = text_config(config)
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and window > 0 else None
    chunk = getattr(config, "attention_chunk_size", None)
    chunk = chunk if isinstance(chunk, int) and chunk > 0 else None

    def of(kind: str) -> tuple[int | None, int | None]:
        return (window if kind == "sliding_attention" else None, chunk if kind == "chunked_attention" else None)

    types = getattr(config, "layer_types", None)
    kinds = set(types) if isinstance(types, (list, tuple)) and types else set()
    if not kinds:
        uses_window = window is not None and getattr(config, "use_sliding_window", True) is not False
        return (window if uses_window else None, None)
    if len(kinds) == 1:
        return of(next(iter(kinds)))
    return {kind: of(kind) for kind in sorted(kinds)}


def _sdpa_fallback():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _completion_mask(prompt: int, before: int, length: int, device: torch.device,
                     window: int | None = None) -> torch.Tensor:
    """[length, prompt + before + length] bool: the prompt, not the ``before`` tokens, itself causally.

    With a sliding ``window`` a query also sees only keys fewer than ``window`` positions back, counted
    in the completion's own positions (it follows the prompt directly, whatever lies between).
    """
    cols = torch.arange(prompt + before + length, device=device)
    rows = torch.arange(length, device=device)
    own = cols[None, :] - (prompt + before)
    mask = (cols[None, :] < prompt) | ((own >= 0) & (own <= rows[:, None]))
    if window is not None:
        key_pos = torch.where(cols < prompt, cols, cols - before)
        mask &= (prompt + rows)[:, None] - key_pos[None, :] < window
    return mask


def _causal_window_mask(length: int, window: int, device: torch.device) -> torch.Tensor:
    """[length, length] bool: causal, and fewer than ``window`` positions back."""
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      segments: list[list[Segment]] | tuple, scaling: float | None = None,
                      window: int | None = None) -> torch.Tensor:
    """Attention over packed rows, ``[B, H, L, D]`` in, ``[B, L, H, D]`` out.

    ``key``/``value`` may have fewer heads than ``query`` (grouped-query attention). ``window``:
    a sliding-window layer's width (a query sees keys fewer than ``window`` positions back).
    """
    B, H, L, _ = query.shape
    gqa = key.shape[1] != H
    rows = []
    for b in range(B):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        pieces = []
        cursor = 0
        for start, prompt, comps in segments[b]:
            if start != cursor:
                raise ValueError(f"segments of row {b} are not contiguous ({start} after {cursor})")
            first = start + prompt + comps[0]
            n = first - start
            if window is None or n <= window:
                piece_mask, causal = None, True
            else:
                piece_mask, causal = _causal_window_mask(n, window, query.device), False
            pieces.append(F.scaled_dot_product_attention(
                q[:, :, start:first], k[:, :, start:first], v[:, :, start:first],
                attn_mask=piece_mask, is_causal=causal, scale=scaling, enable_gqa=gqa))
            end = first
            for c in comps[1:]:
                near = window if window is not None and prompt + c > window else None
                mask = _completion_mask(prompt, end - start - prompt, c, query.device, near)
                pieces.append(F.scaled_dot_product_attention(
                    q[:, :, end:end + c], k[:, :, start:end + c], v[:, :, start:end + c],
                    attn_mask=mask, scale=scaling, enable_gqa=gqa))
                end += c
            cursor = end
        if cursor < L:  # padding: zeros of the values' width (MLA models' value heads differ from queries')
            pieces.append(query.new_zeros(1, H, L - cursor, value.shape[-1]))
        rows.append(torch.cat([p.transpose(1, 2) for p in pieces], dim=1))
    return rows[0] if B == 1 else torch.cat(rows, dim=0)


def prefopt_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs):
    """transformers attention-interface entry point (see the module docstring)."""
    segments = kwargs.pop("prefopt_segments", None)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    usable = (
        segments is not None
        and len(segments) == query.shape[0]
        and key.shape[2] == query.shape[2]
        and not dropout
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("s_aux") is None
        and (window is None or (isinstance(window, int) and window > 0))
    )
    if not usable:
        return _sdpa_fallback()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                **kwargs)
    return segment_attention(query, key, value, segments, scaling=scaling, window=window), None


_registered: set[str] = set()


def register_implementation(name: str, forward) -> None:
    """Make ``forward`` the transformers attention implementation ``name``, its masks built as for SDPA
    (so generation and any call without prefopt's layout get transformers' own SDPA masks)."""
    if name in _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    _registered.add(name)


def register() -> None:
    """Make ``prefopt_sdpa`` a transformers attention implementation."""
    register_implementation(NAME, prefopt_sdpa_forward)


def segment_kernel() -> str:
    """The block-attention kernel that measures best on this machine: FlexAttention's block masks
    (:mod:`prefopt.flex`) where CUDA is present and FlexAttention is installed; SDPA per segment
    (this module) otherwise: on a CPU the per-segment calls beat FlexAttention's compiled kernel."""
    from prefopt import flex

    return flex.NAME if torch.cuda.is_available() and flex.available() else NAME


BLOCK_ATTENTION = (NAME, "prefopt_flex")  # this module's kernel and prefopt.flex's
_ORIGINAL = "_prefopt_original_attention"


def use_segment_attention(model: torch.nn.Module, kernel: str | None = None) -> bool:
    """Switch an SDPA (or flex-attention) model to block attention, ``kernel`` (default:
    :func:`segment_kernel`); False (model unchanged) where that is not possible."""
    from prefopt import flex

    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in BLOCK_ATTENTION and kernel in (None, current):
        return True
    kernel = kernel or segment_kernel()
    if current in BLOCK_ATTENTION:
        use_plain_attention(model)
        current = model.config._attn_implementation
    if current not in ("sdpa", "flex_attention") or (kernel == flex.NAME and not flex.available()):
        return False
    (flex.register if kernel == flex.NAME else register)()
    try:
        model.set_attn_implementation(kernel)
    except (ValueError, AttributeError, TypeError):
        return False
    switched = getattr(model.config, "_attn_implementation", None) == kernel
    if switched:
        setattr(model, _ORIGINAL, current)
    return switched


def use_plain_attention(model: torch.nn.Module) -> bool:
    """Undo :func:`use_segment_attention` (back to the implementation the model had: transformers' SDPA
    or flex attention); False if it was not switched."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) not in BLOCK_ATTENTION:
        return False
    model.set_attn_implementation(getattr(model, _ORIGINAL, "sdpa"))
    return True
