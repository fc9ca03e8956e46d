"""Every fast path proves itself on the model at hand, or steps aside.

prefopt replaces parts of what transformers computes: its own 4-D masks (prefix sharing,
packing), block attention, lean norm/MLP forwards, a trimmed last MLP, a fused LM head. Each
is exact for the architectures it was written against; a new architecture (a sliding window,
ALiBi, a transform after the head, dropout hidden in a float attribute, a recurrent layer)
can make any of them silently wrong. So before training (and before scoring), the fast path
is compared with the *plain path* on a few real rows of the user's data:

* plain: each sequence ``[prompt | completion]`` alone in its row, a 2-D padding mask, the
  model's own forward and head, evaluation mode, no patched module -- what any causal LM in
  transformers computes, for any attention implementation;
* fast: the run's layout and patches, in training mode when training (dropout left on anywhere
  shows up here), rows split as the training loop splits them.

Both give per-token log-probs on every check row (forward only; with packing, also with all rows
packed into one) and, for training, on the two shortest rows cut to 64 tokens a part, the gradient of a fixed random
combination of the sequences' log-probs with respect to the parameters of the first and last
layers, the embeddings, the final norm and the head (a backward's faults do not depend on length,
and the plain path keeps every activation of what it differentiates). Where they differ beyond the dtype's tolerance, the
fast paths are switched off one at a time (the cheapest to lose first) until the two agree;
then each one switched off on the way is tried again alone, so only the culprits stay off.
Each one switched off is said in one log line naming the feature, the architecture and what
differed. The plain path itself agrees by construction in evaluation mode; if training mode
still differs, the policy trains in evaluation mode (said in the log). It is never an error for
a model transformers can run. The decision is cached next to the reference log-probs.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from prefopt.atomic import write_json
from prefopt.attention import use_plain_attention, use_segment_attention
from prefopt.batching import PackedBatch, collate, split_rows
from prefopt.data.tokenize import cut_masks
from prefopt.layers import (
    original_forwards,
    rebuild_norm_outputs,
    remove_lean_activations,
    slim_activations,
    trim_last_mlp,
    trimmed_mlp,
    untrim_last_mlp,
)
from prefopt.logprobs import completion_logps

log = logging.getLogger("prefopt")

# The order in which fast paths are switched off when the check fails: the ones that cost least
# to lose first; `masks` (prefopt's own 4-D masks) last, since without them prefix sharing,
# packing and block attention go too and every sequence runs alone (the plain path).
ORDER = ("lean_activations", "trim_last_layer", "fused_head", "block_attention", "packing", "prefix_sharing",
         "masks")
LABELS = {
    "lean_activations": "lean activations",
    "trim_last_layer": "the trimmed last layer",
    "fused_head": "the fused LM head",
    "block_attention": "block attention",
    "packing": "packing",
    "prefix_sharing": "prefix sharing",
    "masks": "prefopt's 4-D masks",
}
# What cannot stay on when a feature goes: without prefopt's masks nothing is shared, packed or
# computed block by block, and the head is the model's own (the trim works inside the fused head).
IMPLIES_OFF = {"masks": ("prefix_sharing", "packing", "block_attention", "fused_head", "trim_last_layer"),
               "fused_head": ("trim_last_layer",)}

CHECK_VERSION = "2"   # 2: low precision is also judged against float32
# The gradient check's rows keep at most this many tokens of each prompt (its end) and completion (its start).
GRAD_TOKENS = 64


@dataclass(frozen=True)
class Tolerance:
    """How far fast and plain may differ: per token (max and mean, nats) and the gradient (relative)."""

    token_max: float
    token_mean: float
    grad: float


# float32: rounding from a different order of the same sums is ~1e-6; the faults the check exists
# for (a lost sliding window, a skipped logit scale, dropout) move log-probs by 1e-2 and more.
# bfloat16 keeps 8 bits of mantissa: two correct computations differ by a few hundredths per token.
TOLERANCES = {
    torch.float32: Tolerance(token_max=1e-3, token_mean=1e-4, grad=2e-3),
    torch.float64: Tolerance(token_max=1e-6, token_mean=1e-7, grad=1e-6),
    torch.bfloat16: Tolerance(token_max=0.25, token_mean=0.02, grad=0.08),
    torch.float16: Tolerance(token_max=0.05, token_mean=0.004, grad=0.02),
}
# In low precision, how much further from float32 than the plain path a fast path may be (see
# compare): the mean and the gradient are averages over many roundings, the largest single
# token's difference is one extreme of them and varies more from layout to layout.
NOISE_RATIO = Tolerance(token_max=2.0, token_mean=1.25, grad=1.25)


@dataclass
class FastPaths:
    """Which fast paths a run uses, and why any of those asked for were switched off."""

    features: dict[str, bool]
    off: dict[str, str] = field(default_factory=dict)   # feature -> what differed when it was on
    train_mode: bool = True          # False: the policy trains in eval mode (training mode differs)
    architecture: str = ""
    dtype: str = ""
    seconds: float = 0.0
    cached: bool = False

    def describe(self) -> str:
        """One line: what runs, and what was switched off."""
        on = [LABELS[k] for k in ORDER if self.features.get(k)]
        if not self.features.get("masks"):
            on.append("the plain path (each sequence alone, the model's own head)")
        text = f"fast paths for {self.architecture} ({self.dtype}): " + ", ".join(on)
        if self.off:
            text += "; switched off: " + ", ".join(LABELS[k] for k in self.off)
        if not self.train_mode:
            text += "; the policy runs in evaluation mode"
        return text

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("seconds", "cached")}


@dataclass(frozen=True)
class Probe:
    """One measurement of a layout and set of patches on the check's rows."""

    token_logps: torch.Tensor       # [N, longest completion] float64, NaN where no token
    grads: list[torch.Tensor] | None


# ---------------------------------------------------------------------------- the model's patches


def apply_patches(model: torch.nn.Module, features: dict[str, bool]) -> dict[str, bool]:
    """Patch or unpatch ``model`` so that lean activations, the trimmed last layer and block
    attention are on exactly where ``features`` says; returns what could actually be applied
    (block attention needs an SDPA model, the trim a position-wise last MLP, ...)."""
    got = dict(features)
    if features.get("lean_activations"):
        if not any(m.__dict__.get("_prefopt_lean") for m in model.modules()):
            counts = slim_activations(model)
            got["lean_activations"] = sum(counts.values()) > 0
    else:
        remove_lean_activations(model)
    if features.get("trim_last_layer") and features.get("fused_head", True):
        got["trim_last_layer"] = trim_last_mlp(model)
    else:
        untrim_last_mlp(model)
        got["trim_last_layer"] = False
    if features.get("block_attention") and features.get("masks", True):
        got["block_attention"] = use_segment_attention(model)
    else:
        use_plain_attention(model)
        got["block_attention"] = False
    return got


def _attn(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


@contextlib.contextmanager
def plain_model(model: torch.nn.Module):
    """The model as transformers built it: no patched forward, transformers' own SDPA."""
    kernel = _attn(model)
    switched = use_plain_attention(model)
    try:
        with original_forwards(model):
            yield model
    finally:
        if switched:
            use_segment_attention(model, kernel)


# ---------------------------------------------------------------------------- measuring


def check_rows(examples: Sequence, count: int = 4) -> list:
    """The rows the check runs on: the two longest (sliding windows, long-range positions) and others
    spread through the data (packing needs several), in a fixed order, numbered 0, 1, ... (they may
    come from the training and the evaluation set, whose numbers overlap)."""
    if len(examples) <= count:
        picked = [replace(ex, index=i) for i, ex in enumerate(examples)]
    else:
        size = [len(ex.prompt_ids) + sum(len(c) for c in ex.completions) for ex in examples]
        order = sorted(range(len(examples)), key=lambda i: (-size[i], i))
        chosen = order[:2]
        rest = sorted(order[2:])
        step = len(rest) / (count - 2)
        chosen += [rest[int(k * step)] for k in range(count - 2)]
        picked = [replace(examples[i], index=k) for k, i in enumerate(sorted(chosen))]
    return picked + [_companion(min(picked, key=lambda ex: len(ex.prompt_ids)), len(picked))] if picked else []


def _companion(ex, index: int):
    """A second row with ``ex``'s prompt, its first completions repeated and the last one cut: the check
    then also proves the grouped layout (one segment for a prompt's rows, a repeated completion
    scored from its first copy), which data with several pairs per prompt gets."""
    comps = [list(c) for c in ex.completions]
    comps[-1] = comps[-1][:max(1, len(comps[-1]) // 2)]
    return replace(ex, completions=comps, index=index, **_masks_cut(ex, comps))


def _shortened(ex, n: int):
    """``ex`` with its prompt's last ``n`` tokens and each completion's first ``n`` (masks cut along)."""
    comps = [c[:n] for c in ex.completions]
    return replace(ex, prompt_ids=ex.prompt_ids[-n:], completions=comps, **_masks_cut(ex, comps))


def _masks_cut(ex, comps: list[list[int]]) -> dict:
    """``completion_masks`` cut to ``comps``, as a ``replace`` argument (none for examples that mask nothing)."""
    masks = getattr(ex, "completion_masks", None)
    return {} if masks is None else {"completion_masks": cut_masks(masks, comps)}


def grad_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """A handful of parameters whose gradient the check compares: the first and last layers and
    everything outside the layer stack (embeddings, final norm, head)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
    layer_of = {}
    for n, _ in named:
        m = re.search(r"\.(\d+)\.", n)
        layer_of[n] = int(m.group(1)) if m else None
    layers = [i for i in layer_of.values() if i is not None]
    keep = {min(layers), max(layers)} if layers else set()
    return [(n, p) for n, p in named if layer_of[n] is None or layer_of[n] in keep]


def _weights(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)


def measure(model: torch.nn.Module, rows: Sequence, *, pad_id: int, features: dict[str, bool], train_mode: bool,
            with_grad: bool, split: bool, chunk_size: int, device, one_row: bool = False,
            autocast: torch.dtype | None = None) -> Probe:
    """Token log-probs (and the check's gradients) of ``rows`` with the given fast paths.

    The plain path is ``features`` all off: each sequence alone, the model's own head. ``one_row``
    packs every row into one (the most any segment can be exposed to the others). ``autocast``: the
    run's mixed precision, under which both paths run (accelerate's ``mixed_precision``)."""
    longest = max(len(c) for ex in rows for c in ex.completions)
    plain = not features.get("masks", True)
    capacity = sum(len(ex.prompt_ids) + sum(len(c) for c in ex.completions) for ex in rows) if one_row else None
    batch = collate(list(rows), pad_token_id=pad_id, prefix_sharing=bool(features.get("prefix_sharing")),
                    packing=bool(features.get("packing")), plain=plain, capacity=capacity).to(device)
    parts = split_rows(batch) if split and not plain else [batch]
    params = grad_params(model) if with_grad else []
    weights = _weights(batch.num_seqs).to(device)
    grads = [torch.zeros_like(p, dtype=torch.float32) for _, p in params] if with_grad else None
    table = torch.full((batch.num_seqs, longest), float("nan"), dtype=torch.float64)
    was_training = model.training
    model.train(train_mode)
    lean = features.get("lean_activations") and with_grad
    amp = torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None)
    try:
        for part in parts:
            with torch.set_grad_enabled(with_grad), amp, (rebuild_norm_outputs() if lean else contextlib.nullcontext()):
                seq = completion_logps(model, part, chunk_size=chunk_size, full_head=not features.get("fused_head"))
                # parts renumber their sequences; map back through the dataset index of each example
                local = _global_seq(batch, part)
                table[local[part.token_seq].cpu(), part.token_pos.cpu()] = seq.token_logps.detach().double().cpu()
                if with_grad:
                    loss = (seq.logps.double() * weights[local]).sum() / batch.num_seqs
                    got = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
                    for acc, g in zip(grads, got):
                        if g is not None:
                            acc += g.float()
    finally:
        model.train(was_training)
    return Probe(table, grads)


def _global_seq(batch: PackedBatch, part: PackedBatch) -> torch.Tensor:
    """For each sequence number of ``part``, its number in ``batch`` (split_rows renumbers)."""
    if part is batch:
        return torch.arange(batch.num_seqs, device=batch.token_seq.device)
    n = batch.num_completions
    slot = {int(e): i for i, e in enumerate(batch.example_index.tolist())}
    ids = [slot[int(e)] * n + j for e in part.example_index.tolist() for j in range(n)]
    return torch.tensor(ids, dtype=torch.long, device=part.token_seq.device)


def _grad_distance(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """(|got - want|, |want|) over all the check's gradients."""
    num = sum(float((g - h).double().pow(2).sum()) for g, h in zip(got, want)) ** 0.5
    return num, sum(float(h.double().pow(2).sum()) for h in want) ** 0.5


def compare(fast: Probe, plain: Probe, tol: Tolerance, exact: Probe | None = None) -> str | None:
    """None when ``fast`` matches ``plain`` within ``tol``; else what differed, in words.

    ``exact``: the plain path in float32, when the run computes in low precision. Two correct bf16
    computations that round in another order (another kernel, another padding) differ by bf16's own
    noise, which grows with the logits' spread: on a GPU, a trained-looking model's FlexAttention
    rows and SDPA rows differ by ~0.04 nats a token on average, as far as each is from float32. So
    a fast path that is outside ``tol`` of the plain path still passes when it is no further from
    float32 than the plain path is (:data:`NOISE_RATIO`): it is as exact as the dtype allows.
    """
    a, b = fast.token_logps, plain.token_logps
    if a.shape != b.shape or not torch.equal(torch.isnan(a), torch.isnan(b)):
        return "scores different tokens"
    real = ~torch.isnan(b)
    if not torch.isfinite(a[real]).all():
        return "gives non-finite log-probs"
    diff = (a[real] - b[real]).abs()
    seq_a, seq_b = a.nan_to_num().sum(1), b.nan_to_num().sum(1)
    rel = ((seq_a - seq_b).abs() / seq_b.abs().clamp_min(1.0)).max().item()
    if diff.max().item() > tol.token_max or diff.mean().item() > tol.token_mean:
        if exact is None or exact.token_logps.shape != b.shape:
            return (f"log-probs differ by up to {diff.max().item():.3g} nats a token "
                    f"(sequences by up to {rel:.2%})")
        c = exact.token_logps[real]
        ours, theirs = (a[real] - c).abs(), (b[real] - c).abs()
        exact_tol = TOLERANCES[torch.float32]
        if (ours.mean().item() > NOISE_RATIO.token_mean * theirs.mean().item() + exact_tol.token_mean
                or ours.max().item() > NOISE_RATIO.token_max * theirs.max().item() + exact_tol.token_max):
            return (f"log-probs differ by up to {diff.max().item():.3g} nats a token (sequences by up to "
                    f"{rel:.2%}), and from float32 by {ours.mean().item():.3g} a token on average against "
                    f"the plain path's {theirs.mean().item():.3g}")
    if fast.grads is not None and plain.grads is not None:
        num, den = _grad_distance(fast.grads, plain.grads)
        if not (num <= tol.grad * max(den, 1e-12)):
            if exact is None or exact.grads is None:
                return f"gradients differ by {num / max(den, 1e-12):.2%}"
            ours, scale = _grad_distance(fast.grads, exact.grads)
            theirs, _ = _grad_distance(plain.grads, exact.grads)
            if not (ours <= NOISE_RATIO.grad * theirs + TOLERANCES[torch.float32].grad * max(scale, 1e-12)):
                return (f"gradients differ by {num / max(den, 1e-12):.2%}, and from float32 by "
                        f"{ours / max(scale, 1e-12):.2%} against the plain path's {theirs / max(scale, 1e-12):.2%}")
    return None


# ---------------------------------------------------------------------------- deciding


def _with_implications(features: dict[str, bool], name: str, value: bool) -> dict[str, bool]:
    out = dict(features, **{name: value})
    if not value:
        for other in IMPLIES_OFF.get(name, ()):
            out[other] = False
    return out


LOW_PRECISION = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def _float32_weights(model: torch.nn.Module):
    """The model's low-precision tensors in float32 for the while, then back (bf16 -> float32 -> bf16
    is exact); tensors already in float32 (a rotary table, say) are left as they are."""
    moved = [(t, t.dtype) for t in [*model.parameters(), *model.buffers()] if t.dtype in LOW_PRECISION]
    try:
        for t, _ in moved:
            t.data = t.data.float()
        yield
    finally:
        for t, dtype in moved:
            t.data = t.data.to(dtype)


def float32_references(model: torch.nn.Module, rows: Sequence, grad_rows: Sequence | None,
                       common: dict) -> tuple[Probe | None, Probe | None]:
    """The plain path in float32 (no autocast; low-precision weights upcast for the while): what
    :func:`compare` holds a low-precision fast path's distance against. (None, None) when float32
    does not fit in memory: the fixed tolerances alone then decide."""
    exact = dict(common, autocast=None)
    plain = dict.fromkeys(ORDER, False)
    try:
        with _float32_weights(model):
            return (measure(model, rows, features=plain, train_mode=False, with_grad=False, **exact),
                    measure(model, grad_rows, features=plain, train_mode=False, with_grad=True, **exact)
                    if grad_rows is not None else None)
    except torch.cuda.OutOfMemoryError:  # the same class as torch.OutOfMemoryError
        log.warning("fast-path check: the model in float32 does not fit beside the run; low-precision fast "
                    "paths are held to the fixed tolerances alone")
        return None, None


def decide(model: torch.nn.Module, rows: Sequence, requested: dict[str, bool], *, pad_id: int, with_grad: bool,
           split: bool, chunk_size: int, device, dtype: torch.dtype, autocast: torch.dtype | None = None) -> FastPaths:
    """Run the check and leave ``model`` patched as decided (see the module docstring).

    ``dtype`` is the run's compute dtype (the tolerances follow it); ``autocast`` the mixed precision
    both paths run under, if any."""
    start = time.perf_counter()
    arch = type(model).__name__
    tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    requested = {k: bool(requested.get(k, False)) for k in ORDER}
    # Log-probs on every check row (the longest included, for windows and long positions), without
    # gradients; gradients on the shortest rows only: a backward's faults do not depend on length,
    # and the plain path keeps every activation of what it differentiates (no lean forwards there).
    shortest = sorted(rows, key=lambda ex: len(ex.prompt_ids) + sum(len(c) for c in ex.completions))[:2]
    grad_rows = [_shortened(ex, GRAD_TOKENS) for ex in shortest]
    common = dict(pad_id=pad_id, split=split, chunk_size=chunk_size, device=device, autocast=autocast)
    with plain_model(model):
        reference = measure(model, rows, features=dict.fromkeys(ORDER, False), train_mode=False, with_grad=False,
                            **common)
        reference_grad = (measure(model, grad_rows, features=dict.fromkeys(ORDER, False), train_mode=False,
                                  with_grad=True, **common) if with_grad else None)

    @functools.cache
    def exact() -> tuple[Probe | None, Probe | None]:
        # measured the first time a low-precision fast path misses the fixed tolerance, not before: most
        # runs never need it, and a float32 pass of a large model is seconds of start-up (with the
        # patches removed for the while, as the plain path above)
        with plain_model(model):
            return float32_references(model, rows, grad_rows if with_grad else None, common)

    def judged(got: Probe, truth: Probe, grad: bool) -> str | None:
        why = compare(got, truth, tol)
        if why is None or dtype not in LOW_PRECISION:
            return why
        best = exact()[1 if grad else 0]
        return why if best is None else compare(got, truth, tol, best)

    def probe(features: dict[str, bool], train_mode: bool) -> tuple[dict[str, bool], str | None]:
        applied = apply_patches(model, features)
        packed = bool(applied.get("packing") and applied.get("masks"))
        # as the run lays the rows out and, with packing, all in one row: a model whose segments leak
        # into each other (a sparse-attention indexer, a recurrence) may not show it in the first
        runs = [(rows, False, False, reference)] + ([(rows, True, False, reference)] if packed else [])
        if with_grad:
            runs.append((grad_rows, packed, True, reference_grad))
        try:
            for these, one_row, grad, truth in runs:
                got = measure(model, these, features=applied, train_mode=train_mode, with_grad=grad,
                              one_row=one_row, **common)
                why = judged(got, truth, grad)
                if why is not None:
                    return applied, why
        except Exception as e:  # noqa: BLE001 -- a fast path that raises is a fast path that does not work here
            if isinstance(e, (KeyboardInterrupt, MemoryError)) or "out of memory" in str(e).lower():
                raise
            first = str(e).splitlines()[0][:160] if str(e) else ""
            return applied, f"raises {type(e).__name__}: {first}"
        return applied, None

    train_mode = with_grad     # scoring compares evaluation mode with evaluation mode
    current, why = probe(requested, train_mode)
    initial = dict(current)   # what could be applied at all (block attention needs SDPA, ...)
    off: dict[str, str] = {}
    if why is not None:
        switched = []
        for name in ORDER:
            if not current.get(name):
                continue
            switched.append((name, why))
            current, why = probe(_with_implications(current, name, False), train_mode)
            if why is None:
                break
        if why is not None and train_mode:   # even the plain path differs in training mode
            train_mode = False
            off_reason = why
            current, why = probe(current, train_mode)
            log.warning("fast-path check (%s, %s): the model in training mode differs from evaluation mode "
                        "(%s), which prefopt could not switch off; the policy trains in evaluation mode",
                        arch, _dtype_name(dtype), off_reason)
        for name, reason in switched:
            off[name] = reason
        # only the culprits stay off: retry each feature switched off before the last one (all of them
        # when training mode was the cause), one at a time, the plainest first so that what it implies
        # can be retried after it
        retry = switched if not train_mode and with_grad else switched[:-1]
        for name, _ in reversed(retry):
            if current.get(name) or any(name in IMPLIES_OFF.get(k, ()) and not current.get(k) for k in ORDER):
                continue
            trial, trial_why = probe(_with_implications(current, name, True), train_mode)
            if trial_why is None and trial.get(name):
                current = trial
                off.pop(name, None)
            else:
                off[name] = trial_why or off[name]
                current = apply_patches(model, current)
        off = {k: v for k, v in off.items() if not current.get(k)}
        for name, reason in off.items():
            if any(name in IMPLIES_OFF.get(k, ()) for k in off):
                continue  # it went with another feature, named in that one's line
            implied = [LABELS[k] for k in IMPLIES_OFF.get(name, ()) if initial.get(k)]
            log.warning("fast-path check (%s, %s): %s: %s; switched off%s", arch, _dtype_name(dtype),
                        LABELS[name], reason, f" (and with it {', '.join(implied)})" if implied else "")
    result = FastPaths(features=current, off=off,
                       train_mode=train_mode or not with_grad, architecture=arch, dtype=_dtype_name(dtype),
                       seconds=time.perf_counter() - start)
    apply_patches(model, current)
    return result


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------- caching


def config_digest(model: torch.nn.Module) -> str:
    """What of the model's configuration changes numbers: all of it (rope scaling, norm epsilon,
    windows, logit scaling, ...) but the attention implementation, which the features cover."""
    config = getattr(model, "config", None)
    if config is None:
        return ""
    d = config.to_dict()
    for k in ("_attn_implementation", "_attn_implementation_internal", "attn_implementation",
              "transformers_version", "_name_or_path", "architectures"):
        d.pop(k, None)
    return hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def versions() -> dict[str, str]:
    import transformers

    import prefopt

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "prefopt": getattr(prefopt, "__version__", "0")}


def _row_key(ex) -> list:
    """A check row as the cache key sees it: its ids, and its completion masks when it has any."""
    masks = getattr(ex, "completion_masks", None)
    return [ex.prompt_ids, ex.completions] + ([masks] if masks is not None else [])


def check_key(weights_digest: str, model: torch.nn.Module, rows: Sequence, requested: dict[str, bool],
              **settings) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": CHECK_VERSION, "w": weights_digest, "c": config_digest(model), "env": versions(),
                         "arch": type(model).__name__, "attn": _attn(model), "req": requested,
                         "rows": [_row_key(ex) for ex in rows], **settings},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def cached_decide(model: torch.nn.Module, rows: Sequence, requested: dict[str, bool], *, cache_file: Path | None,
                  **kwargs) -> FastPaths:
    """:func:`decide`, or its earlier result for the same model, data rows, options and versions."""
    if cache_file is not None and cache_file.exists():
        try:
            saved = json.loads(cache_file.read_text())
            result = FastPaths(**saved, cached=True)
        except (OSError, ValueError, TypeError):
            result = None
        if result is not None:
            result.features = apply_patches(model, result.features)
            return result
    result = decide(model, rows, requested, **kwargs)
    if cache_file is not None:
        write_json(cache_file, result.to_json())
    return result


def requested_features(cfg, *, sharded: bool = False, recomputing: bool = False,
                       zero3: bool = False) -> dict[str, bool]:
    """The fast paths a run asks for, from its config (and what its engine allows: ZeRO-3 holds the
    head's weight whole only inside the head module's own forward, so the fused head is off there)."""
    return {
        "lean_activations": cfg.lean_activations and not sharded,
        "trim_last_layer": cfg.trim_last_layer and not (recomputing or sharded),
        "fused_head": not cfg.full_lm_head and not zero3,
        "block_attention": cfg.block_attention,
        "packing": cfg.packing,
        "prefix_sharing": cfg.prefix_sharing,
        "masks": not cfg.plain_path,
    }


def settings_from(features: dict[str, bool]) -> dict[str, bool]:
    """The config fields that carry a decision."""
    return {"lean_activations": features["lean_activations"], "trim_last_layer": features["trim_last_layer"],
            "full_lm_head": not features["fused_head"], "block_attention": features["block_attention"],
            "packing": features["packing"], "prefix_sharing": features["prefix_sharing"],
            "plain_path": not features["masks"]}

