"""Tests for the K-answers-per-prompt losses of prefopt.losses.

Expected values are written out by hand with ``math`` on Python floats (small K, small
numbers), not computed with the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.losses import (KPairs, LossParams, PairLogps, compute_loss, derive_pairs, gather_pairs,
                            k_pair_loss, k_reward_metrics, kendall_tau_b, plackett_luce_loss, reduce_pairs)

NAN, INF = float("nan"), float("inf")


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


def t(rows, grad=False, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype, requires_grad=grad)


def mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def nls(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x})."""
    return math.log1p(math.exp(-x))


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def pairs_of(p: KPairs):
    return list(zip(p.prompt.tolist(), p.chosen.tolist(), p.rejected.tolist()))


# K = 3 worked example (the DPO example's log-probs, plus a third answer):
#   policy    -0.2  -0.8  -1.0
#   reference -0.3  -0.7  -1.2
#   Δ          0.1  -0.1   0.2       scores 3, 2, 1 (answer 0 best)
POL3 = [-0.2, -0.8, -1.0]
REF3 = [-0.3, -0.7, -1.2]
D3 = [0.1, -0.1, 0.2]


# ----------------------------------------------------------------------------- pair derivation


def test_derive_pairs_all_distinct_scores():
    p = derive_pairs(t([[3.0, 2.0, 1.0]]), mask([[1, 1, 1]]))
    assert pairs_of(p) == [(0, 0, 1), (0, 0, 2), (0, 1, 2)]
    assert p.weight.tolist() == approx([1 / 3] * 3)
    assert p.num_pairs.tolist() == [3]
    assert p.chosen.dtype == torch.long and p.weight.dtype == torch.float32


def test_derive_pairs_unsorted_scores():
    s, v = t([[1.0, 3.0, 2.0]]), mask([[1, 1, 1]])
    assert pairs_of(derive_pairs(s, v, "all")) == [(0, 1, 0), (0, 1, 2), (0, 2, 0)]
    assert pairs_of(derive_pairs(s, v, "best_vs_rest")) == [(0, 1, 0), (0, 1, 2)]
    assert pairs_of(derive_pairs(s, v, "best_vs_worst")) == [(0, 1, 0)]
    assert derive_pairs(s, v, "best_vs_rest").weight.tolist() == approx([0.5, 0.5])
    assert derive_pairs(s, v, "best_vs_worst").weight.tolist() == [1.0]


def test_ties_produce_no_pair():
    v = mask([[1, 1, 1]])
    # answers 0 and 1 tie for best: no pair between them
    s = t([[2.0, 2.0, 1.0]])
    assert pairs_of(derive_pairs(s, v, "all")) == [(0, 0, 2), (0, 1, 2)]
    # fixed rule: the first answer with the top score is "the best"; its tie is not paired
    assert pairs_of(derive_pairs(s, v, "best_vs_rest")) == [(0, 0, 2)]
    assert pairs_of(derive_pairs(s, v, "best_vs_worst")) == [(0, 0, 2)]
    # tie at the bottom
    s = t([[1.0, 3.0, 1.0]])
    assert pairs_of(derive_pairs(s, v, "all")) == [(0, 1, 0), (0, 1, 2)]
    assert pairs_of(derive_pairs(s, v, "best_vs_rest")) == [(0, 1, 0), (0, 1, 2)]
    assert pairs_of(derive_pairs(s, v, "best_vs_worst")) == [(0, 1, 0)]   # first worst


@pytest.mark.parametrize("pairing", ["all", "best_vs_rest", "best_vs_worst"])
def test_all_tied_prompt_has_no_pair_and_zero_loss(pairing):
    pol = t([[-1.0, -2.0, -3.0], POL3], grad=True)
    ref = t([[-1.5, -1.0, -2.0], REF3])
    s = t([[5.0, 5.0, 5.0], [3.0, 2.0, 1.0]])
    v = mask([[1, 1, 1], [1, 1, 1]])
    p = derive_pairs(s, v, pairing)
    assert p.num_pairs.tolist()[0] == 0 and set(p.prompt.tolist()) == {1}
    out = k_pair_loss(pol, ref, s, v, LossParams(beta=1.0), pairing=pairing)
    assert out.losses[0].item() == 0.0
    assert out.has_loss.tolist() == [False, True]
    out.losses.sum().backward()
    assert pol.grad[0].tolist() == [0.0, 0.0, 0.0]


def test_derive_pairs_errors():
    s, v = t([[1.0, 2.0]]), mask([[1, 1]])
    with pytest.raises(ConfigError, match="best_vs_rest"):
        derive_pairs(s, v, "best-vs-rest")
    with pytest.raises(ConfigError, match="prompt"):
        derive_pairs(s, v, weighting="answer")
    with pytest.raises(ValueError, match="bool"):
        derive_pairs(s, torch.ones(1, 2))
    with pytest.raises(ValueError, match="shape"):
        derive_pairs(s, mask([[1, 1, 1]]))
    with pytest.raises(ValueError, match="per prompt"):
        k_pair_loss(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]), s, v, LossParams(), loss_types=["aot"])


# ----------------------------------------------------------------------------- DPO over derived pairs


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_k3_dpo_all_pairs_by_hand(beta):
    out = k_pair_loss(t([POL3]), t([REF3]), t([[3.0, 2.0, 1.0]]), mask([[1, 1, 1]]), LossParams(beta=beta))
    # pairs (0,1): h = 0.1 − (−0.1) = 0.2; (0,2): h = 0.1 − 0.2 = −0.1; (1,2): h = −0.1 − 0.2 = −0.3
    expected = [nls(0.2 * beta), nls(-0.1 * beta), nls(-0.3 * beta)]
    assert out.pair_losses.tolist() == approx(expected)
    assert out.losses.tolist() == approx([sum(expected) / 3])
    assert out.rewards[0].tolist() == approx([beta * 0.1, -beta * 0.1, beta * 0.2])
    assert not out.rewards.requires_grad


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_k3_dpo_best_vs_rest_and_worst_by_hand(beta):
    args = (t([POL3]), t([REF3]), t([[3.0, 2.0, 1.0]]), mask([[1, 1, 1]]), LossParams(beta=beta))
    out = k_pair_loss(*args, pairing="best_vs_rest")
    assert out.losses.item() == approx((nls(0.2 * beta) + nls(-0.1 * beta)) / 2)
    out = k_pair_loss(*args, pairing="best_vs_worst")
    assert out.losses.item() == approx(nls(-0.1 * beta))


def test_dpo_worked_example_k2():
    # policy −0.2/−0.8, reference −0.3/−0.7 → h = 0.2, loss −log σ(0.2β)
    beta = 0.5
    out = k_pair_loss(t([[-0.2, -0.8]]), t([[-0.3, -0.7]]), t([[1.0, 0.0]]), mask([[1, 1]]), LossParams(beta=beta))
    assert out.losses.item() == approx(nls(0.2 * beta))
    out = plackett_luce_loss(t([[-0.2, -0.8]]), t([[-0.3, -0.7]]), t([[1.0, 0.0]]), mask([[1, 1]]),
                             LossParams(beta=beta))
    assert out.losses.item() == approx(nls(0.2 * beta))


def _k2_batch():
    # three prompts, K = 2; chosen answer in column 0 for prompts 0, 2 and column 1 for 1
    pol = [[-4.0, -5.0], [-6.0, -7.5], [-2.0, -9.0]]
    ref = [[-4.5, -4.0], [-6.5, -7.0], [-3.0, -8.0]]
    scores = [[1.0, 0.0], [0.2, 0.7], [9.0, 3.0]]
    tokens = [[4.0, 5.0], [6.0, 10.0], [2.0, 12.0]]
    chosen_col = [0, 1, 0]
    return pol, ref, scores, tokens, chosen_col


def _as_pairs(rows, cols, grad=False):
    ch = [r[c] for r, c in zip(rows, cols)]
    rj = [r[1 - c] for r, c in zip(rows, cols)]
    return t(ch, grad=grad), t(rj, grad=grad)


@pytest.mark.parametrize("loss_types", [["sigmoid"], ["ipo"], ["hinge"], ["simpo"], ["sigmoid", "sft"],
                                        ["nca_pair"], ["sigmoid_norm"]])
@pytest.mark.parametrize("pairing", ["all", "best_vs_rest", "best_vs_worst"])
def test_k2_reduces_to_compute_loss(loss_types, pairing):
    pol, ref, scores, tokens, cols = _k2_batch()
    params = LossParams(beta=0.3, label_smoothing=0.0)
    pol_t = t(pol, grad=True)
    out = k_pair_loss(pol_t, t(ref), t(scores), mask([[1, 1]] * 3), params, pairing=pairing,
                      loss_types=loss_types, tokens=t(tokens))
    out.losses.sum().backward()

    pc, pr = _as_pairs(pol, cols, grad=True)
    rc, rr = _as_pairs(ref, cols)
    tc, tr = _as_pairs(tokens, cols)
    expected = compute_loss(loss_types, None, PairLogps(pc, pr, tc, tr), PairLogps(rc, rr, tc, tr), params)
    expected.losses.sum().backward()

    assert out.losses.tolist() == approx(expected.losses.tolist())
    grad_ch = [pol_t.grad[i, c].item() for i, c in enumerate(cols)]
    grad_rj = [pol_t.grad[i, 1 - c].item() for i, c in enumerate(cols)]
    assert grad_ch == approx(pc.grad.tolist())
    assert grad_rj == approx(pr.grad.tolist())
    # rewards follow the first loss's rule, like compute_loss
    assert [out.rewards[i, c].item() for i, c in enumerate(cols)] == approx(expected.chosen_rewards.tolist())
    assert [out.rewards[i, 1 - c].item() for i, c in enumerate(cols)] == approx(expected.rejected_rewards.tolist())
    for key, value in expected.metrics.items():
        assert out.metrics[key].item() == approx(value.item())


def test_k2_plackett_luce_equals_sigmoid_dpo():
    pol, ref, scores, _, cols = _k2_batch()
    params = LossParams(beta=0.7)
    pol_t = t(pol, grad=True)
    out = plackett_luce_loss(pol_t, t(ref), t(scores), mask([[1, 1]] * 3), params)
    out.losses.sum().backward()
    pc, pr = _as_pairs(pol, cols, grad=True)
    rc, rr = _as_pairs(ref, cols)
    ones = torch.ones(3)
    expected = compute_loss(["sigmoid"], None, PairLogps(pc, pr, ones, ones), PairLogps(rc, rr, ones, ones), params)
    expected.losses.sum().backward()
    assert out.losses.tolist() == approx(expected.losses.tolist())
    assert [pol_t.grad[i, c].item() for i, c in enumerate(cols)] == approx(pc.grad.tolist())
    assert [pol_t.grad[i, 1 - c].item() for i, c in enumerate(cols)] == approx(pr.grad.tolist())
    norm = plackett_luce_loss(t(pol), t(ref), t(scores), mask([[1, 1]] * 3), params, normalize=True)
    assert norm.losses.tolist() == approx(expected.losses.tolist())


def test_manual_path_equals_k_pair_loss():
    # derive_pairs + gather_pairs + compute_loss + reduce_pairs is what k_pair_loss does
    pol = t([POL3, [-1.0, -3.0, 0.0]])
    ref = t([REF3, [-2.0, -1.0, 0.0]])
    s = t([[3.0, 2.0, 1.0], [0.0, 1.0, 0.0]])
    v = mask([[1, 1, 1], [1, 1, 0]])
    params = LossParams(beta=0.4)
    pairs = derive_pairs(s, v, "all")
    pair_out = compute_loss(["ipo"], None, gather_pairs(pairs, pol), gather_pairs(pairs, ref), params)
    manual = reduce_pairs(pair_out.losses, pairs, 2)
    out = k_pair_loss(pol, ref, s, v, params, loss_types=["ipo"])
    assert manual.tolist() == approx(out.losses.tolist())
    # prompt 1: one pair, chosen = answer 1: h = (−3 − −1) − (−1 − −2) = −3; IPO (h − 1/(2β))²
    assert out.losses[1].item() == approx((-3.0 - 1.25) ** 2)


def test_per_prompt_weighting():
    # prompt 0: K = 3 (3 pairs), prompt 1: K = 2 (1 pair), padded to Kmax = 3
    beta = 1.0
    pol = t([POL3, [-0.2, -0.8, 0.0]])
    ref = t([REF3, [-0.3, -0.7, 0.0]])
    s = t([[3.0, 2.0, 1.0], [1.0, 0.0, 0.0]])
    v = mask([[1, 1, 1], [1, 1, 0]])
    l0 = [nls(0.2), nls(-0.1), nls(-0.3)]
    l1 = nls(0.2)
    by_prompt = k_pair_loss(pol, ref, s, v, LossParams(beta=beta))
    assert by_prompt.losses.tolist() == approx([sum(l0) / 3, l1])
    assert by_prompt.pairs.weight.tolist() == approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    # each prompt weighs 1/2 in the batch mean, whatever its number of answers
    assert by_prompt.losses.mean().item() == approx(0.5 * sum(l0) / 3 + 0.5 * l1)
    by_pair = k_pair_loss(pol, ref, s, v, LossParams(beta=beta), weighting="pair")
    assert by_pair.losses.tolist() == approx([sum(l0), l1])
    assert (by_pair.losses.sum() / by_pair.pairs.weight.numel()).item() == approx((sum(l0) + l1) / 4)


def test_reference_free():
    pol, s, v = t([POL3]), t([[3.0, 2.0, 1.0]]), mask([[1, 1, 1]])
    beta = 0.5
    # reference-free: r = β·log πθ = β·[−0.2, −0.8, −1.0]
    a = k_pair_loss(pol, None, s, v, LossParams(beta=beta))
    assert a.losses.item() == approx((nls(0.6 * beta) + nls(0.8 * beta) + nls(0.2 * beta)) / 3)
    b = k_pair_loss(pol, t([REF3]), s, v, LossParams(beta=beta, reference_free=True))
    assert b.losses.item() == approx(a.losses.item())
    assert a.rewards[0].tolist() == approx([-0.1, -0.4, -0.5])
    c = plackett_luce_loss(pol, None, s, v, LossParams(beta=beta))
    r = [-0.1, -0.4, -0.5]
    assert c.losses.item() == approx(lse(*r) - r[0] + lse(r[1], r[2]) - r[1])
    d = plackett_luce_loss(pol, t([REF3]), s, v, LossParams(beta=beta, reference_free=True))
    assert d.losses.item() == approx(c.losses.item())


# ----------------------------------------------------------------------------- padding


GARBAGE = [NAN, INF, -INF, 1e9]


@pytest.mark.parametrize("junk", GARBAGE)
@pytest.mark.parametrize("which", ["pairs", "pl"])
def test_padding_changes_nothing(junk, which):
    beta = 0.8
    # prompt A: K = 3 alone; batched with prompt B (K = 2), both padded to Kmax = 4
    alone_pol = t([POL3], grad=True)
    alone = (alone_pol, t([REF3]), t([[3.0, 1.0, 2.0]]), mask([[1, 1, 1]]))
    pol = t([POL3 + [junk], [-0.5, -0.6, junk, junk]], grad=True)
    ref = t([REF3 + [junk], [-0.4, -0.9, junk, junk]])
    s = t([[3.0, 1.0, 2.0, junk], [0.0, 1.0, junk, junk]])
    v = mask([[1, 1, 1, 0], [1, 1, 0, 0]])
    fn = k_pair_loss if which == "pairs" else plackett_luce_loss
    out_alone = fn(*alone, LossParams(beta=beta))
    out = fn(pol, ref, s, v, LossParams(beta=beta))
    out_alone.losses.sum().backward()
    out.losses[0].backward()
    assert out.losses[0].item() == approx(out_alone.losses.item())
    assert torch.isfinite(out.losses).all()
    assert pol.grad[0, :3].tolist() == approx(alone_pol.grad[0].tolist())
    assert pol.grad[0, 3].item() == 0.0 and pol.grad[1].tolist() == [0.0] * 4
    assert out.rewards[0, 3].item() == 0.0 and out.rewards[1, 2:].tolist() == [0.0, 0.0]
    # prompt B alone, K = 2: DPO with chosen answer 1: h = (−0.6 + 0.9) − (−0.5 + 0.4) = 0.4
    assert out.losses[1].item() == approx(nls(0.4 * beta))
    assert out.has_loss.tolist() == [True, True]
    for key in ("rewards/best", "rewards/worst", "rewards/kendall_tau", "rewards/pair_accuracy"):
        assert math.isfinite(out.metrics[key].item())
    if which == "pairs":
        assert set(out.pairs.chosen.tolist()) | set(out.pairs.rejected.tolist()) <= {0, 1, 2}


def test_padding_metrics_unchanged():
    r = t([[0.3, -0.1, 0.2]])
    s = t([[3.0, 1.0, 2.0]])
    base = k_reward_metrics(r, s, mask([[1, 1, 1]]))
    padded = k_reward_metrics(t([[0.3, -0.1, 0.2, 100.0]]), t([[3.0, 1.0, 2.0, 99.0]]), mask([[1, 1, 1, 0]]))
    for key, value in base.items():
        assert padded[key].item() == approx(value.item())


# ----------------------------------------------------------------------------- Plackett–Luce


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_plackett_luce_k3_by_hand(beta):
    # scores 1, 3, 2 → ranking τ = (answer 1, answer 2, answer 0)
    out = plackett_luce_loss(t([POL3]), t([REF3]), t([[1.0, 3.0, 2.0]]), mask([[1, 1, 1]]), LossParams(beta=beta))
    r0, r1, r2 = (beta * d for d in D3)
    # −log [ e^{r1}/(e^{r1}+e^{r2}+e^{r0}) · e^{r2}/(e^{r2}+e^{r0}) · e^{r0}/e^{r0} ]
    expected = -(r1 - math.log(math.exp(r1) + math.exp(r2) + math.exp(r0))) \
        - (r2 - math.log(math.exp(r2) + math.exp(r0)))
    assert out.losses.item() == approx(expected)
    norm = plackett_luce_loss(t([POL3]), t([REF3]), t([[1.0, 3.0, 2.0]]), mask([[1, 1, 1]]),
                              LossParams(beta=beta), normalize=True)
    assert norm.losses.item() == approx(expected / 2)


def test_plackett_luce_gradient_by_hand():
    beta = 1.0
    pol = t([POL3], grad=True)
    out = plackett_luce_loss(pol, t([REF3]), t([[3.0, 2.0, 1.0]]), mask([[1, 1, 1]]), LossParams(beta=beta))
    out.losses.sum().backward()
    r = [beta * d for d in D3]
    z_all = sum(math.exp(x) for x in r)
    z_12 = math.exp(r[1]) + math.exp(r[2])
    # L = log Z_all − r0 + log Z_12 − r1;  dL/dpol_i = β·dL/dr_i
    g0 = math.exp(r[0]) / z_all - 1
    g1 = math.exp(r[1]) / z_all + math.exp(r[1]) / z_12 - 1
    g2 = math.exp(r[2]) / z_all + math.exp(r[2]) / z_12
    assert pol.grad[0].tolist() == approx([beta * g0, beta * g1, beta * g2])
    assert sum(pol.grad[0].tolist()) == approx(0.0)   # invariant to a common shift of rewards


def test_plackett_luce_ties_breslow_by_hand():
    beta = 1.0
    r = D3   # β = 1
    # tie at the top: answers 0 and 1 share the risk set {0, 1, 2}; answer 2 alone in {2}
    out = plackett_luce_loss(t([POL3]), t([REF3]), t([[2.0, 2.0, 1.0]]), mask([[1, 1, 1]]), LossParams(beta=beta))
    assert out.losses.item() == approx((lse(*r) - r[0]) + (lse(*r) - r[1]) + 0.0)
    # tie at the bottom: answer 0 over {0, 1, 2}; answers 1, 2 each over {1, 2}
    out = plackett_luce_loss(t([POL3]), t([REF3]), t([[2.0, 1.0, 1.0]]), mask([[1, 1, 1]]), LossParams(beta=beta))
    assert out.losses.item() == approx((lse(*r) - r[0]) + (lse(r[1], r[2]) - r[1]) + (lse(r[1], r[2]) - r[2]))
    # all tied: every answer over the whole set (still a signal: towards equal rewards)
    out = plackett_luce_loss(t([POL3]), t([REF3]), t([[0.0, 0.0, 0.0]]), mask([[1, 1, 1]]), LossParams(beta=beta))
    assert out.losses.item() == approx(3 * lse(*r) - sum(r))
    assert out.losses.item() >= 3 * math.log(3) - 1e-6


def test_plackett_luce_tie_order_invariant():
    # swapping two tied answers (with their log-probs) leaves the loss unchanged
    s = t([[2.0, 2.0, 1.0]])
    v = mask([[1, 1, 1]])
    a = plackett_luce_loss(t([POL3]), t([REF3]), s, v, LossParams(beta=0.5)).losses.item()
    pol_sw = [POL3[1], POL3[0], POL3[2]]
    ref_sw = [REF3[1], REF3[0], REF3[2]]
    b = plackett_luce_loss(t([pol_sw]), t([ref_sw]), s, v, LossParams(beta=0.5)).losses.item()
    assert a == approx(b)


def test_plackett_luce_gradcheck_float64():
    s = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    v = mask([[1, 1, 1, 0], [1, 1, 1, 0]])
    ref = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.2, -0.9, 0.0]], dtype=torch.float64)
    pol = torch.tensor([[-1.2, -1.5, -0.7, 0.0], [-0.1, -0.4, -1.0, 0.0]], dtype=torch.float64,
                       requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: plackett_luce_loss(p, ref, s, v, LossParams(beta=0.7)).losses, (pol,))
    assert torch.autograd.gradcheck(lambda p: k_pair_loss(p, ref, s, v, LossParams(beta=0.7)).losses, (pol,))


@pytest.mark.parametrize("which", ["pairs", "pl"])
@pytest.mark.parametrize("beta", [0.1, 50.0])
def test_gradients_finite_extreme_values(which, beta):
    pol = t([[-1e4, -0.0, -3e3, -50.0], [-1e-6, -1e5, 0.0, 0.0]], grad=True)
    ref = t([[-1.0, -9e3, -1.0, -50.0], [-1e5, -1e-6, 0.0, 0.0]])
    s = t([[1.0, 4.0, 4.0, 0.0], [2.0, 1.0, 0.0, 0.0]])
    v = mask([[1, 1, 1, 1], [1, 1, 0, 0]])
    fn = k_pair_loss if which == "pairs" else plackett_luce_loss
    out = fn(pol, ref, s, v, LossParams(beta=beta))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(pol.grad).all()


# ----------------------------------------------------------------------------- Kendall τ and metrics


@pytest.mark.parametrize("x, y, expected", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    # one discordant pair (2,3) of 6: (5 − 1)/6
    ([1, 2, 3, 4], [1, 3, 2, 4], 4 / 6),
    # x ties one pair: n_x = 5 untied pairs, n_y = 6, all 5 concordant: 5/sqrt(30)
    ([1, 2, 2, 3], [1, 2, 3, 4], 5 / math.sqrt(30)),
    # the same tie in both: τ-b = 1
    ([1, 2, 2, 3], [0, 5, 5, 9], 1.0),
    # rewards all tied: undefined, reported as 0
    ([0, 0, 0, 0], [1, 2, 3, 4], 0.0),
    # (0,1) discordant, (0,2) discordant, the other 4 concordant: (4 − 2)/6
    ([3, 2, 1, 0], [1, 3, 2, 0], 1 / 3),
])
def test_kendall_tau_b_known_cases(x, y, expected):
    v = mask([[1, 1, 1, 1]])
    assert kendall_tau_b(t([x]), t([y]), v).item() == approx(expected)


def test_kendall_tau_b_three_answers_and_padding():
    # x = (3, 2, 1), y = (1, 3, 2): pairs (0,1) discordant, (0,2) discordant, (1,2) concordant
    # → (1 − 2)/3 = −1/3
    taus = kendall_tau_b(t([[3.0, 2.0, 1.0, 7.0], [1.0, 2.0, 0.0, 0.0]]),
                         t([[1.0, 3.0, 2.0, -5.0], [2.0, 1.0, 0.0, 0.0]]), mask([[1, 1, 1, 0], [1, 1, 0, 0]]))
    assert taus.tolist() == approx([-1 / 3, -1.0])


def test_reward_metrics_by_hand():
    # prompt 0: rewards (0.3, −0.1, 0.2), scores (3, 1, 2): best = answer 0, worst = answer 1,
    #   strict pairs (0,1) ok, (0,2) ok, (2,1) ok → accuracy 1, τ-b 1
    # prompt 1: rewards (0.5, 0.1, −0.4), scores (2, 2, 0): best tie {0, 1} → mean 0.3,
    #   worst −0.4; pairs (0,2) ok, (1,2) ok → accuracy 1;
    #   τ-b: pairs (0,1) y tied, (0,2) c, (1,2) c → 2 / sqrt(3·2)
    # prompt 2: all scores tied → left out of every mean
    r = t([[0.3, -0.1, 0.2], [0.5, 0.1, -0.4], [9.0, -9.0, 0.0]])
    s = t([[3.0, 1.0, 2.0], [2.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    m = k_reward_metrics(r, s, mask([[1, 1, 1]] * 3))
    assert m["rewards/best"].item() == approx((0.3 + 0.3) / 2)
    assert m["rewards/worst"].item() == approx((-0.1 - 0.4) / 2)
    assert m["rewards/margin"].item() == approx((0.4 + 0.7) / 2)
    assert m["rewards/pair_accuracy"].item() == approx(1.0)
    assert m["rewards/kendall_tau"].item() == approx((1.0 + 2 / math.sqrt(6)) / 2)
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_reward_metrics_accuracy_and_step0():
    # prompt: rewards (0.1, 0.2, 0.0), scores (3, 2, 1): pairs (0,1) wrong, (0,2) ok, (1,2) ok
    m = k_reward_metrics(t([[0.1, 0.2, 0.0]]), t([[3.0, 2.0, 1.0]]), mask([[1, 1, 1]]))
    assert m["rewards/pair_accuracy"].item() == approx(2 / 3)
    assert m["rewards/kendall_tau"].item() == approx(1 / 3)
    # step 0 (policy = reference): rewards all 0 → accuracy 0, τ 0, margin 0
    out = k_pair_loss(t([POL3]), t([POL3]), t([[3.0, 2.0, 1.0]]), mask([[1, 1, 1]]), LossParams(beta=0.1))
    assert out.losses.item() == approx(math.log(2))
    assert out.metrics["rewards/pair_accuracy"].item() == 0.0
    assert out.metrics["rewards/kendall_tau"].item() == 0.0
    assert out.metrics["rewards/margin"].item() == 0.0


def test_loss_metrics_come_from_rewards():
    beta = 1.0
    out = plackett_luce_loss(t([POL3]), t([REF3]), t([[3.0, 2.0, 1.0]]), mask([[1, 1, 1]]), LossParams(beta=beta))
    # rewards (0.1, −0.1, 0.2) vs scores (3, 2, 1): (0,1) c, (0,2) d, (1,2) d → τ = −1/3
    assert out.metrics["rewards/best"].item() == approx(0.1)
    assert out.metrics["rewards/worst"].item() == approx(0.2)
    assert out.metrics["rewards/margin"].item() == approx(-0.1)
    assert out.metrics["rewards/kendall_tau"].item() == approx(-1 / 3)
    assert out.metrics["rewards/pair_accuracy"].item() == approx(1 / 3)


@pytest.mark.parametrize("loss_types", [["sigmoid"], ["simpo"], ["sigmoid", "sft"]])
def test_batch_without_any_pair(loss_types):
    # every prompt's answers tie: no pair at all, losses 0, backward still works
    pol = t([[-1.0, -2.0], [-0.5, -0.1]], grad=True)
    out = k_pair_loss(pol, t([[-1.0, -1.0], [-1.0, -1.0]]), t([[1.0, 1.0], [0.0, 0.0]]), mask([[1, 1], [1, 1]]),
                      LossParams(), loss_types=loss_types)
    assert out.losses.tolist() == [0.0, 0.0] and out.has_loss.tolist() == [False, False]
    assert out.pair_losses.numel() == 0
    out.losses.sum().backward()
    assert pol.grad is None or pol.grad.abs().sum().item() == 0.0
    assert all(math.isfinite(v.item()) for v in out.metrics.values())
