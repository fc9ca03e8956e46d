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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from prefopt.attention import NAME as SEGMENT_ATTENTION
from prefopt.batching import PackedBatch
from prefopt.layers import trimmed_mlp


@dataclass
class SeqLogps:
    """Log-probs of every sequence of a batch (see :class:`PackedBatch` for the numbering)."""

    logps: torch.Tensor            # [N] float32, sum of token log-probs
    tokens: torch.Tensor           # [N] float32, completion token counts
    token_logps: torch.Tensor      # [T] float32, per scored token (same order as the batch's plan)
    wpo_logw: torch.Tensor | None  # [N] length-averaged log(p(y_t) / sum_v p(v)^2), when asked

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen, rejected, chosen_tokens, rejected_tokens) for two-completion batches."""
        return self.logps[0::2], self.logps[1::2], self.tokens[0::2], self.tokens[1::2]


def _attn_impl(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _attention_mask_for(model: torch.nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean masks for SDPA-style kernels; an additive float mask for eager attention."""
    impl = _attn_impl(model) or "eager"
    if impl in ("sdpa", "flex_attention", SEGMENT_ATTENTION):
        return mask
    if "flash" in impl:
        raise ValueError(
            "flash-attention kernels take no custom masks, which prefix sharing and packing need; "
            "load the model with attn_implementation='sdpa'"
        )
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _layout_kwargs(model: torch.nn.Module, batch: PackedBatch) -> dict:
    """The segment layout, for models switched to prefopt's block attention (see prefopt.attention)."""
    return {"prefopt_segments": batch.segments} if _attn_impl(model) == SEGMENT_ATTENTION and batch.segments else {}


def decoder_hidden_states(model: torch.nn.Module, batch: PackedBatch, *, head_rows_only: bool = False) -> torch.Tensor:
    """Run the decoder stack (no LM head) and return the last hidden states ``[R, L, d]``.

    ``head_rows_only``: the caller reads only the rows ``batch.hidden_index``, so a last-layer
    MLP patched by :func:`prefopt.layers.trim_last_mlp` may skip the others (their hidden
    states come back wrong).
    """
    decoder = model.get_decoder()
    mlp = trimmed_mlp(model) if head_rows_only else None
    if mlp is not None:
        mlp._prefopt_rows = batch.head_rows
    try:
        out = decoder(
            input_ids=batch.input_ids,
            attention_mask=_attention_mask_for(model, batch.attention_mask, _model_dtype(model)),
            position_ids=batch.position_ids,
            use_cache=False,
            **_layout_kwargs(model, batch),
        )
    finally:
        if mlp is not None:
            mlp._prefopt_rows = None
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _postprocess_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """Apply the few architectures' logit transforms that live after the head (Cohere, Gemma 2/3)."""
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


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
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep: bool) -> torch.Tensor:
        logits = F.linear(hidden, weight).float()
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
        if kept is None:
            g = F.linear(hidden, weight).float().sub_(lse[:, None]).exp_().mul_(-grad[:, None])
        else:
            g = kept[0].mul_((-grad / kept[1])[:, None])
        g.scatter_add_(-1, targets[:, None], grad[:, None])
        g = g.to(weight.dtype)
        grad_hidden = g @ weight if ctx.needs_input_grad[0] else None
        grad_weight = g.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def _plain_head(head, config) -> bool:
    """True when the head is ``h @ W^T`` and nothing after it (most decoders)."""
    scale = getattr(config, "logit_scale", None)
    return (type(head) is torch.nn.Linear and head.bias is None
            and not (isinstance(scale, (int, float)) and scale != 1)
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


# A chunk's float32 logits stay under 2**24 elements (64 MiB): 1024 tokens at a 16k vocabulary,
# 110 at Qwen2's 152k. A fixed token count would make the chunk grow with the vocabulary, and the
# forward's logits and the backward's gradient buffer exist while every activation is still alive.
HEAD_CHUNK_ELEMENTS = 1 << 24


def head_chunk_tokens(max_tokens: int, vocab: int) -> int:
    """Tokens per LM-head chunk: at most ``max_tokens``, fewer for large vocabularies."""
    return max(16, min(max_tokens, HEAD_CHUNK_ELEMENTS // max(vocab, 1)))


def completion_logps(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    chunk_size: int = 1024,
    full_head: bool = False,
    with_wpo: bool = False,
) -> SeqLogps:
    """Sum of completion-token log-probs for every sequence of ``batch``.

    ``full_head=True`` runs the model's ordinary forward (head over every position,
    full log-softmax); it exists for the benchmark's ablation and the tests.
    """
    head = model.get_output_embeddings()
    config = model.config
    if full_head:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=_attention_mask_for(model, batch.attention_mask, _model_dtype(model)),
            position_ids=batch.position_ids,
            use_cache=False,
            **_layout_kwargs(model, batch),
        )
        logp = out.logits.float().log_softmax(-1).flatten(0, 1)
        token_logps = logp[batch.hidden_index, batch.target_ids]
        log_sq = torch.logsumexp(2 * logp[batch.hidden_index], dim=-1) if with_wpo else None
    else:
        hidden = decoder_hidden_states(model, batch, head_rows_only=True)
        picked = hidden.flatten(0, 1).index_select(0, batch.hidden_index)
        parts, sq_parts = [], []
        grad = torch.is_grad_enabled() and picked.requires_grad
        fused = grad and not with_wpo and _plain_head(head, config)
        chunk_size = head_chunk_tokens(chunk_size, head.weight.shape[0])
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
    return SeqLogps(logps=logps, tokens=tokens, token_logps=token_logps, wpo_logw=wpo_logw)


class CompletionLogpsModel(torch.nn.Module):
    """A causal LM whose forward returns completion log-probs.

    Distributed wrappers (DDP, FSDP, DeepSpeed) hook into a module's ``forward``; calling
    the decoder and head of a wrapped model directly would bypass them. Wrapping the
    whole log-prob computation in one module lets ``accelerator.prepare`` wrap *this*.
    """

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024, full_head: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.full_head = full_head

    def forward(self, batch: PackedBatch, with_wpo: bool = False) -> SeqLogps:
        return completion_logps(self.model, batch, chunk_size=self.chunk_size, full_head=self.full_head,
                                with_wpo=with_wpo)
