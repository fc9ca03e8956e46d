"""prefopt's custom autograd functions under autocast (accelerate's ``mixed_precision: bf16``).

Autocast runs a function's forward with its matrix products in bfloat16, but autograd runs the
backward outside any autocast block: a backward that recomputes (or multiplies by) what the
forward had in bfloat16 must do so the way the forward did. Each function is compared with
plain autograd through the computation it replaces, run under the same autocast, and also in
float32 and with bfloat16 weights without autocast. All on the CPU, in bfloat16.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from prefopt.batching import collate
from prefopt.fastpath import apply_patches
from prefopt.layers import _RMSNorm, _SwiGLU, rebuild_norm_outputs
from prefopt.logprobs import _HeadLogps, completion_logps

from test_logprobs import examples

# float32: the same arithmetic in another order differs by a few float32 ulps (~1e-7) of the
# largest entry. bfloat16 keeps 8 significant bits, so one rounding moves a value by up to 2**-9
# of itself; the two sides round at different places (the norm's input gradient rounded to
# bfloat16 by autograd before its float32 arithmetic, a matrix product over all rows against one
# summed chunk by chunk in float32), measured up to 0.5% of the largest entry. 2**-6 (1.6%)
# leaves a margin of three; the faults this file exists for (float32 logits against a bfloat16
# log-sum-exp, float32 products against the bfloat16 ones autograd takes) give 6 to 8%, or fail.
TIGHT = 1e-5
BF16 = 2 ** -6

# (parameter dtype, input dtype, autocast on). Under bf16 autocast with float32 weights the
# residual stream stays float32 (the norms output float32) but a projection's output -- Qwen3's
# per-head q/k norms read one -- is bfloat16, so both input dtypes occur.
MODES = {
    "float32": (torch.float32, torch.float32, False),
    "bf16-weights": (torch.bfloat16, torch.bfloat16, False),
    "autocast": (torch.float32, torch.float32, True),
    "autocast-bf16-input": (torch.float32, torch.bfloat16, True),
}


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def tensors(*shapes, dtype, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(dtype).requires_grad_() for s in shapes]


def gradients(out: torch.Tensor, inputs, seed: int = 1):
    """Gradients of a fixed random combination of ``out``, taken outside autocast (as in training)."""
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out.float() * up).sum(), inputs)


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    assert got.dtype == want.dtype and got.shape == want.shape
    return (got.float() - want.float()).abs().max().item() <= tol * want.float().abs().max().item()


def check(fn, ref, inputs, autocast_on: bool, tol: float, exact_forward: bool):
    """``fn`` and plain autograd through ``ref``: same forward, gradients of every input within ``tol``."""
    clones = [t.detach().clone().requires_grad_() for t in inputs]
    with autocast(autocast_on):
        got = fn(*inputs)
        want = ref(*clones)
    assert got.dtype == want.dtype
    assert torch.equal(got, want) if exact_forward else close(got, want, TIGHT)
    for i, (a, b) in enumerate(zip(gradients(got, inputs), gradients(want, clones))):
        assert close(a, b, tol), f"gradient of input {i}: {(a.float() - b.float()).abs().max().item():.3g}"


def tolerance(mode: str) -> float:
    return TIGHT if mode == "float32" else BF16


@pytest.mark.parametrize("mode", MODES)
def test_rmsnorm(mode):
    wdtype, xdtype, on = MODES[mode]
    x, = tensors((3, 5, 32), dtype=xdtype)
    w, = tensors((32,), dtype=wdtype, seed=2)

    def ref(x, w):  # transformers' LlamaRMSNorm.forward
        xf = x.to(torch.float32)
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    check(lambda x, w: _RMSNorm.apply(x, w, 1e-6), ref, [x, w], on, tolerance(mode), exact_forward=True)


@pytest.mark.parametrize("mode", MODES)
def test_swiglu(mode):
    wdtype, xdtype, on = MODES[mode]
    x, = tensors((3, 5, 32), dtype=xdtype)
    wg, wu, wd = tensors((64, 32), (64, 32), (32, 64), dtype=wdtype, seed=2, scale=0.2)

    def ref(x, wg, wu, wd):  # transformers' LlamaMLP.forward with bias-free linears
        return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)

    check(_SwiGLU.apply, ref, [x, wg, wu, wd], on, tolerance(mode), exact_forward=True)


def chunked_head(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int) -> torch.Tensor:
    """As :func:`prefopt.logprobs.completion_logps` runs the head: chunks, the last one kept."""
    n = h.shape[0]
    return torch.cat([_HeadLogps.apply(h[s:s + chunk], w, t[s:s + chunk], s + chunk >= n)
                      for s in range(0, n, chunk)])


@pytest.mark.parametrize("chunk", [8, 64])  # three chunks (two recomputed in the backward, one kept); one
@pytest.mark.parametrize("mode", MODES)
def test_head_logps(mode, chunk):
    wdtype, xdtype, on = MODES[mode]
    h, = tensors((23, 16), dtype=xdtype)
    w, = tensors((41, 16), dtype=wdtype, seed=2, scale=2.0)  # logits of a few tens, as in a trained model
    t = torch.randint(0, 41, (23,), generator=torch.Generator().manual_seed(3))

    def ref(h, w):  # the model's own lm_head, then log_softmax in float32
        return F.linear(h, w).float().log_softmax(-1).gather(-1, t[:, None]).squeeze(-1)

    check(lambda h, w: chunked_head(h, w, t, chunk), ref, [h, w], on, tolerance(mode), exact_forward=False)


# Model level: a whole step's log-probs and gradients through a 2-layer Llama. Both sides run
# every matrix product in bfloat16, but on different layouts (prefix sharing and packing vs one
# sequence per row, the head in chunks vs at once, the last MLP on the head's rows only), so
# their roundings differ throughout and propagate through both layers: measured, 0.4% of the
# gradients' norm and 0.06 nats a sequence at most. A float32 recompute of the head's logits
# against their bfloat16 log-sum-exp puts the gradients 3.8% off (a bfloat16 rounding of each
# logit, so it grows with the logits: the head is scaled to give a trained model's spread).
SEQ_NATS = 0.2
GRAD_NORM = 0.015


def step(model, batch, lean: bool):
    with autocast(True), rebuild_norm_outputs() if lean else contextlib.nullcontext():
        lp = completion_logps(model, batch, chunk_size=16).logps
    weights = torch.linspace(-1, 1, lp.numel())
    return lp.detach(), torch.autograd.grad((lp * weights).sum(), list(model.parameters()))


@pytest.mark.parametrize("lean", [True, False])  # without lean activations only the head is custom
def test_model_under_autocast(tiny_model_dir, lean):
    """The fast paths against the plain model, float32 weights under bf16 autocast."""
    plain = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    with torch.no_grad():
        plain.lm_head.weight.mul_(100)  # logits of std ~10 (the initialisation's are ~0.1)
    fast = copy.deepcopy(plain)
    got = apply_patches(fast, {"lean_activations": lean, "trim_last_layer": True, "fused_head": True,
                               "block_attention": True, "masks": True})
    assert got["lean_activations"] == lean and got["trim_last_layer"] and got["block_attention"]
    exs = examples()
    batch = collate(exs, pad_token_id=0)
    assert batch.target_ids.numel() > 3 * 16  # several head chunks
    lp_fast, g_fast = step(fast, batch, lean)
    lp_plain, g_plain = step(plain, collate(exs, pad_token_id=0, plain=True), lean=False)
    assert (lp_fast - lp_plain).abs().max() <= SEQ_NATS
    num = sum((a - b).double().pow(2).sum() for a, b in zip(g_fast, g_plain)) ** 0.5
    den = sum(b.double().pow(2).sum() for b in g_plain) ** 0.5
    assert num <= GRAD_NORM * den, f"gradients differ by {num / den:.2%}"
