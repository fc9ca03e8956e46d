"""Per-sequence completion log-probabilities, with the LM head only where it is needed.

``log pi(y|x)`` is the sum over the completion's tokens of ``log softmax(logits)[target]``.
A causal LM's own forward applies the LM head at every position and returns a
``[rows, length, vocab]`` tensor; for a 32k vocabulary in float32 that is often the
largest tensor of the whole step, and most of it (prompt and padding positions) is
thrown away. Here the decoder runs alone, the hidden states of the positions that
predict completion tokens are gathered, and the head runs on those in chunks. Each
chunk is checkpointed, so its ``[chunk, vocab]`` logits are freed after the forward and
recomputed in the backward: no ``[batch, length, vocab]`` float32 tensor ever exists.
Log-softmax is taken as ``logit[target] - logsumexp(logits)`` in float32 whatever the
model's dtype.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prefopt import flex
from prefopt.attention import NAME as SEGMENT_ATTENTION
from prefopt.attention import mask_restrictions, text_config
from prefopt.batching import PackedBatch
from prefopt.layers import autocast_as, autocast_state, trimmed_mlp
from prefopt.moe import load_balancing_loss, moe_routing, router_logits_from


@dataclass
class SeqLogps:
    """Log-probs of every sequence of a batch (see :class:`PackedBatch` for the numbering)."""

    logps: torch.Tensor            # [N] float32, sum of token log-probs
    tokens: torch.Tensor           # [N] float32, completion token counts
    token_logps: torch.Tensor      # [T] float32, per scored token (same order as the batch's plan)
    wpo_logw: torch.Tensor | None  # [N] length-averaged log(p(y_t) / sum_v p(v)^2), when asked
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss over the batch's real tokens, when asked

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen, rejected, chosen_tokens, rejected_tokens) for two-completion batches."""
        return self.logps[0::2], self.logps[1::2], self.tokens[0::2], self.tokens[1::2]


def _attn_impl(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


# Attention implementations that take an explicit [rows, 1, L, L] mask: boolean for the SDPA kinds,
# additive float for eager attention, a BlockMask for flex attention (transformers' flex path adds a
# plain tensor mask to the scores, so a boolean one would mask nothing).
BOOL_MASK_IMPLEMENTATIONS = ("sdpa", SEGMENT_ATTENTION)
FLOAT_MASK_IMPLEMENTATIONS = ("eager",)
BLOCK_MASK_IMPLEMENTATIONS = ("flex_attention",)


def layer_masks(config, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4-D mask each kind of attention layer needs, from the prefix-sharing mask and positions.

    Transformers' decoders take a ready 4-D mask as is, so the sliding window (or attention chunk)
    that its own mask functions would add is added here (see :func:`prefopt.attention.mask_restrictions`),
    counted in each sequence's own positions (a completion's positions restart after the prompt; a
    physical distance in the packed row means nothing). Models whose layers differ get a dict keyed
    by layer type, which their forward accepts in place of a mask.
    """
    pos = positions[:, None, :, None], positions[:, None, None, :]

    def restrict(window: int | None, chunk: int | None) -> torch.Tensor:
        if window is not None:
            return mask & (pos[0] - pos[1] < window)
        if chunk is not None:
            return mask & (torch.div(pos[0], chunk, rounding_mode="floor")
                           == torch.div(pos[1], chunk, rounding_mode="floor"))
        return mask

    kinds = mask_restrictions(config)
    return {k: restrict(*r) for k, r in kinds.items()} if isinstance(kinds, dict) else restrict(*kinds)


def _block_mask(mask: torch.Tensor):
    """Flex attention's BlockMask for a boolean [R, 1, L, L] mask (fully hidden blocks are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    R, _, L, _ = mask.shape
    return create_block_mask(lambda b, h, q, kv: mask[b, 0, q, kv], R, None, L, L, device=mask.device, _compile=False)


def _attention_mask_for(model: torch.nn.Module, batch: PackedBatch, dtype: torch.dtype):
    """The 4-D mask(s) of a packed batch in the form the model's attention implementation takes
    (for :mod:`prefopt.flex`, block masks read from the layout: no dense mask is built)."""
    impl = _attn_impl(model) or "eager"
    if impl == flex.NAME:
        return flex.block_masks(model.config, batch.seg_ids, batch.part_ids, batch.position_ids)
    if impl not in BOOL_MASK_IMPLEMENTATIONS + FLOAT_MASK_IMPLEMENTATIONS + BLOCK_MASK_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {impl!r} takes no custom 4-D masks, which prefix sharing and packing "
            "need: load the model with attn_implementation='sdpa' (or 'eager'), or lay the batch out plain "
            "(collate(..., plain=True)), which any implementation runs")
    masks = layer_masks(model.config, batch.attention_mask, batch.position_ids)
    if impl in BOOL_MASK_IMPLEMENTATIONS:
        return masks
    if impl in BLOCK_MASK_IMPLEMENTATIONS:
        return {k: _block_mask(v) for k, v in masks.items()} if isinstance(masks, dict) else _block_mask(masks)

    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, torch.finfo(dtype).min)

    return {k: additive(v) for k, v in masks.items()} if isinstance(masks, dict) else additive(masks)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _layout_kwargs(model: torch.nn.Module, batch: PackedBatch) -> dict:
    """The segment layout, for models switched to prefopt's block attention (see prefopt.attention)."""
    return {"prefopt_segments": batch.segments} if _attn_impl(model) == SEGMENT_ATTENTION and batch.segments else {}


def decoder_hidden_states(model: torch.nn.Module, batch: PackedBatch, *, head_rows_only: bool = False,
                          routers: list | None = None) -> torch.Tensor:
    """Run the decoder stack (no LM head) and return the last hidden states ``[R, L, d]``.

    ``head_rows_only``: the caller reads only the rows ``batch.hidden_index``, so a last-layer
    MLP patched by :func:`prefopt.layers.trim_last_mlp` may skip the others (their hidden
    states come back wrong). ``routers``: a list that receives the MoE router logits.
    """
    decoder = model.get_decoder()
    mlp = trimmed_mlp(model) if head_rows_only else None
    if mlp is not None:
        mlp._prefopt_rows = batch.head_rows
    try:
        out = decoder(
            input_ids=batch.input_ids,
            attention_mask=_attention_mask_for(model, batch, _model_dtype(model)),
            position_ids=batch.position_ids,
            use_cache=False,
            **_layout_kwargs(model, batch),
            **({"output_router_logits": True} if routers is not None else {}),
        )
    finally:
        if mlp is not None:
            mlp._prefopt_rows = None
    if routers is not None:
        routers.append(router_logits_from(out))
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _postprocess_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """The logit transforms some architectures apply after the head: Cohere's ``logit_scale``,
    Granite's division by ``logits_scaling``, Gemma 2/3's final soft-capping. Any other is left to
    the fast-path check (:mod:`prefopt.fastpath`), which then switches to the model's own head."""
    config = text_config(config)
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _own_head_logps(model: torch.nn.Module, batch: PackedBatch, with_wpo: bool, routers: list | None = None):
    """Token log-probs from the model's own forward and head, every transform it applies after
    the head included; log-softmax in float32. Only the row ends from the first predicting
    position on get logits (``logits_to_keep``, as generation uses it), not the whole row.

    A plain batch runs row by row, each row cut to its own length: every sequence truly alone,
    no padding (some models -- sparse attention, recurrences -- are not exact under padding)."""
    if batch.plain:
        return _plain_rows_logps(model, batch, with_wpo, routers)
    inputs = {"attention_mask": _attention_mask_for(model, batch, _model_dtype(model)),
              "position_ids": batch.position_ids, **_layout_kwargs(model, batch)}
    return _forward_logps(model, batch.input_ids, inputs, batch.hidden_index, batch.target_ids, with_wpo, routers)


def _forward_logps(model, input_ids, inputs: dict, index, targets, with_wpo: bool, routers: list | None):
    L = input_ids.shape[1]
    extra = {}
    first = int((index % L).min()) if index.numel() else L - 1
    if _accepts(model, "logits_to_keep") and first > 0:
        extra["logits_to_keep"] = L - first
        index = torch.div(index, L, rounding_mode="floor") * (L - first) + index % L - first
    if routers is not None:
        extra["output_router_logits"] = True
    out = model(input_ids=input_ids, use_cache=False, **inputs, **extra)
    if routers is not None:
        routers.append(router_logits_from(out))
    logits = out.logits if hasattr(out, "logits") else out[0]
    logp = logits.float().log_softmax(-1).flatten(0, 1)
    token_logps = logp[index, targets]
    log_sq = torch.logsumexp(2 * logp[index], dim=-1) if with_wpo else None
    return token_logps, log_sq


def _plain_rows_logps(model, batch: PackedBatch, with_wpo: bool, routers: list | None):
    R, L = batch.input_ids.shape
    lengths = batch.attention_mask.sum(1).tolist()
    row_of = torch.div(batch.hidden_index, L, rounding_mode="floor")
    per_row = []
    parts = []
    for r in range(R):
        n = int(lengths[r])
        sel = (row_of == r).nonzero().squeeze(1)
        ids = batch.input_ids[r:r + 1, :n]
        got = [] if routers is not None else None
        lp, sq = _forward_logps(model, ids, {"attention_mask": torch.ones_like(ids)}, batch.hidden_index[sel] - r * L,
                                batch.target_ids[sel], with_wpo, got)
        parts.append((sel, lp, sq))
        if got is not None:
            per_row.append((r, n, got[0]))
    where = (torch.cat([p[0] for p in parts]),)
    token_logps = parts[0][1].new_zeros(batch.hidden_index.shape[0]).index_put(where, torch.cat([p[1] for p in parts]))
    log_sq = None
    if with_wpo:
        log_sq = token_logps.new_zeros(token_logps.shape).index_put(where, torch.cat([p[2] for p in parts]))
    if routers is not None:
        routers.append(_pad_router_logits(per_row, R, L))
    return token_logps, log_sq


def _pad_router_logits(per_row, R: int, L: int):
    """Rows' router logits laid back out as ``[R * L, E]`` per layer (zeros on padding, which the
    load-balancing loss leaves out through the batch's real positions)."""
    if not per_row or per_row[0][2] is None:
        return None
    layers = []
    for k in range(len(per_row[0][2])):
        first = per_row[0][2][k]
        full = first.new_zeros(R, L, first.shape[-1])
        for r, n, logits in per_row:
            full[r, :n] = logits[k].reshape(n, -1)
        layers.append(full.reshape(R * L, -1))
    return tuple(layers)


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class _HeadLogps(torch.autograd.Function):
    """``log softmax(h W^T)[target]`` for a chunk of positions, with a hand-written backward.

    Autograd through ``gather - logsumexp`` allocates three ``[chunk, vocab]`` tensors in the
    backward (a zero-filled scatter target, the softmax, their sum); here one buffer holds the
    logits, becomes ``exp(logits - max)`` in place, and in the backward ``g * (onehot - softmax)``.

    Only the chunk computed last (``keep=True``) carries that buffer from its forward to its
    backward, which autograd runs first, straight after the loss: at that moment no other
    chunk's buffer exists, so keeping it costs no peak memory and saves recomputing the
    chunk's logits (a ``[chunk, hidden] x [hidden, vocab]`` product). Every other chunk keeps
    only its inputs and log-sum-exp and recomputes its logits in the backward. The head must
    be a plain bias-free linear layer.

    Under autocast the head's product runs in autocast's dtype, as the model's own head would,
    and the log-softmax in float32. The backward runs under the same autocast: a recomputed
    chunk gets the very logits its log-sum-exp was taken from (float32 logits against a
    bfloat16 log-sum-exp put every probability off by its logit's rounding error), and the
    softmax gradient is rounded to the logits' dtype, as autograd through ``.float()`` does.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep: bool) -> torch.Tensor:
        logits = F.linear(hidden, weight)
        ctx.logits_dtype, ctx.autocast = logits.dtype, autocast_state(hidden)
        logits = logits.float()
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)
        top = logits.amax(-1, keepdim=True)
        probs = logits.sub_(top).exp_()                 # in place: exp(logits - max)
        total = probs.sum(-1, keepdim=True)
        lse = (total.log() + top).squeeze(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.kept = (probs, total.squeeze(-1)) if keep else None  # softmax = probs / total, scaled in the backward
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, targets, lse = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None                      # used up in place below
        with autocast_as(ctx.autocast):
            if kept is None:
                g = F.linear(hidden, weight).float().sub_(lse[:, None]).exp_().mul_(-grad[:, None])
            else:
                g = kept[0].mul_((-grad / kept[1])[:, None])
            g.scatter_add_(-1, targets[:, None], grad[:, None])
            g = g.to(ctx.logits_dtype)
            grad_hidden = (g @ weight).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (g.t() @ hidden).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def _plain_head(head, config) -> bool:
    """True when the head is ``h @ W^T`` and nothing after it (most decoders)."""
    config = text_config(config)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    return (type(head) is torch.nn.Linear and head.bias is None
            and not (isinstance(scale, (int, float)) and scale != 1)
            and not (isinstance(divisor, (int, float)) and divisor != 1)
            and not getattr(config, "final_logit_softcapping", None))


def _chunk_logps(head, config, hidden: torch.Tensor, targets: torch.Tensor, with_wpo: bool):
    logits = _postprocess_logits(config, head(hidden).float())
    lse = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_wpo:
        return token_logps, token_logps.new_zeros(())
    # log sum_v p(v)^2 = logsumexp(2 * logits) - 2 * lse
    log_sq = torch.logsumexp(2 * logits, dim=-1) - 2 * lse
    return token_logps, log_sq


# On the CPU a chunk's float32 logits stay under 2**24 elements (64 MiB): 1024 tokens at a 16k
# vocabulary, 110 at Qwen2's 152k. A fixed token count would make the chunk grow with the vocabulary,
# and the forward's logits and the backward's gradient buffer exist while every activation is still
# alive. That is what measured best on the CPU; on a GPU 110-row products leave it idle, so there a
# chunk may take an eighth of the free memory (logits and gradient buffer: a sixteenth each).
HEAD_CHUNK_ELEMENTS = 1 << 24
GPU_FREE_MEMORY_SHARE = 16


def head_chunk_tokens(max_tokens: int, vocab: int, free_bytes: int | None = None) -> int:
    """Tokens per LM-head chunk: at most ``max_tokens``, fewer for large vocabularies.

    ``free_bytes``: the GPU's free memory, which sizes the chunk there (None on the CPU)."""
    budget = HEAD_CHUNK_ELEMENTS
    if free_bytes is not None:
        budget = max(budget, free_bytes // GPU_FREE_MEMORY_SHARE // 4)
    return max(16, min(max_tokens, budget // max(vocab, 1)))


def completion_logps(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    chunk_size: int = 1024,
    full_head: bool = False,
    with_wpo: bool = False,
    router_aux: bool = False,
) -> SeqLogps:
    """Sum of completion-token log-probs for every sequence of ``batch``.

    ``full_head=True`` runs the model's ordinary forward and head (the fallback for a head the
    fast path cannot reproduce, and the benchmark's ablation). A plain batch
    (``collate(..., plain=True)``) always does, with a 2-D padding mask: it works with every
    causal LM and attention implementation. ``router_aux``: for a mixture-of-experts model, also
    the router's load-balancing loss over the batch's real tokens (:mod:`prefopt.moe`).
    """
    head = model.get_output_embeddings()
    config = model.config
    routing = moe_routing(config) if router_aux else None
    routers = [] if routing is not None else None
    if full_head or batch.plain:
        token_logps, log_sq = _own_head_logps(model, batch, with_wpo, routers)
    else:
        hidden = decoder_hidden_states(model, batch, head_rows_only=True, routers=routers)
        picked = hidden.flatten(0, 1).index_select(0, batch.hidden_index)
        parts, sq_parts = [], []
        grad = torch.is_grad_enabled() and picked.requires_grad
        fused = grad and not with_wpo and _plain_head(head, config)
        free = torch.cuda.mem_get_info(picked.device)[0] if picked.is_cuda else None
        chunk_size = head_chunk_tokens(chunk_size, head.weight.shape[0], free)
        for start in range(0, picked.shape[0], chunk_size):
            h = picked[start:start + chunk_size]
            t = batch.target_ids[start:start + chunk_size]
            if fused:
                lp, sq = _HeadLogps.apply(h, head.weight, t, start + chunk_size >= picked.shape[0]), None
            elif grad:
                lp, sq = checkpoint(_chunk_logps, head, config, h, t, with_wpo, use_reentrant=False)
            else:
                lp, sq = _chunk_logps(head, config, h, t, with_wpo)
            parts.append(lp)
            sq_parts.append(sq)
        token_logps = torch.cat(parts) if parts else picked.new_zeros(0, dtype=torch.float32)
        log_sq = torch.cat(sq_parts) if with_wpo and parts else None

    n = batch.num_seqs
    seq = batch.token_seq
    logps = torch.zeros(n, dtype=torch.float32, device=token_logps.device).index_add(0, seq, token_logps)
    tokens = torch.zeros(n, dtype=torch.float32, device=token_logps.device).index_add(
        0, seq, torch.ones_like(token_logps))
    wpo_logw = None
    if with_wpo:
        per_token = (token_logps - log_sq).detach()
        wpo_logw = torch.zeros(n, dtype=torch.float32, device=seq.device).index_add(0, seq, per_token) / tokens
    aux = None
    if routers and routers[0]:
        aux = load_balancing_loss(routers[0], batch.real_positions.reshape(-1), *routing)
    return SeqLogps(logps=logps, tokens=tokens, token_logps=token_logps, wpo_logw=wpo_logw, aux_loss=aux)


class CompletionLogpsModel(torch.nn.Module):
    """A causal LM whose forward returns completion log-probs.

    Distributed wrappers (DDP, FSDP, DeepSpeed) hook into a module's ``forward``; calling
    the decoder and head of a wrapped model directly would bypass them. Wrapping the
    whole log-prob computation in one module lets ``accelerator.prepare`` wrap *this*.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024, full_head: bool = False,
                 router_aux: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.full_head = full_head
        self.router_aux = router_aux
        # FSDP's transformer-based wrap policy looks for layer classes on the module it wraps: this one
        from prefopt.sharding import no_split_modules

        self._no_split_modules = no_split_modules(model)

    def forward(self, batch: PackedBatch, with_wpo: bool = False) -> SeqLogps:
        return completion_logps(self.model, batch, chunk_size=self.chunk_size, full_head=self.full_head,
                                with_wpo=with_wpo, router_aux=self.router_aux and torch.is_grad_enabled())
