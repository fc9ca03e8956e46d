"""Preference losses: pure functions over per-sequence log-probabilities.

This module knows nothing of models, tokenizers or data files. Every loss receives
summed completion log-probabilities (float32 tensors, one value per sequence) and the
completion token counts, and returns a per-pair loss plus detached reward metrics.

Notation used throughout (one pair = prompt x, chosen y_w, rejected y_l):

* ``Δ_w = log πθ(y_w|x) − log πref(y_w|x)`` and ``Δ_l`` likewise (the log-ratios);
* ``h = Δ_w − Δ_l`` (the DPO margin), ``β`` = :attr:`LossParams.beta`,
  ``ε`` = :attr:`LossParams.label_smoothing`;
* ``avg_w = log πθ(y_w|x) / |y_w|`` (length-averaged log-prob) and ``avg_l`` likewise;
* ``NLL = −avg_w`` (per-token negative log-likelihood of the chosen completion).

Reward metrics (``chosen_rewards`` / ``rejected_rewards``) always follow one rule:

* losses with a reference model report ``β·(log πθ − log πref)`` on SUMMED log-probs
  (also for ``sigmoid_norm`` and length-normalised ``ipo``, so every reference loss is
  reported on the same scale); with ``reference_free`` the reference log-probs are zero,
  so the rewards are ``β·log πθ`` (sums);
* losses that never use a reference (``simpo``, ``orpo``, ``cpo``, ``sft``) report
  ``β·avg`` (length-averaged policy log-prob), the implicit reward of SimPO.

With several losses, the rewards come from the first one.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.errors import ConfigError

__all__ = [
    "PairLogps", "LossParams", "LossOutput", "LossSpec", "LOSSES", "F_DIVERGENCES",
    "EXO_DEFAULT_EPSILON", "compute_loss", "needs_reference", "check_loss_options",
    "kto_loss", "kto_kl", "wpo_pair_weights", "ld_logps",
]

#: Label smoothing used by ``exo_pair`` when ``label_smoothing`` is 0 (EXO needs ε > 0:
#: its target distribution (1 − ε, ε) enters through ``log ε``).
EXO_DEFAULT_EPSILON = 1e-3

#: Values accepted by :attr:`LossParams.f_divergence`.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")

# Upper bound for length-averaged log-probs inside ORPO's log(1 - p): a probability of
# exactly 1 (average log-prob 0.0 in float32) would give an infinite log-odds and a NaN
# gradient, so the average is clamped just below 0.
_ORPO_MAX_AVG_LOGP = -1e-6


# --------------------------------------------------------------------------- data types


@dataclass
class PairLogps:
    """Per-pair policy (or reference) log-probabilities, float32, one entry per pair."""

    chosen: Tensor           # [B] sum of completion-token log-probs, log pi(y_w|x)
    rejected: Tensor         # [B] sum of completion-token log-probs, log pi(y_l|x)
    chosen_tokens: Tensor    # [B] completion token counts (float)
    rejected_tokens: Tensor  # [B]


@dataclass
class LossParams:
    """Hyper-parameters of every loss. Each field maps to the CLI flag ``--field-name``.

    Fields:
        beta: β, the strength of the implicit KL regularisation (DPO family), the reward
            scale of SimPO/CPO, and ORPO's λ (weight of the odds-ratio term). Must be > 0.
        label_smoothing: ε. cDPO flip probability for ``sigmoid``/``sigmoid_norm``/``aot``/
            ``aot_unpaired``; label-flip rate for ``robust`` (must be < 0.5); target
            smoothing for ``exo_pair`` (0 means :data:`EXO_DEFAULT_EPSILON`).
        ipo_length_normalize: ``ipo`` on length-averaged log-probs instead of sums.
        simpo_gamma: SimPO's target margin γ, used RAW as in the paper's formula
            ``−log σ(β(avg_w − avg_l) − γ)`` (not the γ/β ratio that SimPO's configs list:
            γ = ratio·β).
        rpo_alpha: if set, adds ``rpo_alpha · NLL(chosen)`` (length-averaged) to the
            per-pair loss of any paired loss (RPO, arXiv 2404.19733).
        reference_free: the DPO family with a uniform reference (reference log-probs 0).
        f_divergence: divergence of f-DPO (arXiv 2309.16240) for ``sigmoid``:
            ``reverse_kl`` (plain DPO), ``forward_kl``, ``js`` or ``alpha``.
        f_alpha: α of the α-divergence, in (0, 1).
        desirable_weight: KTO λ_D, weight of desirable (thumbs-up) rows.
        undesirable_weight: KTO λ_U, weight of undesirable (thumbs-down) rows.
        cpo_alpha: weight of CPO's NLL term (length-averaged).
        discopop_tau: τ of DiscoPOP's log-ratio modulation σ(βh/τ) (paper: 0.05).
        bco_delta: δ of ``bco_pair``, the reward shift on the reward (β·Δ) scale. The
            paper uses a running mean of the rewards; losses are pure, so the trainer
            feeds that running mean here each step (``prefopt.train.update_bco_delta``,
            from the ``bco/reward_mean`` metric) unless ``--bco-delta`` fixes it.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo_length_normalize: bool = False
    simpo_gamma: float = 0.5
    rpo_alpha: float | None = None
    reference_free: bool = False
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    cpo_alpha: float = 1.0
    discopop_tau: float = 0.05
    bco_delta: float = 0.0


@dataclass
class LossOutput:
    """Result of a loss: per-pair (per-row for KTO) losses and detached metrics."""

    losses: Tensor                  # [B] per-pair loss, differentiable
    chosen_rewards: Tensor          # [B] detached
    rejected_rewards: Tensor        # [B] detached
    metrics: dict[str, Tensor]      # extra scalar (0-dim, detached) metrics


@dataclass(frozen=True)
class LossSpec:
    """A registry entry.

    ``fn(policy, ref, params) -> LossOutput`` for paired losses (``ref`` is ``None`` for
    losses with ``needs_reference=False``); ``kto`` (``paired=False``) is called through
    :func:`kto_loss` instead. ``uses`` names the :class:`LossParams` fields the loss reads
    (``rpo_alpha`` and ``reference_free`` are handled by :func:`compute_loss`).
    """

    fn: Callable[..., LossOutput]
    needs_reference: bool
    paper: str
    uses: frozenset[str]
    description: str
    paired: bool = True


# --------------------------------------------------------------------------- helpers


def _tokens(count: Tensor) -> Tensor:
    # A completion of 0 tokens is dropped upstream; the clamp only keeps a stray one finite.
    return count.clamp(min=1.0)


def _avg(logps: Tensor, count: Tensor) -> Tensor:
    return logps / _tokens(count)


def _nll(policy: PairLogps) -> Tensor:
    """Per-token negative log-likelihood of each chosen completion, [B]."""
    return -_avg(policy.chosen, policy.chosen_tokens)


def _log_ratios(policy: PairLogps, ref: PairLogps, normalize: bool = False) -> tuple[Tensor, Tensor]:
    chosen = policy.chosen - ref.chosen
    rejected = policy.rejected - ref.rejected
    if normalize:
        chosen = chosen / _tokens(policy.chosen_tokens)
        rejected = rejected / _tokens(policy.rejected_tokens)
    return chosen, rejected


def _ref_rewards(policy: PairLogps, ref: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    return ((beta * (policy.chosen - ref.chosen)).detach(),
            (beta * (policy.rejected - ref.rejected)).detach())


def _avg_rewards(policy: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    return ((beta * _avg(policy.chosen, policy.chosen_tokens)).detach(),
            (beta * _avg(policy.rejected, policy.rejected_tokens)).detach())


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """−(1−ε)·log σ(z) − ε·log σ(−z) (the cDPO form; plain −log σ(z) when ε = 0)."""
    loss = -F.logsigmoid(z)
    if eps > 0:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-z)
    return loss


def _scalar(x: Tensor) -> Tensor:
    return x.detach().float().mean() if x.numel() else x.new_zeros(())


def _out(losses: Tensor, rewards: tuple[Tensor, Tensor], metrics: dict[str, Tensor] | None = None) -> LossOutput:
    return LossOutput(losses=losses, chosen_rewards=rewards[0], rejected_rewards=rewards[1],
                      metrics=metrics or {})


def _f_prime(delta: Tensor, divergence: str, alpha: float) -> Tensor:
    """f'(u) at u = πθ/πref = exp(Δ), up to an additive constant (it cancels in h)."""
    if divergence == "reverse_kl":      # f(u) = u log u,       f'(u) = log u + 1
        return delta
    if divergence == "forward_kl":      # f(u) = −log u,        f'(u) = −1/u
        return -torch.exp(-delta)
    if divergence == "js":              # f'(u) = log(2u/(1+u)) = log 2 + log σ(Δ)
        return F.logsigmoid(delta) + math.log(2.0)
    if divergence == "alpha":           # f'(u) = (1 − u^(−α))/α
        return -torch.expm1(-alpha * delta) / alpha
    raise ValueError(f"unknown f-divergence {divergence!r}; expected one of {F_DIVERGENCES}")


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --------------------------------------------------------------------------- paired losses
# Each takes (policy, ref, params); ref is a PairLogps (zeros under reference_free) for
# reference losses and None for reference-free ones.


def sigmoid_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """DPO (arXiv 2305.18290): ``−log σ(β·h)``.

    With ε > 0 it is conservative DPO (cDPO): ``−(1−ε)·log σ(βh) − ε·log σ(−βh)``, the
    expected DPO loss when each label is flipped with probability ε. With
    ``f_divergence != "reverse_kl"`` it is f-DPO (arXiv 2309.16240): each Δ is replaced by
    f'(πθ/πref): forward_kl ``−exp(−Δ)``, js ``log σ(Δ) + log 2``, alpha
    ``(1 − exp(−αΔ))/α``; reverse_kl gives plain DPO. forward_kl's ``exp(−Δ)`` overflows
    float32 when the policy falls about 88 nats below the reference on a sequence.

    When to choose it: the default for paired preference data with an SFT reference model;
    cDPO when some labels are probably wrong; f-DPO to trade reward for diversity
    (forward KL / JS / small α keep more of the reference's spread).
    """
    chosen, rejected = _log_ratios(policy, ref)
    if params.f_divergence != "reverse_kl":
        chosen = _f_prime(chosen, params.f_divergence, params.f_alpha)
        rejected = _f_prime(rejected, params.f_divergence, params.f_alpha)
    losses = _smoothed_logistic(params.beta * (chosen - rejected), params.label_smoothing)
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def robust_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """Robust DPO, rDPO (arXiv 2403.00409): an unbiased loss under label-flip rate ε.

    ``[(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))] / (1 − 2ε)``, ε in [0, 0.5); ε = 0 is DPO.

    When to choose it: noisy preference labels with a known (estimated) flip rate; unlike
    cDPO it de-biases the gradient instead of merely softening the target.
    """
    eps = params.label_smoothing
    chosen, rejected = _log_ratios(policy, ref)
    z = params.beta * (chosen - rejected)
    losses = ((1.0 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def hinge_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """SLiC / RSO hinge loss (arXiv 2305.10425, 2309.06657): ``max(0, 1 − β·h)``.

    When to choose it: you want pairs that are already separated by a margin 1/β to stop
    contributing (a hard margin instead of DPO's ever-decreasing logistic loss).
    """
    chosen, rejected = _log_ratios(policy, ref)
    losses = torch.relu(1.0 - params.beta * (chosen - rejected))
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def ipo_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """IPO (arXiv 2310.12036): ``(h − 1/(2β))²``, minimal at h = 1/(2β).

    Default convention: h on SUMMED log-probs, as in the IPO paper's formula (log-ratios of
    whole-sequence probabilities) and in the DPO authors' reference implementation. With
    ``ipo_length_normalize`` each log-prob is first divided by its token count, so the
    target margin 1/(2β) is per token (some implementations do this by default; then a
    smaller β is needed for the same sequence-level margin).

    When to choose it: preferences that are nearly deterministic (the same winner every
    time) make DPO push h to infinity and overfit; IPO regresses h to a finite target.
    """
    chosen, rejected = _log_ratios(policy, ref, normalize=params.ipo_length_normalize)
    losses = (chosen - rejected - 1.0 / (2.0 * params.beta)) ** 2
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def exo_pair_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """EXO, pairwise (arXiv 2402.00856): reverse KL from the policy's preference
    distribution ``p = (σ(βh), σ(−βh))`` to the smoothed label ``(1−ε, ε)``:
    ``σ(βh)·(log σ(βh) − log(1−ε)) + σ(−βh)·(log σ(−βh) − log ε)``.

    ε must be > 0; ε = 0 means :data:`EXO_DEFAULT_EPSILON` (1e-3). The loss is minimal at
    βh = log((1−ε)/ε), a finite margin.

    When to choose it: you want the mode-seeking (reverse-KL) fit of the exact alignment
    objective rather than DPO's mean-seeking (forward-KL) one.
    """
    eps = params.label_smoothing if params.label_smoothing > 0 else EXO_DEFAULT_EPSILON
    chosen, rejected = _log_ratios(policy, ref)
    z = params.beta * (chosen - rejected)
    log_p_w, log_p_l = F.logsigmoid(z), F.logsigmoid(-z)
    losses = (torch.exp(log_p_w) * (log_p_w - math.log1p(-eps))
              + torch.exp(log_p_l) * (log_p_l - math.log(eps)))
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def nca_pair_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """NCA, pairwise (arXiv 2402.05369):
    ``−log σ(βΔ_w) − ½·log σ(−βΔ_w) − ½·log σ(−βΔ_l)``.

    It optimises absolute rewards instead of their difference, so the chosen likelihood
    is pushed up rather than only the margin.

    When to choose it: DPO lowers the chosen log-probs (both likelihoods fall, common on
    reasoning/math data) and you want a paired loss that keeps chosen likelihood rising.
    """
    chosen, rejected = _log_ratios(policy, ref)
    rw, rl = params.beta * chosen, params.beta * rejected
    losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def bco_pair_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """BCO on pairs (arXiv 2404.04656): binary classification of chosen vs rejected with a
    reward shift δ: ``−log σ(βΔ_w − δ) − log σ(−(βΔ_l − δ))``.

    The paper sets δ to a running mean of the rewards β·Δ (chosen and rejected). Losses are
    pure, so δ comes from ``params.bco_delta``; the trainer feeds its running mean,
    updated from the ``bco/reward_mean`` metric (this batch's mean reward).

    When to choose it: a classifier view of preferences that treats each completion on its
    own (each term pushes its own likelihood), robust when chosen/rejected are both poor.
    """
    chosen, rejected = _log_ratios(policy, ref)
    rw, rl = params.beta * chosen, params.beta * rejected
    delta = params.bco_delta
    losses = -F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))
    metrics = {"bco/reward_mean": _scalar(torch.cat([rw, rl]))}
    return _out(losses, _ref_rewards(policy, ref, params.beta), metrics)


def sppo_hard_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """SPPO with hard labels (arXiv 2405.00675):
    ``(Δ_w − 1/(2β))² + (Δ_l + 1/(2β))²``.

    SPPO regresses each log-ratio to η·(P(y wins) − ½); hard labels give P = 1 for the
    chosen and 0 for the rejected, and η = 1/β here. Here πref is the previous iteration's
    policy (self-play).

    When to choose it: iterative self-play, one round per regenerated dataset, when you
    want each completion's log-ratio pulled to a fixed target rather than a margin.
    """
    chosen, rejected = _log_ratios(policy, ref)
    half = 1.0 / (2.0 * params.beta)
    losses = (chosen - half) ** 2 + (rejected + half) ** 2
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def aot_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """AOT, paired (arXiv 2406.05882): distributional alignment by optimal transport.

    The policy margins ``log πθ(y_w) − log πθ(y_l)`` and the reference margins are each
    sorted over the batch, and the k-th smallest policy margin is compared with the k-th
    smallest reference margin: ``δ_k = sort(policy margins)_k − sort(ref margins)_k``,
    loss_k = ``−(1−ε)·log σ(βδ_k) − ε·log σ(−βδ_k)``. This makes the policy's margin
    distribution first-order stochastically dominate the reference's.

    Note: ``losses[k]`` is the loss of the k-th quantile, not of pair k (per-pair sample
    weights do not line up with it); the sort is over the local batch only, so larger
    batches give a finer transport plan. Rewards are per pair, as usual.

    When to choose it: paired data, large batches, when you care about the distribution of
    margins (no pair left far behind) more than each pair individually.
    """
    policy_margin = policy.chosen - policy.rejected
    ref_margin = ref.chosen - ref.rejected
    delta = torch.sort(policy_margin).values - torch.sort(ref_margin).values
    losses = _smoothed_logistic(params.beta * delta, params.label_smoothing)
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def aot_unpaired_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """AOT, unpaired (arXiv 2406.05882): the chosen log-ratios Δ_w and the rejected
    log-ratios Δ_l are sorted separately over the batch and matched by rank:
    ``δ_k = sort(Δ_w)_k − sort(Δ_l)_k``, loss_k = ``−(1−ε)·log σ(βδ_k) − ε·log σ(−βδ_k)``,
    so the distribution of chosen rewards dominates that of rejected rewards.

    The data are still pairs in a batch, but the pairing is not used. ``losses[k]`` is the
    loss of the k-th quantile (see :func:`aot_loss`).

    When to choose it: chosen and rejected completions that were not produced for the same
    comparison (e.g. separately rated good and bad answers, packed into pairs).
    """
    chosen, rejected = _log_ratios(policy, ref)
    delta = torch.sort(chosen).values - torch.sort(rejected).values
    losses = _smoothed_logistic(params.beta * delta, params.label_smoothing)
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def apo_zero_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """APO-zero (arXiv 2408.06266): ``1 − σ(βΔ_w) + σ(βΔ_l)``, bounded in [0, 2].

    It anchors on the reference: raises the chosen likelihood and lowers the rejected one.

    When to choose it: the chosen answers are better than what the model produces now
    (e.g. from a stronger model), so their likelihood should go up.
    """
    chosen, rejected = _log_ratios(policy, ref)
    losses = 1.0 - torch.sigmoid(params.beta * chosen) + torch.sigmoid(params.beta * rejected)
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def apo_down_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """APO-down (arXiv 2408.06266): ``σ(βΔ_w) + 1 − σ(β(Δ_w − Δ_l))``, bounded in [0, 2].

    It lowers both likelihoods, the rejected more than the chosen.

    When to choose it: the model is already better than the chosen answers (they are
    only "less bad"), so neither should become more likely in absolute terms.
    """
    chosen, rejected = _log_ratios(policy, ref)
    losses = torch.sigmoid(params.beta * chosen) + 1.0 - torch.sigmoid(params.beta * (chosen - rejected))
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def discopop_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """DiscoPOP / LRML (arXiv 2406.08414), the discovered log-ratio-modulated loss:
    with ρ = β·h and s = σ(ρ/τ): ``(1 − s)·(−log σ(ρ)) + s·exp(−ρ)``.

    A blend of the logistic (DPO) and exponential losses, switching around ρ = 0 with
    sharpness τ = ``discopop_tau`` (paper: 0.05). It is not monotone near ρ = 0 (the
    gradient changes sign there), as noted in the paper. Computed as
    ``σ(−ρ/τ)·softplus(−ρ) + exp(log σ(ρ/τ) − ρ)`` so that no ``0·∞`` arises.

    When to choose it: a drop-in alternative to DPO reported to score higher on chat
    benchmarks (MT-Bench / AlpacaEval) at the same β.
    """
    chosen, rejected = _log_ratios(policy, ref)
    rho = params.beta * (chosen - rejected)
    tau = params.discopop_tau
    losses = torch.sigmoid(-rho / tau) * F.softplus(-rho) + torch.exp(F.logsigmoid(rho / tau) - rho)
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def sigmoid_norm_loss(policy: PairLogps, ref: PairLogps, params: LossParams) -> LossOutput:
    """Length-normalised DPO (DPO, arXiv 2305.18290, with per-token log-ratios, the
    preference loss of Tülu 3, arXiv 2411.15124): each log-ratio divided by its token count,
    ``−log σ(β·(Δ_w/|y_w| − Δ_l/|y_l|))``, cDPO smoothing with ε > 0.

    β acts per token here, so it usually needs to be larger than for ``sigmoid``.

    When to choose it: DPO makes answers longer and longer (length exploitation) and you
    still want a reference model.
    """
    chosen, rejected = _log_ratios(policy, ref, normalize=True)
    losses = _smoothed_logistic(params.beta * (chosen - rejected), params.label_smoothing)
    return _out(losses, _ref_rewards(policy, ref, params.beta))


def sft_loss(policy: PairLogps, ref: PairLogps | None, params: LossParams) -> LossOutput:
    """SFT: the per-token negative log-likelihood of the chosen completion, ``−avg_w``.

    Combined with ``sigmoid`` (``--loss-type sigmoid,sft``) it is RPO
    (arXiv 2404.19733): DPO + NLL on the chosen answer.

    When to choose it: alone, to fine-tune on the chosen answers; with a preference loss,
    when the chosen log-probs fall during training (the NLL term keeps them up).
    """
    nll = _nll(policy)
    return _out(nll, _avg_rewards(policy, params.beta), {"nll_loss": _scalar(nll)})


def simpo_loss(policy: PairLogps, ref: PairLogps | None, params: LossParams) -> LossOutput:
    """SimPO (arXiv 2405.14734): ``−log σ(β·(avg_w − avg_l) − γ)``, no reference model.

    γ = ``simpo_gamma`` is the RAW target margin of the paper's formula. SimPO's released
    configs list the ratio γ/β instead; convert with γ = ratio·β (for example β = 2.5,
    γ/β = 0.55 gives γ = 1.375). The paper's β is 2.0–10, far above DPO's 0.1.

    When to choose it: no reference model (no SFT checkpoint, or no memory for a second
    copy), and length exploitation is a concern (the reward is length-averaged).
    """
    avg_w = _avg(policy.chosen, policy.chosen_tokens)
    avg_l = _avg(policy.rejected, policy.rejected_tokens)
    losses = -F.logsigmoid(params.beta * (avg_w - avg_l) - params.simpo_gamma)
    return _out(losses, _avg_rewards(policy, params.beta))


def orpo_loss(policy: PairLogps, ref: PairLogps | None, params: LossParams) -> LossOutput:
    """ORPO (arXiv 2403.07691): ``NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l))``.

    ``log odds(y) = avg − log(1 − exp(avg))`` on the length-averaged log-prob ``avg``
    (computed with a stable log1mexp; avg is clamped to ≤ −1e−6 so that a probability of
    exactly 1 stays finite). λ is ``beta`` (the paper uses 0.1–0.25). The NLL is the
    per-token NLL of the chosen completion. Metrics: ``orpo/log_odds_ratio`` (batch mean)
    and ``nll_loss``.

    When to choose it: no SFT model yet: ORPO does SFT and preference alignment in one
    stage from the base model, with no reference model.
    """
    avg_w = _avg(policy.chosen, policy.chosen_tokens).clamp(max=_ORPO_MAX_AVG_LOGP)
    avg_l = _avg(policy.rejected, policy.rejected_tokens).clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds = (avg_w - _log1mexp(avg_w)) - (avg_l - _log1mexp(avg_l))
    nll = _nll(policy)
    losses = nll - params.beta * F.logsigmoid(log_odds)
    metrics = {"orpo/log_odds_ratio": _scalar(log_odds), "nll_loss": _scalar(nll)}
    return _out(losses, _avg_rewards(policy, params.beta), metrics)


def cpo_loss(policy: PairLogps, ref: PairLogps | None, params: LossParams) -> LossOutput:
    """CPO (arXiv 2401.08417): ``−log σ(β·(log πθ(y_w) − log πθ(y_l))) + α·NLL(y_w)``.

    DPO with a uniform reference on summed log-probs, plus a behaviour-cloning term
    (α = ``cpo_alpha``, the NLL length-averaged per token).

    When to choose it: no reference model, and the chosen answers are high quality
    (CPO was built for translation with better-than-gold references).
    """
    nll = _nll(policy)
    losses = -F.logsigmoid(params.beta * (policy.chosen - policy.rejected)) + params.cpo_alpha * nll
    return _out(losses, _avg_rewards(policy, params.beta), {"nll_loss": _scalar(nll)})


# --------------------------------------------------------------------------- KTO


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(policy_kl − ref_kl)), detached (0-dim).

    ``policy_kl_logps`` / ``ref_kl_logps`` are the log-probs of MISMATCHED pairs (the
    completion of row i+1 given the prompt of row i), a batch estimate of KL(πθ‖πref).
    A trainer running several processes should gather the per-process means (or sums
    and counts) first and pass the result to :func:`kto_loss` as ``kl``.
    """
    diff = (policy_kl_logps - ref_kl_logps).detach().float()
    if diff.numel() == 0:
        return diff.new_zeros(())
    return diff.mean().clamp(min=0.0)


def kto_loss(policy_logps: Tensor, ref_logps: Tensor | None, labels: Tensor,
             policy_kl_logps: Tensor | None, ref_kl_logps: Tensor | None,
             params: LossParams, kl: Tensor | None = None) -> LossOutput:
    """KTO (arXiv 2402.01306), unpaired: each row is one completion with a bool label.

    With r = log πθ(y|x) − log πref(y|x) (summed) and the reference point z0
    (:func:`kto_kl`, or ``kl`` when precomputed, clamped at 0 and detached):

    * desirable rows: ``λ_D·(1 − σ(β(r − z0)))`` (λ_D = ``desirable_weight``);
    * undesirable rows: ``λ_U·(1 − σ(β(z0 − r)))`` (λ_U = ``undesirable_weight``).

    Returns ``losses`` [N] in row order; ``chosen_rewards`` = β·r of the desirable rows and
    ``rejected_rewards`` = β·r of the undesirable rows (both detached, each possibly
    empty, in row order). The trainer should average each over ALL rows of its kind in
    the accumulated batch (sum of rewards / count of rows, gathered across processes),
    not average per-micro-batch means, since the split differs between micro-batches.
    Metric ``kto/kl`` = z0. ``ref_logps`` may be ``None`` only with ``reference_free``.

    When to choose it: unpaired thumbs-up / thumbs-down feedback, or very imbalanced good
    and bad examples (tune λ_D, λ_U so that λ_D·n_D / (λ_U·n_U) is in [1, 4/3]).
    """
    if params.reference_free:
        ref_logps = torch.zeros_like(policy_logps)
        if policy_kl_logps is not None:
            ref_kl_logps = torch.zeros_like(policy_kl_logps)
    elif ref_logps is None:
        raise ValueError("kto_loss needs ref_logps unless params.reference_free is True")
    if kl is not None:
        z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0.0)
    elif policy_kl_logps is None or ref_kl_logps is None:
        raise ValueError("kto_loss needs policy_kl_logps and ref_kl_logps, or a precomputed kl")
    else:
        z0 = kto_kl(policy_kl_logps, ref_kl_logps)
    labels = labels.to(device=policy_logps.device, dtype=torch.bool)
    r = policy_logps - ref_logps
    z0 = z0.to(policy_logps.dtype)
    desirable = params.desirable_weight * (1.0 - torch.sigmoid(params.beta * (r - z0)))
    undesirable = params.undesirable_weight * (1.0 - torch.sigmoid(params.beta * (z0 - r)))
    losses = torch.where(labels, desirable, undesirable)
    rewards = (params.beta * r).detach()
    return LossOutput(losses=losses, chosen_rewards=rewards[labels], rejected_rewards=rewards[~labels],
                      metrics={"kto/kl": z0.detach()})


# --------------------------------------------------------------------------- modifiers


def wpo_pair_weights(chosen_logw: Tensor, rejected_logw: Tensor) -> Tensor:
    """WPO (arXiv 2406.11827) pair weights: ``exp(chosen_logw + rejected_logw)``, detached.

    Each per-sequence log-weight is computed upstream (it needs the full vocabulary
    distribution at every position) as the length-averaged "sampled alignment" term
    ``logw(y) = (1/|y|)·Σ_t [log πθ(y_t|x,y<t) − log Σ_v πθ(v|x,y<t)²]`` over the
    completion tokens, under the current policy, without gradient. The pair weight
    w(x,y_w)·w(x,y_l) re-weights off-policy pairs by how likely the policy is to produce
    them; it is not clamped, and can exceed 1 where a token is more likely than the
    policy's expected token probability Σ_v p(v)². Pass it as ``sample_weights``.
    """
    return torch.exp(chosen_logw.detach() + rejected_logw.detach())


def ld_logps(token_logps: Tensor, token_seq: Tensor, token_pos: Tensor, public_len: Tensor,
             alpha: float) -> Tensor:
    """LD-DPO (arXiv 2409.06411) per-sequence log-probs with the verbose part down-weighted.

    ``log π̂(y) = Σ_{t < l_p} log p(y_t) + α·Σ_{t ≥ l_p} log p(y_t)``, where l_p =
    ``public_len[seq]`` is the public length (for a pair: min(|y_w|, |y_l|) for both
    sequences). ``token_logps`` [T] are per-token log-probs, ``token_seq`` [T] the
    sequence index (0..N−1), ``token_pos`` [T] the 0-based position within the
    completion, ``public_len`` [N]. Returns [N] (differentiable in ``token_logps``).
    α = 1 gives plain sums; α in [0, 1].
    """
    if not 0.0 <= alpha <= 1.0 or math.isnan(alpha):
        raise ConfigError(f"--ld-alpha must be in [0, 1], got {alpha}")
    token_seq = token_seq.long()
    public = public_len.to(token_pos.device)[token_seq]
    weight = torch.where(token_pos < public, 1.0, float(alpha)).to(token_logps.dtype)
    out = token_logps.new_zeros(public_len.shape[0])
    return out.index_add(0, token_seq, token_logps * weight)


# --------------------------------------------------------------------------- registry

_DPO_EPS = frozenset({"beta", "label_smoothing"})

LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, True, "2305.18290",
                        frozenset({"beta", "label_smoothing", "f_divergence", "f_alpha"}),
                        "DPO; cDPO with label_smoothing; f-DPO with f_divergence"),
    "robust": LossSpec(robust_loss, True, "2403.00409", _DPO_EPS,
                       "rDPO: unbiased DPO under label-flip rate label_smoothing"),
    "hinge": LossSpec(hinge_loss, True, "2305.10425", frozenset({"beta"}),
                      "SLiC/RSO hinge: max(0, 1 - beta*h)"),
    "ipo": LossSpec(ipo_loss, True, "2310.12036", frozenset({"beta", "ipo_length_normalize"}),
                    "IPO: (h - 1/(2 beta))^2"),
    "exo_pair": LossSpec(exo_pair_loss, True, "2402.00856", _DPO_EPS,
                         "EXO: reverse KL to smoothed labels"),
    "nca_pair": LossSpec(nca_pair_loss, True, "2402.05369", frozenset({"beta"}),
                         "NCA: absolute-reward noise-contrastive alignment"),
    "bco_pair": LossSpec(bco_pair_loss, True, "2404.04656", frozenset({"beta", "bco_delta"}),
                         "BCO: binary classifier with reward shift bco_delta"),
    "sppo_hard": LossSpec(sppo_hard_loss, True, "2405.00675", frozenset({"beta"}),
                          "SPPO with hard labels"),
    "aot": LossSpec(aot_loss, True, "2406.05882", _DPO_EPS,
                    "AOT paired: sorted policy margins vs sorted reference margins"),
    "aot_unpaired": LossSpec(aot_unpaired_loss, True, "2406.05882", _DPO_EPS,
                             "AOT unpaired: sorted chosen vs sorted rejected log-ratios"),
    "apo_zero": LossSpec(apo_zero_loss, True, "2408.06266", frozenset({"beta"}),
                         "APO-zero: raise chosen, lower rejected likelihood"),
    "apo_down": LossSpec(apo_down_loss, True, "2408.06266", frozenset({"beta"}),
                         "APO-down: lower both likelihoods, rejected more"),
    "discopop": LossSpec(discopop_loss, True, "2406.08414", frozenset({"beta", "discopop_tau"}),
                         "DiscoPOP: log-ratio-modulated logistic/exponential blend"),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, True, "2411.15124", _DPO_EPS,
                             "length-normalised DPO"),
    "sft": LossSpec(sft_loss, False, "2404.19733", frozenset(),
                    "NLL of the chosen completion (per token); sigmoid+sft is RPO"),
    "simpo": LossSpec(simpo_loss, False, "2405.14734", frozenset({"beta", "simpo_gamma"}),
                      "SimPO: reference-free, length-averaged, margin simpo_gamma"),
    "orpo": LossSpec(orpo_loss, False, "2403.07691", frozenset({"beta"}),
                     "ORPO: NLL + beta * odds-ratio loss, reference-free"),
    "cpo": LossSpec(cpo_loss, False, "2401.08417", frozenset({"beta", "cpo_alpha"}),
                    "CPO: reference-free DPO + cpo_alpha * NLL"),
    "kto": LossSpec(kto_loss, True, "2402.01306",
                    frozenset({"beta", "desirable_weight", "undesirable_weight"}),
                    "KTO: unpaired desirable/undesirable rows (use kto_loss)", paired=False),
}

# Handled by compute_loss for every paired loss rather than by one loss.
_PAIRED_COMMON = frozenset({"rpo_alpha"})

# Names people type for losses under another name here (used only to suggest).
_ALIASES = {
    "dpo": "sigmoid", "cdpo": "sigmoid with --label-smoothing", "rdpo": "robust",
    "slic": "hinge", "rso": "hinge", "rpo": "sigmoid,sft (or --rpo-alpha)",
    "aot_pair": "aot_unpaired", "exo": "exo_pair", "nca": "nca_pair", "bco": "bco_pair",
    "sppo": "sppo_hard", "apo": "apo_zero or apo_down", "ln_dpo": "sigmoid_norm",
    "dpo_norm": "sigmoid_norm", "lrml": "discopop", "f_dpo": "sigmoid with --f-divergence",
    "fdpo": "sigmoid with --f-divergence", "wpo": "--wpo-weighting", "ld_dpo": "--ld-alpha",
    "lddpo": "--ld-alpha", "tr_dpo": "--ref-sync", "trdpo": "--ref-sync", "nll": "sft",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _suggest(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key in LOSSES:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, list(LOSSES) + list(_ALIASES), n=1, cutoff=0.5)
    if close:
        return _ALIASES.get(close[0], close[0])
    return ""


# --------------------------------------------------------------------------- entry points


def needs_reference(loss_types: list[str], reference_free: bool) -> bool:
    """True when a reference model must be run: some loss needs one and the reference is
    not replaced by the uniform distribution (``reference_free``)."""
    if reference_free:
        return False
    return any(LOSSES[name].needs_reference for name in loss_types)


def _zero_ref(policy: PairLogps) -> PairLogps:
    return PairLogps(torch.zeros_like(policy.chosen), torch.zeros_like(policy.rejected),
                     policy.chosen_tokens, policy.rejected_tokens)


def compute_loss(loss_types: list[str], loss_weights: list[float] | None, policy: PairLogps,
                 ref: PairLogps | None, params: LossParams,
                 sample_weights: Tensor | None = None) -> LossOutput:
    """Per-pair total loss ``Σ_i w_i·loss_i + rpo_alpha·NLL(chosen)``, times sample_weights.

    ``loss_weights`` default to 1.0 each. Rewards come from the first loss. Metrics are
    merged; a key produced by more than one source (a loss, or ``rpo`` for the
    ``rpo_alpha`` term) is renamed ``<source>/<key>`` for each. With several losses,
    ``loss/<name>`` holds each loss's (unweighted) batch mean. ``sample_weights`` [B]
    (e.g. :func:`wpo_pair_weights`) multiply the per-pair total.

    With ``params.reference_free`` the reference log-probs are zeros (a given ``ref`` is
    not used). A reference loss with ``ref=None`` and ``reference_free`` False is a
    caller bug: ``ValueError``. Options are validated by :func:`check_loss_options`.
    """
    if not loss_types:
        raise ValueError("compute_loss needs at least one loss type")
    weights = [1.0] * len(loss_types) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(loss_types):
        raise ValueError(f"{len(loss_types)} loss types but {len(weights)} loss weights")

    ref_eff: PairLogps | None = None
    if any(LOSSES[name].needs_reference for name in loss_types):
        if params.reference_free:
            ref_eff = _zero_ref(policy)
        elif ref is None:
            raise ValueError(f"losses {loss_types} need reference log-probs, but ref is None "
                             "and params.reference_free is False")
        else:
            ref_eff = ref

    total: Tensor | None = None
    first: LossOutput | None = None
    sources: list[tuple[str, dict[str, Tensor]]] = []
    per_loss: dict[str, Tensor] = {}
    for name, weight in zip(loss_types, weights):
        spec = LOSSES[name]
        if not spec.paired:
            raise ValueError(f"{name} is not a per-pair loss: call {spec.fn.__name__}(), not compute_loss()")
        out = spec.fn(policy, ref_eff if spec.needs_reference else None, params)
        term = weight * out.losses
        total = term if total is None else total + term
        if first is None:
            first = out
        sources.append((name, out.metrics))
        per_loss[f"loss/{name}"] = _scalar(out.losses)

    assert total is not None and first is not None
    if params.rpo_alpha is not None:
        nll = _nll(policy)
        total = total + params.rpo_alpha * nll
        sources.append(("rpo", {"nll_loss": _scalar(nll)}))

    counts: dict[str, int] = {}
    for _, metrics in sources:
        for key in metrics:
            counts[key] = counts.get(key, 0) + 1
    merged: dict[str, Tensor] = {}
    for source, metrics in sources:
        for key, value in metrics.items():
            merged[f"{source}/{key}" if counts[key] > 1 else key] = value
    if len(loss_types) > 1:
        merged.update(per_loss)

    if sample_weights is not None:
        total = total * sample_weights.to(total.dtype)
    return LossOutput(losses=total, chosen_rewards=first.chosen_rewards,
                      rejected_rewards=first.rejected_rewards, metrics=merged)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_loss_options(loss_types: list[str], loss_weights: list[float] | None,
                       explicitly_set: set[str], params: LossParams) -> list[str]:
    """Validate the loss configuration; raise :class:`ConfigError` on the first problem.

    ``explicitly_set`` holds the :class:`LossParams` field names the user set (CLI flags
    such as ``--label-smoothing`` are accepted too; other names are ignored). Returns one
    warning per explicitly set option that none of the chosen losses reads, saying what
    is ignored.
    """
    if not loss_types:
        raise ConfigError("--loss-type is empty: give at least one loss, e.g. --loss-type sigmoid")
    for name in loss_types:
        if name not in LOSSES:
            hint = _suggest(name)
            hint = f" Did you mean {hint}?" if hint else ""
            raise ConfigError(f"unknown loss type {name!r} in --loss-type.{hint} "
                              f"Valid loss types: {', '.join(LOSSES)}.")
    dupes = sorted({n for n in loss_types if loss_types.count(n) > 1})
    if dupes:
        raise ConfigError(f"--loss-type lists {', '.join(dupes)} more than once; "
                          "give each loss once and use --loss-weights to weight it")
    if "kto" in loss_types and len(loss_types) > 1:
        raise ConfigError("--loss-type kto cannot be combined with other losses: kto trains on unpaired "
                          "rows, the others on pairs")
    if "plackett_luce" in loss_types and len(loss_types) > 1:
        raise ConfigError("--loss-type plackett_luce cannot be combined with other losses: it is one listwise "
                          "term over a prompt's K answers, the others are per pair")

    if loss_weights is not None:
        if len(loss_weights) != len(loss_types):
            raise ConfigError(f"--loss-weights has {len(loss_weights)} value(s) but --loss-type has "
                              f"{len(loss_types)} loss(es) ({', '.join(loss_types)}); give one weight per loss")
        for name, w in zip(loss_types, loss_weights):
            if not _finite(w) or w < 0:
                raise ConfigError(f"--loss-weights: the weight of {name} must be a finite number >= 0, got {w}")
        if all(w == 0 for w in loss_weights):
            raise ConfigError("--loss-weights are all 0: nothing would be trained")

    if not _finite(params.beta) or params.beta <= 0:
        raise ConfigError(f"--beta must be a finite number > 0, got {params.beta}")
    eps = params.label_smoothing
    if "robust" in loss_types:
        if not _finite(eps) or not 0.0 <= eps < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5) for the robust loss "
                              f"(it divides by 1 - 2*epsilon), got {eps}")
    elif not _finite(eps) or not 0.0 <= eps < 1.0:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {eps}")

    uses: set[str] = set()
    for name in loss_types:
        uses |= LOSSES[name].uses
    if any(LOSSES[name].paired for name in loss_types):
        uses |= _PAIRED_COMMON

    if params.reference_free and not any(LOSSES[n].needs_reference for n in loss_types):
        raise ConfigError(f"--reference-free has no effect: {', '.join(loss_types)} use(s) no reference "
                          "model anyway; drop --reference-free")
    if params.f_divergence not in F_DIVERGENCES:
        close = difflib.get_close_matches(str(params.f_divergence), F_DIVERGENCES, n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise ConfigError(f"unknown --f-divergence {params.f_divergence!r}.{hint} "
                          f"Valid: {', '.join(F_DIVERGENCES)}.")
    if "f_alpha" in uses and params.f_divergence == "alpha" and (
            not _finite(params.f_alpha) or not 0.0 < params.f_alpha < 1.0):
        raise ConfigError(f"--f-alpha must be in (0, 1) for the alpha divergence, got {params.f_alpha}")
    if params.rpo_alpha is not None and (not _finite(params.rpo_alpha) or params.rpo_alpha < 0):
        raise ConfigError(f"--rpo-alpha must be a finite number >= 0, got {params.rpo_alpha}")
    for field_name in ("desirable_weight", "undesirable_weight"):
        value = getattr(params, field_name)
        if not _finite(value) or value <= 0:
            raise ConfigError(f"{_flag(field_name)} must be a finite number > 0, got {value}")
    if not _finite(params.cpo_alpha) or params.cpo_alpha < 0:
        raise ConfigError(f"--cpo-alpha must be a finite number >= 0, got {params.cpo_alpha}")
    if not _finite(params.simpo_gamma) or params.simpo_gamma < 0:
        raise ConfigError(f"--simpo-gamma must be a finite number >= 0, got {params.simpo_gamma}")
    if not _finite(params.discopop_tau) or params.discopop_tau <= 0:
        raise ConfigError(f"--discopop-tau must be a finite number > 0, got {params.discopop_tau}")
    if not _finite(params.bco_delta):
        raise ConfigError(f"--bco-delta must be a finite number, got {params.bco_delta}")

    known = {f.name for f in fields(LossParams)}
    chosen = ", ".join(loss_types)
    warnings: list[str] = []
    for raw in sorted(explicitly_set):
        name = raw.lstrip("-").replace("-", "_")
        if name not in known or name == "reference_free" or name in uses:
            continue
        readers = [n for n, s in LOSSES.items() if name in s.uses]
        others = [n for n in LOSSES if n not in readers]
        if name in _PAIRED_COMMON:
            where = "it applies to every paired loss, not to kto"
        elif len(readers) > len(others):
            where = f"it applies to every loss except {', '.join(others)}"
        else:
            where = f"it applies only to {', '.join(readers)}"
        warnings.append(f"{_flag(name)} is ignored: the chosen loss type(s) ({chosen}) do not read it "
                        f"({where})")
    if "f_alpha" in uses and params.f_divergence != "alpha" and any(
            raw.lstrip("-").replace("-", "_") == "f_alpha" for raw in explicitly_set):
        warnings.append(f"--f-alpha is ignored: it applies only to --f-divergence alpha, "
                        f"and --f-divergence is {params.f_divergence}")
    if params.rpo_alpha is not None and "sft" in loss_types:
        warnings.append("--rpo-alpha adds a second NLL term on top of the sft loss: the chosen "
                        "completion's NLL is counted twice (weight of sft + rpo_alpha)")
    if "exo_pair" in loss_types and eps == 0:
        warnings.append(f"exo_pair needs --label-smoothing > 0; using {EXO_DEFAULT_EPSILON}")
    return warnings


# --------------------------------------------------------------------------- K answers per prompt
# A batch of P prompts, each with K_p >= 2 answers, padded to [P, Kmax]: ``valid`` [P, Kmax]
# (bool) marks the real answers; ``pol`` / ``ref`` [P, Kmax] are summed log-probs and
# ``scores`` [P, Kmax] the answers' scores (higher is better, ties allowed, finite where
# valid). Values at padded entries are never read (they may be anything, even NaN or inf):
# they are masked before any arithmetic that could reach the loss or its gradient.

__all__ += [
    "PAIRINGS", "PAIR_WEIGHTINGS", "KPairs", "KLossOutput", "derive_pairs", "gather_pairs",
    "reduce_pairs", "k_rewards", "k_pair_loss", "plackett_luce_loss", "kendall_tau_b",
    "k_reward_metrics",
]

#: Values accepted by the ``pairing`` argument of :func:`derive_pairs` / :func:`k_pair_loss`.
PAIRINGS = ("all", "best_vs_rest", "best_vs_worst")

#: Values accepted by the ``weighting`` argument of :func:`derive_pairs` / :func:`k_pair_loss`.
PAIR_WEIGHTINGS = ("prompt", "pair")

# Pairwise losses whose ``losses[k]`` is a batch quantile rather than pair k's loss: their
# values cannot be reduced per prompt.
_NOT_PER_PAIR = frozenset({"aot", "aot_unpaired"})


@dataclass
class KPairs:
    """Pairs derived from K scored answers per prompt (see :func:`derive_pairs`).

    Pair n compares answer ``chosen[n]`` with answer ``rejected[n]`` of prompt
    ``prompt[n]``: both are column indices into the [P, Kmax] tensors, so
    ``x[pairs.prompt, pairs.chosen]`` picks the chosen answers' values. Pairs are ordered
    by (prompt, chosen, rejected).
    """

    chosen: Tensor     # [N] long, answer index (column) of the better answer
    rejected: Tensor   # [N] long, answer index (column) of the strictly worse answer
    prompt: Tensor     # [N] long, prompt index (row)
    weight: Tensor     # [N] float32, weight of the pair in its prompt's loss
    num_pairs: Tensor  # [P] long, number of pairs of each prompt


@dataclass
class KLossOutput:
    """Result of a K-answer loss.

    ``losses`` [P] is the per-prompt loss (differentiable; 0 where ``has_loss`` is
    False); ``has_loss`` [P] marks prompts that carry a training signal (at least one
    pair for :func:`k_pair_loss`, at least two valid answers for
    :func:`plackett_luce_loss`); average ``losses`` over those. ``rewards`` [P, Kmax]
    are the detached implicit rewards (0 at padding); ``metrics`` are 0-dim detached
    scalars (:func:`k_reward_metrics` plus the pairwise losses' own metrics).
    ``pairs`` / ``pair_losses`` [N] are set by :func:`k_pair_loss` only.
    """

    losses: Tensor
    has_loss: Tensor
    rewards: Tensor
    metrics: dict[str, Tensor]
    pairs: KPairs | None = None
    pair_losses: Tensor | None = None


def _check_k(scores: Tensor, valid: Tensor, **others: Tensor | None) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [P, Kmax], got shape {tuple(scores.shape)}")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool mask, got dtype {valid.dtype}")
    for name, t in [("valid", valid), *others.items()]:
        if t is not None and t.shape != scores.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, scores {tuple(scores.shape)}: "
                             "all K-answer tensors must be [P, Kmax]")


def _first_extreme(scores: Tensor, valid: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """Index of the FIRST (lowest-index) valid answer with the max (min) score per prompt,
    and that score. Prompts without a valid answer get index 0 (the caller masks them)."""
    fill = -math.inf if largest else math.inf
    masked = scores.masked_fill(~valid, fill)
    extreme = masked.max(dim=1).values if largest else masked.min(dim=1).values
    cols = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    hit = valid & (masked == extreme[:, None])
    idx = torch.where(hit, cols, scores.shape[1]).min(dim=1).values
    return idx.clamp(max=scores.shape[1] - 1), extreme


def _pair_matrix(scores: Tensor, valid: Tensor, pairing: str) -> Tensor:
    """[P, Kmax, Kmax] bool: M[p, i, j] when (i, j) is a derived (better, worse) pair."""
    P, K = scores.shape
    if pairing == "all":
        return valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] > scores[:, None, :])
    best, best_score = _first_extreme(scores, valid, largest=True)
    rows = torch.arange(P, device=scores.device)
    if pairing == "best_vs_rest":
        worse = valid & (scores < best_score[:, None])           # [P, K]
        m = torch.zeros(P, K, K, dtype=torch.bool, device=scores.device)
        m[rows, best] = worse
        return m
    worst, worst_score = _first_extreme(scores, valid, largest=False)
    m = torch.zeros(P, K, K, dtype=torch.bool, device=scores.device)
    m[rows, best, worst] = valid.any(dim=1) & (best_score > worst_score)
    return m


def derive_pairs(scores: Tensor, valid: Tensor, pairing: str = "all",
                 weighting: str = "prompt") -> KPairs:
    """Derive (chosen, rejected) pairs from K scored answers per prompt.

    ``pairing``:

    * ``"all"``: every ordered pair (i, j) of valid answers with ``score_i > score_j``
      (K(K−1)/2 pairs without ties; tied answers form no pair);
    * ``"best_vs_rest"``: the best answer against each strictly worse valid answer;
    * ``"best_vs_worst"``: one pair per prompt, the best against the worst answer.

    Ties at the top or the bottom: the best (worst) answer is the FIRST valid answer
    (lowest column index) with the maximal (minimal) score, a fixed rule; answers tied
    with it are never paired with it. A prompt whose valid answers all tie gets no pair.

    ``weighting``: ``"prompt"`` (default) gives each pair of a prompt the weight
    1/(number of pairs of that prompt), so each prompt's loss is the MEAN of its pairs'
    losses and a prompt with many answers does not dominate the batch; ``"pair"`` gives
    every pair weight 1 (each prompt's loss is the SUM of its pairs' losses; divide the
    batch sum by the total number of pairs for a per-pair mean).

    The weights are plain tensors without gradient. Feed the pairs to any pairwise loss
    with :func:`gather_pairs` and :func:`compute_loss`, then :func:`reduce_pairs`.
    """
    _check_k(scores, valid)
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown pairing {pairing!r}; expected one of {', '.join(PAIRINGS)}")
    if weighting not in PAIR_WEIGHTINGS:
        raise ConfigError(f"unknown pair weighting {weighting!r}; expected one of {', '.join(PAIR_WEIGHTINGS)}")
    scores = scores.detach()
    m = _pair_matrix(scores, valid, pairing)
    prompt, chosen, rejected = m.nonzero(as_tuple=True)
    num_pairs = m.sum(dim=(1, 2))
    if weighting == "prompt":
        weight = 1.0 / num_pairs[prompt].to(torch.float32)
    else:
        weight = torch.ones(prompt.shape[0], dtype=torch.float32, device=scores.device)
    return KPairs(chosen=chosen, rejected=rejected, prompt=prompt, weight=weight, num_pairs=num_pairs)


def gather_pairs(pairs: KPairs, logps: Tensor, tokens: Tensor | None = None) -> PairLogps:
    """The [P, Kmax] log-probs (and token counts, default 1) of the derived pairs, as a
    :class:`PairLogps` of N pairs (differentiable in ``logps``)."""
    if tokens is None:
        tokens = torch.ones_like(logps)
    tokens = tokens.to(logps.dtype)
    return PairLogps(chosen=logps[pairs.prompt, pairs.chosen], rejected=logps[pairs.prompt, pairs.rejected],
                     chosen_tokens=tokens[pairs.prompt, pairs.chosen],
                     rejected_tokens=tokens[pairs.prompt, pairs.rejected])


def reduce_pairs(pair_losses: Tensor, pairs: KPairs, num_prompts: int) -> Tensor:
    """Per-prompt loss [num_prompts]: ``L_p = Σ_{n: prompt_n = p} weight_n · loss_n``
    (0 for a prompt without pairs). Differentiable in ``pair_losses``."""
    if pair_losses.shape != pairs.prompt.shape:
        raise ValueError(f"{pair_losses.shape[0] if pair_losses.dim() else 0} pair losses for "
                         f"{pairs.prompt.shape[0]} pairs")
    out = pair_losses.new_zeros(num_prompts)
    return out.index_add(0, pairs.prompt, pair_losses * pairs.weight.to(pair_losses.dtype))


def _k_ref(pol: Tensor, ref: Tensor | None, params: LossParams) -> Tensor:
    """Reference log-probs: zeros for reference-free (``ref`` None or
    ``params.reference_free``)."""
    if ref is None or params.reference_free:
        return torch.zeros_like(pol)
    return ref


def k_rewards(pol: Tensor, ref: Tensor | None, valid: Tensor, beta: float) -> Tensor:
    """Implicit rewards ``β·(log πθ − log πref)`` [P, Kmax] (``β·log πθ`` when ``ref`` is
    None), 0 at padded entries; differentiable (detach for metrics)."""
    delta = pol if ref is None else pol - ref
    return torch.where(valid, beta * delta, torch.zeros_like(delta))


def kendall_tau_b(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """Kendall's τ-b between ``x`` and ``y`` over the valid entries of each row, [P].

    ``τ_b = Σ_{i<j} sgn(x_i−x_j)·sgn(y_i−y_j) / sqrt(n_x · n_y)`` with n_x (n_y) the
    number of pairs i<j NOT tied in x (in y): τ-b, which corrects for ties in either
    variable (τ-b = 1 for the same ordering, −1 for the reversed one, also with ties
    that appear in both). Where n_x or n_y is 0 (all of a row's x, or y, tied, or fewer
    than two valid entries) τ-b is undefined and 0 is returned.
    """
    _check_k(y, valid, x=x)
    x, y = x.detach(), y.detach()
    both = valid[:, :, None] & valid[:, None, :]
    sx = torch.sign(x[:, :, None] - x[:, None, :]).masked_fill(~both, 0.0)
    sy = torch.sign(y[:, :, None] - y[:, None, :]).masked_fill(~both, 0.0)
    # Ordered pairs count each unordered pair twice in numerator and both counts alike.
    num = (sx * sy).sum(dim=(1, 2))
    den = torch.sqrt(sx.abs().sum(dim=(1, 2)) * sy.abs().sum(dim=(1, 2)))
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum()
    total = torch.where(mask, x, torch.zeros_like(x)).sum()
    return total / n.clamp(min=1).to(x.dtype)


def k_reward_metrics(rewards: Tensor, scores: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Detached 0-dim reward metrics for K answers per prompt.

    Averaged over the prompts whose valid scores are not all tied (the only ones that say
    anything about ranking; 0 when there are none):

    * ``rewards/best`` / ``rewards/worst``: the reward of the best (worst) scored answer;
      when several answers tie for best (worst), the mean of their rewards;
    * ``rewards/margin``: best − worst, as above;
    * ``rewards/kendall_tau``: Kendall's τ-b between rewards and scores
      (:func:`kendall_tau_b`; 0 for a prompt whose rewards all tie, e.g. at step 0 when
      policy = reference);
    * ``rewards/pair_accuracy``: per prompt, the fraction of strictly ordered answer
      pairs (score_i > score_j) with reward_i > reward_j strictly, then averaged.
    """
    _check_k(scores, valid, rewards=rewards)
    rewards, scores = rewards.detach().float(), scores.detach()
    hi = scores.masked_fill(~valid, -math.inf).max(dim=1).values
    lo = scores.masked_fill(~valid, math.inf).min(dim=1).values
    informative = valid.any(dim=1) & (hi > lo)

    def tied_mean(target: Tensor) -> Tensor:
        sel = valid & (scores == target[:, None])
        return (torch.where(sel, rewards, torch.zeros_like(rewards)).sum(dim=1)
                / sel.sum(dim=1).clamp(min=1).to(rewards.dtype))

    best, worst = tied_mean(hi), tied_mean(lo)
    strict = _pair_matrix(scores, valid, "all")
    correct = (strict & (rewards[:, :, None] > rewards[:, None, :])).sum(dim=(1, 2))
    accuracy = correct.to(rewards.dtype) / strict.sum(dim=(1, 2)).clamp(min=1).to(rewards.dtype)
    tau = kendall_tau_b(rewards, scores, valid)
    return {
        "rewards/best": _masked_mean(best, informative),
        "rewards/worst": _masked_mean(worst, informative),
        "rewards/margin": _masked_mean(best - worst, informative),
        "rewards/kendall_tau": _masked_mean(tau, informative),
        "rewards/pair_accuracy": _masked_mean(accuracy, informative),
    }


def k_pair_loss(pol: Tensor, ref: Tensor | None, scores: Tensor, valid: Tensor, params: LossParams,
                pairing: str = "all", loss_types: tuple[str, ...] | list[str] = ("sigmoid",),
                loss_weights: list[float] | None = None, tokens: Tensor | None = None,
                weighting: str = "prompt") -> KLossOutput:
    """Any pairwise loss (default DPO, ``sigmoid``) over the pairs derived from K answers.

    Pairs come from :func:`derive_pairs` (``pairing``, ``weighting``); each pair's loss is
    :func:`compute_loss` (``loss_types``, ``loss_weights``, ``params``; ``tokens`` [P, Kmax]
    are the completion token counts, default 1, needed by length-normalised losses), and
    the per-prompt loss is ``L_p = Σ_n w_n·loss_n`` (:func:`reduce_pairs`): by default the
    mean over the prompt's pairs. For DPO:
    ``L_p = (1/|S_p|)·Σ_{(i,j)∈S_p} −log σ(r_i − r_j)``, ``r = β(log πθ − log πref)``.

    ``ref`` None means reference-free (reference log-probs 0), as does
    ``params.reference_free``. ``aot``/``aot_unpaired`` (per-quantile, not per-pair
    values) and ``kto`` (unpaired) are refused. ``rewards`` follow the first loss's rule
    (module docstring): ``β·(pol − ref)`` for reference losses, ``β·pol/tokens`` for
    ``simpo``/``orpo``/``cpo``/``sft``. With K = 2 and distinct scores this is exactly
    the pairwise loss on that pair.
    """
    _check_k(scores, valid, pol=pol, ref=ref, tokens=tokens)
    loss_types = list(loss_types)
    bad = [n for n in loss_types if n in _NOT_PER_PAIR or (n in LOSSES and not LOSSES[n].paired)]
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot be reduced per prompt (per-quantile or unpaired values)")
    pairs = derive_pairs(scores, valid, pairing, weighting)
    tok = torch.ones_like(pol) if tokens is None else tokens.to(pol.dtype)
    ref_eff = _k_ref(pol, ref, params)
    run_params = params if ref is not None else replace(params, reference_free=True)
    pair_ref = gather_pairs(pairs, ref_eff, tok) if ref is not None else None
    out = compute_loss(loss_types, loss_weights, gather_pairs(pairs, pol, tok), pair_ref, run_params)
    losses = reduce_pairs(out.losses, pairs, scores.shape[0])
    if LOSSES[loss_types[0]].needs_reference:
        rewards = k_rewards(pol, ref_eff, valid, params.beta)
    else:
        rewards = k_rewards(_avg(pol, tok), None, valid, params.beta)
    rewards = rewards.detach()
    metrics = dict(out.metrics)
    metrics.update(k_reward_metrics(rewards, scores, valid))
    return KLossOutput(losses=losses, has_loss=pairs.num_pairs > 0, rewards=rewards, metrics=metrics,
                       pairs=pairs, pair_losses=out.losses)


def plackett_luce_loss(pol: Tensor, ref: Tensor | None, scores: Tensor, valid: Tensor,
                       params: LossParams, normalize: bool = False) -> KLossOutput:
    """Listwise DPO under the Plackett–Luce model (DPO, arXiv 2305.18290, Appendix A.3).

    With ``r_k = β(log πθ(y_k|x) − log πref(y_k|x))`` and τ the ranking of the prompt's
    valid answers by score (best first), the per-prompt loss is the negative
    log-likelihood of the ranking:
    ``L = −Σ_{k=1..K} [ r_{τ(k)} − log Σ_{j≥k} exp r_{τ(j)} ]`` (the last term is 0).

    Ties (Breslow's convention, as in Cox partial likelihood): each answer i contributes
    ``log Σ_{j: s_j ≤ s_i} exp r_j − r_i``, its "risk set" holding every valid answer
    scored no higher, INCLUDING all answers tied with it. Without ties this is exactly
    the formula above; with ties it is invariant to the order of tied answers (a fixed
    tie-break would push tied answers apart in an arbitrary direction), it needs no sort,
    and it stays a proper likelihood (the one in which each tied answer is drawn from the
    full tied set). Its price: a tie group of size m keeps a floor of about m·log m
    (the loss no longer reaches 0), and tied answers are pulled towards equal rewards;
    a prompt whose answers all tie still contributes (towards equal rewards). Use
    :func:`k_pair_loss` if ties should carry no signal. Efron's correction would be
    closer to the exact tied likelihood but is not implemented.

    When to choose it: K answers per prompt with a full ranking or scores (a reward model's,
    or ratings like UltraFeedback's) that you trust beyond "which is best": the listwise
    likelihood uses the whole order in one term per answer. With noisy scores, pairwise DPO
    over best-vs-worst (:func:`k_pair_loss`) is the more robust choice.

    ``normalize`` divides each prompt's loss by (number of valid answers − 1), the number
    of non-trivial terms, so prompts with many answers do not dominate; the default is
    the paper's sum. With K = 2 either way it is ``−log σ(r_w − r_l)``, DPO. ``ref`` None
    (or ``params.reference_free``) means reference-free. ``has_loss``: ≥ 2 valid answers.
    """
    _check_k(scores, valid, pol=pol, ref=ref)
    ref_eff = _k_ref(pol, ref, params)
    r = k_rewards(pol, ref_eff, valid, params.beta)                     # [P, K], 0 at padding
    s = scores.detach()
    K = s.shape[1]
    eye = torch.eye(K, dtype=torch.bool, device=s.device)
    # risk[p, i, j]: j is in i's risk set. The diagonal is always kept, so even a padded
    # row has one finite entry and logsumexp's gradient stays finite.
    risk = (valid[:, :, None] & valid[:, None, :] & (s[:, None, :] <= s[:, :, None])) | eye
    lse = torch.logsumexp(r[:, None, :].expand(-1, K, -1).masked_fill(~risk, -math.inf), dim=2)
    terms = torch.where(valid, lse - r, torch.zeros_like(r))
    losses = terms.sum(dim=1)
    n_valid = valid.sum(dim=1)
    if normalize:
        losses = losses / (n_valid - 1).clamp(min=1).to(losses.dtype)
    rewards = r.detach()
    return KLossOutput(losses=losses, has_loss=n_valid >= 2, rewards=rewards,
                       metrics=k_reward_metrics(rewards, scores, valid))


# Listwise: scores K answers at once, so it is called through plackett_luce_loss (paired=False).
LOSSES["plackett_luce"] = LossSpec(plackett_luce_loss, True, "2305.18290", frozenset({"beta"}),
                                   "listwise DPO over K ranked answers (Plackett-Luce, DPO paper A.3)",
                                   paired=False)
