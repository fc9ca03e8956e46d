"""Tests for prefopt.losses.

Every expected value is computed independently here with ``math`` on Python floats from
the paper's formula; gradients are checked against their closed forms.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import random

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.losses import (EXO_DEFAULT_EPSILON, LOSSES, LossOutput, LossParams, PairLogps, check_loss_options,
                            compute_loss, kto_loss, ld_logps, needs_reference, wpo_pair_weights)

# ----------------------------------------------------------------------------- fixtures

# Three pairs: policy / reference summed log-probs and token counts.
PC = [-4.0, -7.5, -2.0]
PR = [-5.0, -6.0, -9.0]
RC = [-4.5, -7.0, -3.0]
RR = [-4.0, -6.5, -8.0]
TC = [4.0, 10.0, 2.0]
TR = [5.0, 6.0, 12.0]
DW = [a - b for a, b in zip(PC, RC)]    # [0.5, -0.5, 1.0]
DL = [a - b for a, b in zip(PR, RR)]    # [-1.0, 0.5, -1.0]
H = [w - l for w, l in zip(DW, DL)]     # [1.5, -1.0, 2.0]


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x


def dsig(x: float) -> float:
    return sig(x) * (1.0 - sig(x))


def pair(chosen, rejected, tc=None, tr=None, grad=False) -> PairLogps:
    n = len(chosen)
    tc = tc if tc is not None else [1.0] * n
    tr = tr if tr is not None else [1.0] * n
    return PairLogps(torch.tensor(chosen, dtype=torch.float32, requires_grad=grad),
                     torch.tensor(rejected, dtype=torch.float32, requires_grad=grad),
                     torch.tensor(tc, dtype=torch.float32), torch.tensor(tr, dtype=torch.float32))


def run(names, params=None, pc=PC, pr=PR, rc=RC, rr=RR, tc=TC, tr=TR, weights=None, ref=True,
        sample_weights=None):
    """Compute the loss; return (output, d sum(losses)/d policy chosen, .../d rejected)."""
    names = [names] if isinstance(names, str) else names
    policy = pair(pc, pr, tc, tr, grad=True)
    reference = pair(rc, rr, tc, tr) if ref else None
    out = compute_loss(names, weights, policy, reference, params or LossParams(), sample_weights)
    out.losses.sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (policy.chosen, policy.rejected)]
    return out, grads[0].tolist(), grads[1].tolist()


# ----------------------------------------------------------------------------- DPO


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_worked_example_probabilities(beta):
    # pi_theta(y1|x)=0.6, pi_theta(y2|x)=0.4, pi_ref = 0.5 / 0.5
    out, gc, gr = run("sigmoid", LossParams(beta=beta), pc=[math.log(0.6)], pr=[math.log(0.4)],
                      rc=[math.log(0.5)], rr=[math.log(0.5)], tc=[1.0], tr=[1.0])
    h = math.log(0.6 / 0.5) - math.log(0.4 / 0.5)        # = log 1.5
    assert out.losses.item() == approx(math.log1p(1.5 ** -beta))
    assert out.losses.item() == approx(-logsig(beta * h))
    assert gc[0] == approx(-beta * sig(-beta * h))
    assert gr[0] == approx(beta * sig(-beta * h))
    assert out.chosen_rewards.item() == approx(beta * math.log(1.2))
    assert out.rejected_rewards.item() == approx(beta * math.log(0.8))


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_worked_example_log_probs(beta):
    # log-probs -0.2/-0.8 (policy) vs -0.3/-0.7 (reference): h = 0.1 - (-0.1) = 0.2
    out, _, _ = run("sigmoid", LossParams(beta=beta), pc=[-0.2], pr=[-0.8], rc=[-0.3], rr=[-0.7],
                    tc=[1.0], tr=[1.0])
    assert out.losses.item() == approx(-logsig(0.2 * beta))
    assert out.losses.item() == approx(math.log1p(math.exp(-0.2 * beta)))


def test_sigmoid_value_and_gradient():
    beta = 0.3
    out, gc, gr = run("sigmoid", LossParams(beta=beta))
    for i, h in enumerate(H):
        r_w, r_l = beta * DW[i], beta * DL[i]
        assert out.losses[i].item() == approx(-logsig(beta * h))
        # d loss / d log pi(y_w) = -beta * sigma(r_l - r_w); rejected the opposite
        assert gc[i] == approx(-beta * sig(r_l - r_w))
        assert gr[i] == approx(beta * sig(r_l - r_w))
        assert gc[i] < 0 < gr[i]
        assert out.chosen_rewards[i].item() == approx(r_w)
        assert out.rejected_rewards[i].item() == approx(r_l)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.losses.dtype == torch.float32


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.7])
def test_cdpo_label_smoothing(eps):
    beta = 0.5
    out, gc, gr = run("sigmoid", LossParams(beta=beta, label_smoothing=eps))
    for i, h in enumerate(H):
        z = beta * h
        assert out.losses[i].item() == approx(-(1 - eps) * logsig(z) - eps * logsig(-z))
        g = -(1 - eps) * beta * sig(-z) + eps * beta * sig(z)
        assert gc[i] == approx(g)
        assert gr[i] == approx(-g)


def f_prime(delta: float, kind: str, alpha: float) -> float:
    u = math.exp(delta)
    return {"reverse_kl": math.log(u) + 1.0,
            "forward_kl": -1.0 / u,
            "js": math.log(2 * u / (1 + u)),
            "alpha": (1.0 - u ** (-alpha)) / alpha}[kind]


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_f_dpo_values_and_gradient(kind):
    beta, alpha = 0.4, 0.3
    params = LossParams(beta=beta, f_divergence=kind, f_alpha=alpha)
    out, gc, gr = run("sigmoid", params)
    step = 1e-4
    for i in range(3):
        hf = f_prime(DW[i], kind, alpha) - f_prime(DL[i], kind, alpha)
        assert out.losses[i].item() == approx(-logsig(beta * hf))
        # chain rule: d/dlogpi_w = -beta * sigma(-beta*hf) * f''(u) * u (f' as function of delta)
        dfw = (f_prime(DW[i] + step, kind, alpha) - f_prime(DW[i] - step, kind, alpha)) / (2 * step)
        dfl = (f_prime(DL[i] + step, kind, alpha) - f_prime(DL[i] - step, kind, alpha)) / (2 * step)
        assert gc[i] == pytest.approx(-beta * sig(-beta * hf) * dfw, rel=1e-4)
        assert gr[i] == pytest.approx(beta * sig(-beta * hf) * dfl, rel=1e-4)
        assert gc[i] < 0 < gr[i]        # f' is increasing for every divergence


def test_f_dpo_reverse_kl_equals_sigmoid():
    a, _, _ = run("sigmoid", LossParams(beta=0.2, f_divergence="reverse_kl", label_smoothing=0.1))
    b, _, _ = run("sigmoid", LossParams(beta=0.2, label_smoothing=0.1))
    assert torch.equal(a.losses, b.losses)


def test_f_dpo_js_stable_for_large_log_ratios():
    out, gc, _ = run("sigmoid", LossParams(f_divergence="js"), pc=[200.0], pr=[-200.0], rc=[0.0], rr=[0.0],
                     tc=[1.0], tr=[1.0])
    # f'_w -> log 2, f'_l = log 2 + log sigma(-200) ~ log 2 - 200: h_f = 200
    assert out.losses.item() == approx(-logsig(0.1 * 200.0))
    assert math.isfinite(gc[0])


# ----------------------------------------------------------------------------- robust, hinge, ipo


def test_robust_with_zero_epsilon_equals_sigmoid():
    a, ga, _ = run("robust", LossParams(beta=0.7))
    b, gb, _ = run("sigmoid", LossParams(beta=0.7))
    assert torch.allclose(a.losses, b.losses)
    assert ga == approx(gb)


def test_robust_value_and_gradient():
    beta, eps = 0.5, 0.2
    out, gc, gr = run("robust", LossParams(beta=beta, label_smoothing=eps))
    for i, h in enumerate(H):
        z = beta * h
        expected = ((1 - eps) * -logsig(z) - eps * -logsig(-z)) / (1 - 2 * eps)
        assert out.losses[i].item() == approx(expected)
        g = (-(1 - eps) * beta * sig(-z) - eps * beta * sig(z)) / (1 - 2 * eps)
        assert gc[i] == approx(g)
        assert gr[i] == approx(-g)
        assert gc[i] < 0 < gr[i]


def test_hinge_value_and_gradient():
    beta = 0.6      # beta*h = 0.9, -0.6, 1.2: the last pair is past the margin
    out, gc, gr = run("hinge", LossParams(beta=beta))
    for i, h in enumerate(H):
        assert out.losses[i].item() == approx(max(0.0, 1.0 - beta * h))
    assert gc == approx([-beta, -beta, 0.0])
    assert gr == approx([beta, beta, 0.0])


def test_ipo_summed_value_and_gradient():
    beta = 0.25     # target margin 1/(2 beta) = 2
    out, gc, gr = run("ipo", LossParams(beta=beta))
    for i, h in enumerate(H):
        assert out.losses[i].item() == approx((h - 1 / (2 * beta)) ** 2)
        assert gc[i] == approx(2 * (h - 1 / (2 * beta)))
        assert gr[i] == approx(-2 * (h - 1 / (2 * beta)))
    # below the target margin, raising chosen lowers the loss
    assert gc[0] < 0 < gr[0]


def test_ipo_length_normalized():
    beta = 0.25
    out, gc, gr = run("ipo", LossParams(beta=beta, ipo_length_normalize=True))
    for i in range(3):
        h = DW[i] / TC[i] - DL[i] / TR[i]
        assert out.losses[i].item() == approx((h - 1 / (2 * beta)) ** 2)
        assert gc[i] == approx(2 * (h - 1 / (2 * beta)) / TC[i])
        assert gr[i] == approx(-2 * (h - 1 / (2 * beta)) / TR[i])


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_minimum_at_half_inverse_beta(beta):
    hs = [k * 0.01 for k in range(-200, 1201)]
    policy = pair([h for h in hs], [0.0] * len(hs), grad=False)
    ref = pair([0.0] * len(hs), [0.0] * len(hs))
    values = compute_loss(["ipo"], None, policy, ref, LossParams(beta=beta)).losses
    best = hs[int(torch.argmin(values))]
    assert best == pytest.approx(1 / (2 * beta), abs=0.006)
    assert float(values.min()) == pytest.approx(0.0, abs=1e-4)


# ----------------------------------------------------------------------------- exo, nca, bco, sppo


@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_exo_pair_value_and_gradient(eps):
    beta = 0.5
    out, gc, gr = run("exo_pair", LossParams(beta=beta, label_smoothing=eps))
    assert EXO_DEFAULT_EPSILON == 1e-3
    e = eps if eps > 0 else 1e-3            # documented default smoothing
    for i, h in enumerate(H):
        p = sig(beta * h)
        expected = p * (math.log(p) - math.log(1 - e)) + (1 - p) * (math.log(1 - p) - math.log(e))
        assert out.losses[i].item() == approx(expected)
        # d/dh = beta p (1-p) (beta h - log((1-e)/e)): negative below the optimal margin
        g = beta * p * (1 - p) * (beta * h - math.log((1 - e) / e))
        assert gc[i] == approx(g)
        assert gr[i] == approx(-g)
        assert gc[i] < 0 < gr[i]


def test_nca_pair_value_and_gradient():
    beta = 0.8
    out, gc, gr = run("nca_pair", LossParams(beta=beta))
    for i in range(3):
        rw, rl = beta * DW[i], beta * DL[i]
        assert out.losses[i].item() == approx(-logsig(rw) - 0.5 * logsig(-rw) - 0.5 * logsig(-rl))
        assert gc[i] == approx(-beta * sig(-rw) + 0.5 * beta * sig(rw))
        assert gr[i] == approx(0.5 * beta * sig(rl))
        assert gr[i] > 0
    # for rewards below log 2 the chosen gradient pushes the chosen likelihood up
    assert gc[1] < 0


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_bco_pair_value_gradient_and_metric(delta):
    beta = 0.5
    out, gc, gr = run("bco_pair", LossParams(beta=beta, bco_delta=delta))
    for i in range(3):
        rw, rl = beta * DW[i], beta * DL[i]
        assert out.losses[i].item() == approx(-logsig(rw - delta) - logsig(-(rl - delta)))
        assert gc[i] == approx(-beta * sig(delta - rw))
        assert gr[i] == approx(beta * sig(rl - delta))
        assert gc[i] < 0 < gr[i]
    mean = sum(beta * d for d in DW + DL) / 6
    assert out.metrics["bco/reward_mean"].item() == approx(mean)
    assert out.metrics["bco/reward_mean"].dim() == 0


def test_sppo_hard_value_and_gradient():
    beta = 0.5          # eta = 1/beta: targets +1 for chosen, -1 for rejected
    out, gc, gr = run("sppo_hard", LossParams(beta=beta))
    for i in range(3):
        assert out.losses[i].item() == approx((DW[i] - 1.0) ** 2 + (DL[i] + 1.0) ** 2)
        assert gc[i] == approx(2 * (DW[i] - 1.0))
        assert gr[i] == approx(2 * (DL[i] + 1.0))
    # chosen log-ratio below its target 1/(2 beta): raising it lowers the loss
    assert gc[0] < 0 and gc[1] < 0
    # rejected log-ratio above its target -1/(2 beta): raising it raises the loss
    assert gr[1] > 0


# ----------------------------------------------------------------------------- aot


def test_aot_paired_value_and_gradient():
    beta, eps = 0.5, 0.1
    out, gc, gr = run("aot", LossParams(beta=beta, label_smoothing=eps))
    pm = sorted(c - r for c, r in zip(PC, PR))
    rm = sorted(c - r for c, r in zip(RC, RR))
    deltas = [a - b for a, b in zip(pm, rm)]
    for k, d in enumerate(deltas):
        assert out.losses[k].item() == approx(-(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d))
    # gradient: each policy margin gets the derivative of the quantile it landed in
    order = sorted(range(3), key=lambda i: PC[i] - PR[i])
    for k, i in enumerate(order):
        d = deltas[k]
        g = -(1 - eps) * beta * sig(-beta * d) + eps * beta * sig(beta * d)
        assert gc[i] == approx(g)
        assert gr[i] == approx(-g)
        assert gc[i] < 0 < gr[i]
    # rewards stay per pair
    assert out.chosen_rewards.tolist() == approx([beta * d for d in DW])


def test_aot_unpaired_value_and_gradient():
    beta = 0.5
    out, gc, gr = run("aot_unpaired", LossParams(beta=beta))
    sw, sl = sorted(DW), sorted(DL)
    deltas = [a - b for a, b in zip(sw, sl)]
    for k, d in enumerate(deltas):
        assert out.losses[k].item() == approx(-logsig(beta * d))
    order_w = sorted(range(3), key=lambda i: DW[i])
    order_l = sorted(range(3), key=lambda i: DL[i])
    for k in range(3):
        g = beta * sig(-beta * deltas[k])
        assert gc[order_w[k]] == approx(-g)
        assert gr[order_l[k]] == approx(g)
    assert all(g < 0 for g in gc) and all(g > 0 for g in gr)


def test_aot_single_pair_is_dpo():
    a, _, _ = run("aot", LossParams(beta=0.3), pc=[-1.0], pr=[-2.0], rc=[-1.5], rr=[-1.0], tc=[1.0], tr=[1.0])
    b, _, _ = run("sigmoid", LossParams(beta=0.3), pc=[-1.0], pr=[-2.0], rc=[-1.5], rr=[-1.0], tc=[1.0], tr=[1.0])
    assert torch.allclose(a.losses, b.losses)


# ----------------------------------------------------------------------------- apo


def test_apo_zero_value_and_gradient():
    beta = 0.7
    out, gc, gr = run("apo_zero", LossParams(beta=beta))
    for i in range(3):
        rw, rl = beta * DW[i], beta * DL[i]
        assert out.losses[i].item() == approx(1 - sig(rw) + sig(rl))
        assert gc[i] == approx(-beta * dsig(rw))
        assert gr[i] == approx(beta * dsig(rl))
        assert gc[i] < 0 < gr[i]


def test_apo_down_value_and_gradient():
    beta = 0.7
    out, gc, gr = run("apo_down", LossParams(beta=beta))
    for i in range(3):
        rw, z = beta * DW[i], beta * H[i]
        assert out.losses[i].item() == approx(sig(rw) + 1 - sig(z))
        assert gc[i] == approx(beta * dsig(rw) - beta * dsig(z))
        assert gr[i] == approx(beta * dsig(z))
        assert gr[i] > 0
    # at a zero margin, lowering chosen and rejected together lowers the loss
    out, gc, gr = run("apo_down", LossParams(beta=1.0), pc=[-1.0], pr=[-1.0], rc=[-1.0], rr=[-1.0],
                      tc=[1.0], tr=[1.0])
    assert gc[0] + gr[0] > 0


@pytest.mark.parametrize("name", ["apo_zero", "apo_down"])
def test_apo_bounded_in_zero_two(name):
    gen = torch.Generator().manual_seed(0)
    n = 4000
    policy = PairLogps(torch.randn(n, generator=gen) * 50, torch.randn(n, generator=gen) * 50,
                       torch.ones(n), torch.ones(n))
    ref = PairLogps(torch.randn(n, generator=gen) * 50, torch.randn(n, generator=gen) * 50,
                    torch.ones(n), torch.ones(n))
    for beta in (0.01, 0.1, 1.0, 10.0):
        values = compute_loss([name], None, policy, ref, LossParams(beta=beta)).losses
        assert float(values.min()) >= 0.0 and float(values.max()) <= 2.0
    # both ends are reached: (chosen, rejected) log-ratios giving 0 and 2
    ends = {"apo_zero": ([100.0, -100.0], [-100.0, 100.0]),
            "apo_down": ([-100.0, 100.0], [-300.0, 300.0])}[name]
    extreme = compute_loss([name], None, pair(*ends), pair([0.0, 0.0], [0.0, 0.0]), LossParams(beta=1.0)).losses
    assert extreme.tolist() == pytest.approx([0.0, 2.0], abs=1e-6)


# ----------------------------------------------------------------------------- discopop


def discopop_ref(rho: float, tau: float) -> tuple[float, float]:
    s = sig(rho / tau)
    logistic, expo = -logsig(rho), math.exp(-rho)
    value = (1 - s) * logistic + s * expo
    ds = s * (1 - s) / tau
    deriv = -ds * logistic + (1 - s) * (-sig(-rho)) + ds * expo - s * expo
    return value, deriv


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_discopop_value_and_gradient(tau):
    beta = 0.4
    out, gc, gr = run("discopop", LossParams(beta=beta, discopop_tau=tau))
    for i, h in enumerate(H):
        value, deriv = discopop_ref(beta * h, tau)
        assert out.losses[i].item() == approx(value)
        assert gc[i] == approx(beta * deriv)
        assert gr[i] == approx(-beta * deriv)
    # away from rho = 0 the loss decreases with the margin (it is non-monotone near 0)
    assert gc[0] < 0 and gc[1] < 0 and gc[2] < 0


def test_discopop_finite_at_extreme_margins():
    out, gc, gr = run("discopop", LossParams(beta=1.0), pc=[500.0, -500.0], pr=[-500.0, 500.0],
                      rc=[0.0, 0.0], rr=[0.0, 0.0], tc=[1.0, 1.0], tr=[1.0, 1.0])
    assert torch.isfinite(out.losses).all()
    assert all(math.isfinite(g) for g in gc + gr)
    assert out.losses[0].item() == approx(0.0)
    assert out.losses[1].item() == pytest.approx(1000.0, rel=1e-5)    # logistic branch, -log sigma(-1000)


# ----------------------------------------------------------------------------- sigmoid_norm, sft


def test_sigmoid_norm_value_and_gradient():
    beta, eps = 2.0, 0.05
    out, gc, gr = run("sigmoid_norm", LossParams(beta=beta, label_smoothing=eps))
    for i in range(3):
        z = beta * (DW[i] / TC[i] - DL[i] / TR[i])
        assert out.losses[i].item() == approx(-(1 - eps) * logsig(z) - eps * logsig(-z))
        g = -(1 - eps) * beta * sig(-z) + eps * beta * sig(z)
        assert gc[i] == approx(g / TC[i])
        assert gr[i] == approx(-g / TR[i])
        assert gc[i] < 0 < gr[i]
        # rewards stay beta * summed log-ratio for every reference loss
        assert out.chosen_rewards[i].item() == approx(beta * DW[i])


def test_sft_value_and_gradient():
    out, gc, gr = run("sft", LossParams(beta=0.5), ref=False)
    for i in range(3):
        assert out.losses[i].item() == approx(-PC[i] / TC[i])
        assert gc[i] == approx(-1.0 / TC[i])
        assert gr[i] == 0.0
        assert out.chosen_rewards[i].item() == approx(0.5 * PC[i] / TC[i])
    assert out.metrics["nll_loss"].item() == approx(sum(-c / t for c, t in zip(PC, TC)) / 3)


def test_sigmoid_plus_sft_is_rpo():
    params = LossParams(beta=0.3)
    out, gc, _ = run(["sigmoid", "sft"], params, weights=[1.0, 0.5])
    for i, h in enumerate(H):
        assert out.losses[i].item() == approx(-logsig(0.3 * h) + 0.5 * (-PC[i] / TC[i]))
        assert gc[i] == approx(-0.3 * sig(-0.3 * h) - 0.5 / TC[i])
    # rewards from the first loss (sigmoid: reference rewards)
    assert out.chosen_rewards.tolist() == approx([0.3 * d for d in DW])
    assert set(out.metrics) == {"nll_loss", "loss/sigmoid", "loss/sft"}


def test_rpo_alpha_adds_nll():
    out, gc, gr = run("sigmoid", LossParams(beta=0.3, rpo_alpha=2.0))
    for i, h in enumerate(H):
        assert out.losses[i].item() == approx(-logsig(0.3 * h) + 2.0 * (-PC[i] / TC[i]))
        assert gc[i] == approx(-0.3 * sig(-0.3 * h) - 2.0 / TC[i])
        assert gr[i] == approx(0.3 * sig(-0.3 * h))
    assert out.metrics["nll_loss"].item() == approx(sum(-c / t for c, t in zip(PC, TC)) / 3)


# ----------------------------------------------------------------------------- reference-free losses


@pytest.mark.parametrize("gamma", [0.0, 0.8])
def test_simpo_value_and_gradient(gamma):
    beta = 2.5
    out, gc, gr = run("simpo", LossParams(beta=beta, simpo_gamma=gamma), ref=False)
    for i in range(3):
        z = beta * (PC[i] / TC[i] - PR[i] / TR[i]) - gamma
        assert out.losses[i].item() == approx(-logsig(z))
        assert gc[i] == approx(-beta * sig(-z) / TC[i])
        assert gr[i] == approx(beta * sig(-z) / TR[i])
        assert gc[i] < 0 < gr[i]
        assert out.chosen_rewards[i].item() == approx(beta * PC[i] / TC[i])
        assert out.rejected_rewards[i].item() == approx(beta * PR[i] / TR[i])


def log_odds(avg: float) -> float:
    return avg - math.log(1 - math.exp(avg))


def test_orpo_value_gradient_and_metrics():
    lam = 0.2
    out, gc, gr = run("orpo", LossParams(beta=lam), ref=False)
    ratios = []
    for i in range(3):
        aw, al = PC[i] / TC[i], PR[i] / TR[i]
        lor = log_odds(aw) - log_odds(al)
        ratios.append(lor)
        assert out.losses[i].item() == approx(-aw - lam * logsig(lor))
        # d log odds / d avg = 1 / (1 - e^avg)
        assert gc[i] == approx((-1 - lam * sig(-lor) / (1 - math.exp(aw))) / TC[i])
        assert gr[i] == approx(lam * sig(-lor) / (1 - math.exp(al)) / TR[i])
        assert gc[i] < 0 < gr[i]
    assert out.metrics["orpo/log_odds_ratio"].item() == approx(sum(ratios) / 3)
    assert out.metrics["nll_loss"].item() == approx(sum(-c / t for c, t in zip(PC, TC)) / 3)
    assert out.metrics["orpo/log_odds_ratio"].dim() == 0


def test_orpo_stable_near_probability_one_and_tiny_probabilities():
    # avg log-prob near -0.1 (log(1-e^x) via expm1), at exactly 0, and very negative (log1p)
    out, gc, gr = run("orpo", LossParams(beta=0.1), pc=[-1e-9, -0.1], pr=[-80.0, -0.2], rc=[0.0, 0.0],
                      rr=[0.0, 0.0], tc=[1.0, 1.0], tr=[1.0, 1.0], ref=False)
    assert torch.isfinite(out.losses).all()
    assert all(math.isfinite(g) for g in gc + gr)
    lor = log_odds(-0.1) - log_odds(-0.2)
    assert out.losses[1].item() == approx(0.1 - 0.1 * logsig(lor))


def test_cpo_value_and_gradient():
    beta, alpha = 0.3, 0.7
    out, gc, gr = run("cpo", LossParams(beta=beta, cpo_alpha=alpha), ref=False)
    for i in range(3):
        z = beta * (PC[i] - PR[i])
        assert out.losses[i].item() == approx(-logsig(z) + alpha * (-PC[i] / TC[i]))
        assert gc[i] == approx(-beta * sig(-z) - alpha / TC[i])
        assert gr[i] == approx(beta * sig(-z))
        assert gc[i] < 0 < gr[i]
        assert out.chosen_rewards[i].item() == approx(beta * PC[i] / TC[i])
    assert "nll_loss" in out.metrics


# ----------------------------------------------------------------------------- reference handling


def test_sigmoid_zero_reference_equals_reference_free():
    a, ga, ra = run("sigmoid", LossParams(beta=0.2), rc=[0.0] * 3, rr=[0.0] * 3)
    b, gb, rb = run("sigmoid", LossParams(beta=0.2, reference_free=True), ref=False)
    assert torch.allclose(a.losses, b.losses)
    assert ga == approx(gb) and ra == approx(rb)
    # reference_free rewards are beta * summed policy log-probs
    assert b.chosen_rewards.tolist() == approx([0.2 * c for c in PC])
    # a given reference is not used when reference_free is set
    c, _, _ = run("sigmoid", LossParams(beta=0.2, reference_free=True))
    assert torch.allclose(b.losses, c.losses)


def test_missing_reference_is_a_bug():
    with pytest.raises(ValueError):
        run("sigmoid", LossParams(), ref=False)
    with pytest.raises(ValueError):
        compute_loss(["kto"], None, pair(PC, PR), pair(RC, RR), LossParams())


def test_needs_reference():
    assert needs_reference(["sigmoid"], False)
    assert not needs_reference(["sigmoid"], True)
    assert not needs_reference(["simpo"], False)
    assert not needs_reference(["orpo", "cpo", "sft"], False)
    assert needs_reference(["sft", "ipo"], False)
    assert needs_reference(["kto"], False)


def test_multiple_losses_weights_metrics_and_sample_weights():
    params = LossParams(beta=0.2, rpo_alpha=0.5)
    sw = [1.0, 0.5, 2.0]
    out, gc, _ = run(["orpo", "cpo", "ipo"], params, weights=[1.0, 2.0, 0.1], sample_weights=torch.tensor(sw))
    for i, h in enumerate(H):
        aw, al = PC[i] / TC[i], PR[i] / TR[i]
        orpo = -aw - 0.2 * logsig(log_odds(aw) - log_odds(al))
        cpo = -logsig(0.2 * (PC[i] - PR[i])) - aw
        ipo = (h - 1 / 0.4) ** 2
        total = orpo + 2.0 * cpo + 0.1 * ipo + 0.5 * (-aw)
        assert out.losses[i].item() == approx(sw[i] * total)
    # rewards from the first loss (orpo: length-averaged)
    assert out.chosen_rewards.tolist() == approx([0.2 * c / t for c, t in zip(PC, TC)])
    # nll_loss came from orpo, cpo and the rpo term: each is prefixed
    assert {"orpo/nll_loss", "cpo/nll_loss", "rpo/nll_loss", "orpo/log_odds_ratio",
            "loss/orpo", "loss/cpo", "loss/ipo"} == set(out.metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("name", [n for n, s in LOSSES.items() if s.paired])
def test_every_paired_loss_shapes_and_finiteness(name):
    gen = torch.Generator().manual_seed(1)
    b = 6
    policy = PairLogps((-torch.rand(b, generator=gen) * 30).requires_grad_(),
                       (-torch.rand(b, generator=gen) * 30).requires_grad_(),
                       torch.randint(1, 20, (b,), generator=gen).float(),
                       torch.randint(1, 20, (b,), generator=gen).float())
    ref = PairLogps(-torch.rand(b, generator=gen) * 30, -torch.rand(b, generator=gen) * 30,
                    policy.chosen_tokens, policy.rejected_tokens)
    out = compute_loss([name], None, policy, ref, LossParams(label_smoothing=0.1))
    assert isinstance(out, LossOutput)
    assert out.losses.shape == (b,) and out.losses.dtype == torch.float32
    assert out.chosen_rewards.shape == (b,) and out.rejected_rewards.shape == (b,)
    assert not out.chosen_rewards.requires_grad
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    for grad in (policy.chosen.grad, policy.rejected.grad):
        assert grad is None or torch.isfinite(grad).all()      # sft ignores the rejected completion


def test_registry_documents_every_loss():
    field_names = {f.name for f in dataclasses.fields(LossParams)}
    for name, spec in LOSSES.items():
        doc = inspect.getdoc(spec.fn) or ""
        assert f"arXiv {spec.paper}" in doc or f"arXiv {spec.paper}" in doc.replace("\n", " "), name
        assert "When to choose it" in doc, name
        assert spec.uses <= field_names, name
        assert spec.description
    assert all(LOSSES[n].needs_reference is False for n in ("sft", "simpo", "orpo", "cpo"))


# ----------------------------------------------------------------------------- KTO


def kto_inputs():
    pol = [-3.0, -5.0, -2.0, -6.0]
    ref = [-3.5, -4.0, -2.5, -5.0]
    labels = [True, False, True, False]
    pol_kl = [-4.0, -6.0, -5.0, -3.0]
    ref_kl = [-4.5, -6.2, -5.1, -3.4]      # mean(pol_kl - ref_kl) = (0.5+0.2+0.1+0.4)/4 = 0.3
    return pol, ref, labels, pol_kl, ref_kl


def test_kto_value_gradient_and_rewards():
    pol, ref, labels, pol_kl, ref_kl = kto_inputs()
    beta, wd, wu = 0.5, 1.5, 0.8
    p = torch.tensor(pol, requires_grad=True)
    pkl = torch.tensor(pol_kl, requires_grad=True)
    out = kto_loss(p, torch.tensor(ref), torch.tensor(labels), pkl, torch.tensor(ref_kl),
                   LossParams(beta=beta, desirable_weight=wd, undesirable_weight=wu))
    out.losses.sum().backward()
    z0 = 0.3
    assert out.metrics["kto/kl"].item() == approx(z0)
    for i, good in enumerate(labels):
        r = pol[i] - ref[i]
        if good:
            assert out.losses[i].item() == approx(wd * (1 - sig(beta * (r - z0))))
            assert p.grad[i].item() == approx(-wd * beta * dsig(beta * (r - z0)))
            assert p.grad[i].item() < 0
        else:
            assert out.losses[i].item() == approx(wu * (1 - sig(beta * (z0 - r))))
            assert p.grad[i].item() == approx(wu * beta * dsig(beta * (z0 - r)))
            assert p.grad[i].item() > 0
    # z0 is detached: no gradient flows through the KL estimate
    assert pkl.grad is None or torch.all(pkl.grad == 0)
    assert out.chosen_rewards.tolist() == approx([beta * (pol[0] - ref[0]), beta * (pol[2] - ref[2])])
    assert out.rejected_rewards.tolist() == approx([beta * (pol[1] - ref[1]), beta * (pol[3] - ref[3])])


def test_kto_kl_clamped_at_zero_and_precomputed():
    pol, ref, labels, pol_kl, _ = kto_inputs()
    higher_ref = [x + 1.0 for x in pol_kl]             # policy - ref = -1 on average: z0 = 0
    out = kto_loss(torch.tensor(pol), torch.tensor(ref), torch.tensor(labels), torch.tensor(pol_kl),
                   torch.tensor(higher_ref), LossParams(beta=0.5))
    assert out.metrics["kto/kl"].item() == 0.0
    r = pol[0] - ref[0]
    assert out.losses[0].item() == approx(1 - sig(0.5 * r))
    # precomputed (gathered) kl replaces the local estimate; negative values are clamped
    pre = kto_loss(torch.tensor(pol), torch.tensor(ref), torch.tensor(labels), None, None,
                   LossParams(beta=0.5), kl=torch.tensor(0.7))
    assert pre.metrics["kto/kl"].item() == approx(0.7)
    assert pre.losses[1].item() == approx(1 - sig(0.5 * (0.7 - (pol[1] - ref[1]))))
    neg = kto_loss(torch.tensor(pol), torch.tensor(ref), torch.tensor(labels), None, None,
                   LossParams(beta=0.5), kl=torch.tensor(-2.0))
    assert neg.metrics["kto/kl"].item() == 0.0
    with pytest.raises(ValueError):
        kto_loss(torch.tensor(pol), None, torch.tensor(labels), torch.tensor(pol_kl), None, LossParams())


def test_kto_reference_free():
    pol, _, labels, pol_kl, _ = kto_inputs()
    out = kto_loss(torch.tensor(pol), None, torch.tensor(labels), torch.tensor(pol_kl), None,
                   LossParams(beta=0.5, reference_free=True))
    assert out.metrics["kto/kl"].item() == 0.0      # mean log-prob is negative: clamped
    assert out.losses[0].item() == approx(1 - sig(0.5 * pol[0]))
    assert out.losses[1].item() == approx(1 - sig(-0.5 * pol[1]))


# ----------------------------------------------------------------------------- check_loss_options


def test_check_loss_options_unknown_name_suggests():
    with pytest.raises(ConfigError, match="Did you mean simpo"):
        check_loss_options(["simpoo"], None, set(), LossParams())
    with pytest.raises(ConfigError, match="Did you mean sigmoid"):
        check_loss_options(["dpo"], None, set(), LossParams())
    with pytest.raises(ConfigError, match="Did you mean apo_zero"):
        check_loss_options(["apo-zero"], None, set(), LossParams())


@pytest.mark.parametrize("types,weights,params,match", [
    ([], None, LossParams(), "empty"),
    (["sigmoid", "sigmoid"], None, LossParams(), "more than once"),
    (["kto", "sft"], None, LossParams(), "kto cannot be combined"),
    (["sigmoid", "sft"], [1.0], LossParams(), "1 value"),
    (["sigmoid", "sft"], [1.0, -1.0], LossParams(), "sft must be"),
    (["sigmoid"], [0.0], LossParams(), "all 0"),
    (["sigmoid"], None, LossParams(beta=0.0), "--beta"),
    (["sigmoid"], None, LossParams(beta=-1.0), "--beta"),
    (["sigmoid"], None, LossParams(beta=float("nan")), "--beta"),
    (["robust"], None, LossParams(label_smoothing=0.5), r"\[0, 0.5\)"),
    (["sigmoid"], None, LossParams(label_smoothing=1.0), r"\[0, 1\)"),
    (["sigmoid"], None, LossParams(label_smoothing=-0.1), r"\[0, 1\)"),
    (["simpo"], None, LossParams(reference_free=True), "--reference-free"),
    (["orpo", "cpo"], None, LossParams(reference_free=True), "--reference-free"),
    (["sigmoid"], None, LossParams(f_divergence="jsd"), "Did you mean js"),
    (["sigmoid"], None, LossParams(f_divergence="alpha", f_alpha=1.0), "--f-alpha"),
    (["sigmoid"], None, LossParams(rpo_alpha=-1.0), "--rpo-alpha"),
    (["kto"], None, LossParams(desirable_weight=0.0), "--desirable-weight"),
    (["cpo"], None, LossParams(cpo_alpha=-0.5), "--cpo-alpha"),
    (["simpo"], None, LossParams(simpo_gamma=float("inf")), "--simpo-gamma"),
    (["discopop"], None, LossParams(discopop_tau=0.0), "--discopop-tau"),
])
def test_check_loss_options_errors(types, weights, params, match):
    with pytest.raises(ConfigError, match=match):
        check_loss_options(types, weights, set(), params)


def test_check_loss_options_valid_and_warnings():
    assert check_loss_options(["sigmoid"], None, {"beta", "label_smoothing"}, LossParams(label_smoothing=0.1)) == []
    assert check_loss_options(["robust"], None, set(), LossParams(label_smoothing=0.49)) == []
    assert check_loss_options(["sigmoid", "simpo"], [1.0, 0.5], set(), LossParams(reference_free=True)) == []
    warnings = check_loss_options(["hinge"], None, {"label_smoothing", "beta"}, LossParams(label_smoothing=0.1))
    assert len(warnings) == 1
    assert "--label-smoothing is ignored" in warnings[0] and "hinge" in warnings[0]
    # CLI spellings are accepted; unrelated trainer options are not LossParams fields
    warnings = check_loss_options(["simpo"], None, {"--ipo-length-normalize", "learning_rate"}, LossParams())
    assert len(warnings) == 1 and warnings[0].startswith("--ipo-length-normalize is ignored")
    warnings = check_loss_options(["kto"], None, {"rpo_alpha", "f_divergence"}, LossParams(rpo_alpha=1.0))
    assert {w.split()[0] for w in warnings} == {"--rpo-alpha", "--f-divergence"}
    warnings = check_loss_options(["sigmoid", "sft"], None, set(), LossParams(rpo_alpha=1.0))
    assert any("counted twice" in w for w in warnings)
    warnings = check_loss_options(["exo_pair"], None, set(), LossParams())
    assert any("0.001" in w for w in warnings)
    # f_alpha is validated only when the alpha divergence is used, and warned about otherwise
    assert check_loss_options(["sigmoid"], None, set(), LossParams(f_alpha=3.0)) == []
    warnings = check_loss_options(["sigmoid"], None, {"f_alpha"}, LossParams(f_alpha=0.3))
    assert len(warnings) == 1 and "--f-divergence is reverse_kl" in warnings[0]
    assert check_loss_options(["sigmoid"], None, {"f_alpha", "f_divergence"},
                              LossParams(f_divergence="alpha", f_alpha=0.3)) == []


# ----------------------------------------------------------------------------- modifiers


def test_ld_logps_value_and_gradient():
    # two sequences: a pair with |y_w| = 3, |y_l| = 5, public length 3 for both
    token_logps = torch.tensor([-0.1, -0.2, -0.3, -1.0, -2.0, -3.0, -4.0, -5.0], requires_grad=True)
    token_seq = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    token_pos = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4])
    public = torch.tensor([3, 3])
    alpha = 0.25
    out = ld_logps(token_logps, token_seq, token_pos, public, alpha)
    assert out.tolist() == approx([-0.6, -6.0 + alpha * -9.0])
    out.sum().backward()
    assert token_logps.grad.tolist() == approx([1, 1, 1, 1, 1, 1, alpha, alpha])
    # alpha = 1 gives plain sums; interleaved token order works
    perm = torch.tensor([4, 0, 7, 2, 5, 1, 6, 3])
    plain = ld_logps(token_logps.detach()[perm], token_seq[perm], token_pos[perm], public, 1.0)
    assert plain.tolist() == approx([-0.6, -15.0])
    with pytest.raises(ConfigError):
        ld_logps(token_logps, token_seq, token_pos, public, 1.5)


def test_wpo_pair_weights():
    cw = torch.tensor([-0.5, 0.2], requires_grad=True)
    rw = torch.tensor([-1.0, 0.1], requires_grad=True)
    w = wpo_pair_weights(cw, rw)
    assert w.tolist() == approx([math.exp(-1.5), math.exp(0.3)])
    assert not w.requires_grad
    # used as sample weights they scale the per-pair loss
    out, _, _ = run("sigmoid", LossParams(beta=0.1), sample_weights=torch.tensor([1.0, 2.0, 0.0]))
    assert out.losses.tolist() == approx([-logsig(0.15), 2 * -logsig(-0.1), 0.0])


def test_random_losses_match_independent_formulas():
    # broader value check for DPO and SimPO on many random pairs
    rng = random.Random(3)
    rows = [[rng.uniform(-40, -1) for _ in range(4)] + [rng.randint(1, 30), rng.randint(1, 30)]
            for _ in range(50)]
    pc, pr, rc, rr, tc, tr = (list(col) for col in zip(*rows))
    out, _, _ = run("sigmoid", LossParams(beta=0.1), pc=pc, pr=pr, rc=rc, rr=rr, tc=tc, tr=tr)
    assert out.losses.tolist() == approx([-logsig(0.1 * ((a - c) - (b - d))) for a, b, c, d in zip(pc, pr, rc, rr)])
    out, _, _ = run("simpo", LossParams(beta=2.0, simpo_gamma=1.0), pc=pc, pr=pr, tc=tc, tr=tr, ref=False)
    assert out.losses.tolist() == approx([-logsig(2.0 * (a / n - b / m) - 1.0)
                                          for a, b, n, m in zip(pc, pr, tc, tr)])
