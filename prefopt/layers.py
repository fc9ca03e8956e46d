"""Leaner activation memory for the two commonest decoder pieces: RMSNorm and the SwiGLU MLP.

Autograd keeps every intermediate an op needs for its backward. In a Llama-style block
that means, per token and layer, the MLP's ``silu(gate)`` and ``silu(gate) * up``
(two tensors of the intermediate width) and RMSNorm's normalised input, although each is
one cheap element-wise op away from tensors that are kept anyway. The two functions here
keep only what cannot be recomputed for free -- the MLP's input, ``gate`` and ``up``; the
norm's input and ``1/rms`` -- and rebuild the rest in the backward. No matrix product is
recomputed, so the cost is a few element-wise passes; on the 27M-parameter benchmark model
this removes about a third of the saved activations (``docs/benchmarks.md``). In training,
:func:`rebuild_norm_outputs` goes one step further: the norms' outputs, which the next
layers keep, are rebuilt from what the norm keeps.

The forward computes exactly what the transformers modules compute, op for op, so outputs
are bit-identical. :func:`slim_activations` patches a module only after checking that on a
random input; a module whose structure or arithmetic differs (Gemma's ``1 + weight`` norm,
GELU MLPs, biases, LoRA-wrapped projections) keeps its own forward. Distributed engines
that gather parameters in sub-module hooks (DeepSpeed ZeRO-3, FSDP) need those hooks to run,
so the trainer does not patch under them.
"""
from __future__ import annotations

import contextlib
import types
import weakref

import torch
import torch.nn.functional as F
from torch import nn


def autocast_state(t: torch.Tensor) -> tuple[str, torch.dtype, bool]:
    """Autocast's setting, now, for ``t``'s device. A custom function's forward runs under the
    caller's autocast, but autograd runs its backward outside any: the forward saves this so the
    backward can run its products as the forward ran them (``torch.amp.custom_bwd``'s job, for a
    device known only at run time: these functions serve the CPU and CUDA alike)."""
    device = t.device.type
    return device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)


def autocast_as(state: tuple[str, torch.dtype, bool]) -> torch.autocast:
    """Autocast set as :func:`autocast_state` found it (off if it was off)."""
    device, dtype, enabled = state
    return torch.autocast(device, dtype=dtype, enabled=enabled)


def _scaled(xf: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm's output from its float32 input and ``1/rms``: one definition for the forward and
    the rebuild in :func:`rebuild_norm_outputs`, so the two are bit-identical by construction."""
    return weight * (xf * rstd).to(dtype)


class _RMSNorm(torch.autograd.Function):
    """``weight * (x / rms(x))``, saving ``x`` and ``1/rms`` only.

    Nothing here is an op autocast recasts (no matrix product; the float32 steps are explicit
    casts), so forward and backward compute the same with autocast on or off.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        out = _scaled(xf, weight, rstd, x.dtype)
        if _norm_outputs is not None:
            _norm_outputs[id(out)] = (weakref.ref(out), _Recipe(x, weight, rstd, x._version), out._version)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            dn = (grad * weight).to(torch.float32)
            grad_x = (rstd * (dn - normed * (dn * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class _SwiGLU(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` for bias-free linears, saving ``x``, ``gate`` and ``up``.

    Under autocast the forward's products run in autocast's dtype (``gate`` and ``up`` are kept
    in it); the backward's products run under the same autocast, so each takes its operands in
    the dtype autograd would have saved for it. Gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor):
        gate = F.linear(x, w_gate)
        up = F.linear(x, w_up)
        out = F.linear(F.silu(gate) * up, w_down)
        ctx.save_for_backward(x, w_gate, w_up, w_down, gate, up)
        ctx.autocast = autocast_state(x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w_gate, w_up, w_down, gate, up = ctx.saved_tensors
        need_x, need_g, need_u, need_d = ctx.needs_input_grad[:4]
        with autocast_as(ctx.autocast):
            act = F.silu(gate)
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_down = g2.t() @ (act * up).reshape(-1, up.shape[-1]) if need_d else None
            d_hidden = grad @ w_down                                   # d(loss)/d(silu(gate) * up)
            d_up = d_hidden * act
            del act
            d_gate = torch.ops.aten.silu_backward(d_hidden.mul_(up), gate)  # autograd's own silu derivative
            x2 = x.reshape(-1, x.shape[-1])
            grad_gate = d_gate.reshape(-1, d_gate.shape[-1]).t() @ x2 if need_g else None
            grad_up = d_up.reshape(-1, d_up.shape[-1]).t() @ x2 if need_u else None
            grad_x = (d_gate @ w_gate).add_(d_up @ w_up) if need_x else None
        return _in_dtypes((grad_x, grad_gate, grad_up, grad_down), (x, w_gate, w_up, w_down))


def _in_dtypes(grads, inputs) -> tuple:
    """Each gradient in its input's dtype (a product under autocast gives its own)."""
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, inputs))


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and m.bias is None


def _rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self._prefopt_eps)


def _swiglu_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs or not (_plain_linear(self.gate_proj) and _plain_linear(self.up_proj)
                              and _plain_linear(self.down_proj)):
        return type(self).forward(self, x, *args, **kwargs)   # e.g. LoRA added after patching
    return _SwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


def _same(module: nn.Module, patched, width: int) -> bool:
    """Patched and original forward agree on a random input (checked in float64 for the math)."""
    p = next(module.parameters())
    x = torch.randn(2, 3, width, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        want = type(module).forward(module, x)
        got = patched(module, x)
    return isinstance(want, torch.Tensor) and want.shape == got.shape and torch.equal(want, got)


def slim_activations(model: nn.Module) -> dict[str, int]:
    """Patch every RMSNorm and SwiGLU MLP of ``model`` that matches; return counts per kind."""
    counts = {"rmsnorm": 0, "swiglu": 0}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter) \
                and module.weight.dim() == 1:
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            if not isinstance(eps, float):
                continue
            module._prefopt_eps = eps
            if _same(module, _rmsnorm_forward, module.weight.shape[0]):
                _set_forward(module, types.MethodType(_rmsnorm_forward, module))
                module._prefopt_lean = True
                counts["rmsnorm"] += 1
        elif all(_plain_linear(getattr(module, a, None)) for a in ("gate_proj", "up_proj", "down_proj")) \
                and hasattr(module, "act_fn"):
            if _same(module, _swiglu_forward, module.gate_proj.in_features):
                _set_forward(module, types.MethodType(_swiglu_forward, module))
                module._prefopt_lean = True
                counts["swiglu"] += 1
    return counts


def _set_forward(module: nn.Module, forward) -> None:
    """Patch ``module``'s forward; under a trimmed last MLP the trim keeps wrapping the new one."""
    if "_prefopt_full" in module.__dict__:
        module._prefopt_full = forward
    else:
        module.forward = forward


def remove_lean_activations(model: nn.Module) -> int:
    """Undo :func:`slim_activations`: every patched module gets its own forward back."""
    count = 0
    for module in model.modules():
        if module.__dict__.pop("_prefopt_lean", False):
            if "_prefopt_full" in module.__dict__:      # trimmed as well: the trim now wraps the original
                module._prefopt_full = types.MethodType(type(module).forward, module)
            else:
                module.__dict__.pop("forward", None)
            count += 1
    return count


def untrim_last_mlp(model: nn.Module) -> bool:
    """Undo :func:`trim_last_mlp`; the MLP keeps a lean forward if it had one."""
    mlp = trimmed_mlp(model)
    if mlp is None:
        return False
    full = mlp.__dict__.pop("_prefopt_full")
    mlp.__dict__.pop("_prefopt_rows", None)
    if mlp.__dict__.get("_prefopt_lean"):
        mlp.forward = full
    else:
        mlp.__dict__.pop("forward", None)
    return True


@contextlib.contextmanager
def original_forwards(model: nn.Module):
    """Within this block every module patched here runs its own (transformers') forward."""
    saved = {}
    for module in model.modules():
        if "forward" in module.__dict__ and (module.__dict__.get("_prefopt_lean") or "_prefopt_full" in module.__dict__):
            saved[module] = module.__dict__.pop("forward")
    try:
        yield
    finally:
        for module, forward in saved.items():
            module.forward = forward


# --------------------------------------------------------------------------------------------
# Norm outputs rebuilt, not kept.
#
# A Llama block's two norm outputs are each kept for a backward that comes later: the input
# norm's by the q/k/v projections (for their weight gradients), the MLP norm's by the MLP. Both
# are one element-wise pass away from what the norm itself keeps (its input and ``1/rms``), so
# inside :func:`rebuild_norm_outputs` a saved-tensor hook stores a recipe instead and the
# backward rebuilds the tensor with the forward's own arithmetic (bit-identical). That is two
# of about fifteen hidden-width tensors kept per token and layer. The hook only touches
# tensors made by a patched norm (or views of them) in the current block; all else passes.

_norm_outputs: dict[int, tuple] | None = None  # id(output) -> (weakref(output), _Recipe, output's version)


class _Recipe:
    """What one norm output is made of. Its consumers (q, k and v share one) unpack it in turn
    during the backward; the first rebuilds it and the last lets it go."""

    __slots__ = ("x", "weight", "rstd", "version", "pending", "built")

    def __init__(self, x, weight, rstd, version):
        self.x, self.weight, self.rstd, self.version = x, weight, rstd, version
        self.pending, self.built = 0, None

    def take(self, view) -> torch.Tensor:
        if self.x._version != self.version:
            raise RuntimeError("a normalisation layer's input was modified in place after the forward; "
                               "its output cannot be rebuilt for the backward (train with --no-lean-activations)")
        out = self.built
        if out is None:
            out = _scaled(self.x.to(torch.float32), self.weight, self.rstd, self.x.dtype)
        self.pending -= 1
        self.built = out if self.pending > 0 else None
        return out if view is None else out.as_strided(*view)


def _pack(t: torch.Tensor):
    if _norm_outputs is None:
        return t
    for base in (t, t._base):
        entry = _norm_outputs.get(id(base)) if base is not None else None
        if entry is not None and entry[0]() is base and base._version == entry[2]:  # not changed in place since
            recipe = entry[1]
            recipe.pending += 1
            return recipe, None if base is t else (t.size(), t.stride(), t.storage_offset() - base.storage_offset())
    return t


def _unpack(saved):
    return saved[0].take(saved[1]) if isinstance(saved, tuple) else saved


@contextlib.contextmanager
def rebuild_norm_outputs():
    """Within this block, tensors output by patched norms are rebuilt for the backward, not kept."""
    global _norm_outputs
    previous, _norm_outputs = _norm_outputs, {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _norm_outputs = previous


# --------------------------------------------------------------------------------------------
# The last layer's MLP only where the LM head reads.
#
# The head reads the final hidden state at ``batch.hidden_index`` only: the last prompt token
# and the completion tokens. Earlier layers must still run at every position (later positions
# attend to their keys and values), but in the *last* layer a position's output feeds nothing
# but the head, and the MLP works position by position. So the last MLP can run on the read
# rows alone -- about a quarter of the benchmark's tokens are prompt tokens, and the MLP is two
# thirds of a Llama layer's matrix work -- and every number the head sees is unchanged.
# Unread rows get a zero MLP output; nothing downstream looks at them.


def _rows_mlp_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    rows = self._prefopt_rows  # PackedBatch.head_rows: distinct, since a repeated row would double its gradient
    if rows is None or args or kwargs:
        return self._prefopt_full(x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    out = self._prefopt_full(flat.index_select(0, rows))
    full = out.new_zeros(flat.shape[0], out.shape[-1]).index_copy(0, rows, out)
    return full.view(*x.shape[:-1], out.shape[-1])


def _last_layer(model: nn.Module) -> nn.Module | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(decoder, "h", None)  # GPT-2 style
    return layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None


def trimmed_mlp(model: nn.Module) -> nn.Module | None:
    """The last layer's MLP if :func:`trim_last_mlp` patched it, else None."""
    layer = _last_layer(model)
    mlp = getattr(layer, "mlp", None)
    return mlp if mlp is not None and "_prefopt_full" in mlp.__dict__ else None


def trim_last_mlp(model: nn.Module) -> bool:
    """Let the last decoder layer's MLP run on the LM head's rows only (see above).

    Patched only when the MLP is position-wise: a plain module (no experts or router, whose
    load-balancing statistics span positions) whose output on a subset of rows matches its
    output on all rows, checked on a random input. Call after :func:`slim_activations`.
    """
    if trimmed_mlp(model) is not None:
        return True
    mlp = getattr(_last_layer(model), "mlp", None)
    if not isinstance(mlp, nn.Module):
        return False
    names = {n.split(".")[-1] for n, _ in mlp.named_modules()}
    if names & {"experts", "router", "gate", "shared_expert"}:  # mixture-of-experts blocks
        return False
    p = next(mlp.parameters(), None)
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if p is None or not isinstance(width, int):
        return False
    x = torch.randn(2, 5, width, device=p.device, dtype=p.dtype)
    rows = torch.tensor([1, 4, 7], device=p.device)
    with torch.no_grad():
        try:
            full = mlp(x)
            part = mlp(x.reshape(-1, width).index_select(0, rows))
        except (RuntimeError, TypeError, ValueError):
            return False
    if not (isinstance(full, torch.Tensor) and isinstance(part, torch.Tensor) and full.shape[:-1] == x.shape[:-1]
            and torch.allclose(full.reshape(-1, full.shape[-1]).index_select(0, rows), part, atol=1e-5, rtol=1e-4)):
        return False
    mlp._prefopt_full = mlp.forward          # the current forward (lean or original), bound
    mlp._prefopt_rows = None
    mlp.forward = types.MethodType(_rows_mlp_forward, mlp)
    return True
