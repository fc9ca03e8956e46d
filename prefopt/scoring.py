"""Score a preference file with a policy and a reference, without training (`prefopt eval`)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from prefopt.config import TrainConfig, validate
from prefopt.errors import ConfigError
from prefopt.inputs import prepare_examples
from prefopt.logprobs import completion_logps
from prefopt.losses import LossParams, PairLogps, compute_loss, needs_reference
from prefopt.modeling import load_causal_lm, load_tokenizer
from prefopt.fastpath import requested_features
from prefopt.train import (ranked_losses, announce, batches, check_ranked, effective_logps, loss_params,
                           settle_fast_paths)

log = logging.getLogger("prefopt")


@torch.no_grad()
def sequence_table(model, examples, cfg: TrainConfig, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, token counts), each [num_examples, num_completions], in example order.

    ``cfg`` carries the fast paths proven for ``model`` (:func:`prefopt.train.settle_fast_paths`)."""
    model.eval()
    n_comp = len(examples[0].completions)
    logps = torch.zeros(len(examples), n_comp)
    tokens = torch.zeros(len(examples), n_comp)
    device = next(model.parameters()).device
    size = cfg.eval_batch_size or cfg.batch_size
    for batch in batches(examples, list(range(len(examples))), size, pad_id, cfg, device):
        batch = batch.to(device)
        seq = completion_logps(model, batch, chunk_size=cfg.lm_head_chunk_size, full_head=cfg.full_lm_head)
        idx = batch.example_index.cpu()
        logps[idx] = effective_logps(seq, batch, cfg, n_comp).float().cpu().view(-1, n_comp)
        tokens[idx] = seq.tokens.cpu().view(-1, n_comp)
    return logps, tokens


def score_file(cfg: TrainConfig) -> dict[str, Any]:
    """Loss, reward metrics and per-example log-probs of ``cfg.data`` under policy and reference."""
    validate(cfg)
    if not cfg.model:
        raise ConfigError("--model is required: a local model directory or a hub name")
    tokenizer = load_tokenizer(cfg.tokenizer_path, trust_remote_code=cfg.trust_remote_code,
                               chat_template=cfg.chat_template)
    cfg.eval_fraction = 0.0
    cfg.eval_data = None
    data = prepare_examples(cfg, tokenizer, "pairs", None)
    examples = data.train
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def table(name: str, role: str):
        """Load ``name``, prove the fast paths on it (no gradients), score every example."""
        model = load_causal_lm(name, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation,
                               block_attention=cfg.block_attention,
                               trust_remote_code=cfg.trust_remote_code).to(device)
        model_cfg, fast = settle_fast_paths(cfg, model, data, tokenizer.pad_token_id, device=device,
                                            requested=requested_features(cfg), with_grad=False, split=False)
        log.info("%s %s", role, announce(fast))
        return sequence_table(model, examples, model_cfg, tokenizer.pad_token_id)

    pol, tok = table(cfg.model, "policy")
    ref = None
    if needs_reference(cfg.loss_type, cfg.reference_free):
        ref, _ = table(cfg.ref_model or cfg.model, "reference")
    params: LossParams = loss_params(cfg)
    ranked = examples[0].scores is not None
    if ranked:  # K answers: the training loss over the derived pairs (or Plackett-Luce); chosen = best, rejected = worst
        check_ranked(cfg, data)
        scores = torch.tensor([ex.scores for ex in examples], dtype=torch.float32)
        _, out, best_worst = ranked_losses(pol, ref, tok, scores, cfg, params)
        chosen_logps, rejected_logps = best_worst.chosen, best_worst.rejected
    else:
        policy_pairs = PairLogps(pol[:, 0], pol[:, 1], tok[:, 0], tok[:, 1])
        ref_pairs = PairLogps(ref[:, 0], ref[:, 1], tok[:, 0], tok[:, 1]) if ref is not None else None
        out = compute_loss(cfg.loss_type, cfg.loss_weights, policy_pairs, ref_pairs, params)
        chosen_logps, rejected_logps = pol[:, 0], pol[:, 1]
    margins = out.chosen_rewards - out.rejected_rewards
    result: dict[str, Any] = {
        "data": cfg.data,
        "summary": data.summary,
        "loss": out.losses.mean().item(),
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        "rewards/margins": margins.mean().item(),
        "rewards/accuracies": (margins > 0).float().mean().item(),
        "logps/chosen": chosen_logps.mean().item(),
        "logps/rejected": rejected_logps.mean().item(),
        **{k: v.item() for k, v in out.metrics.items()},
        "per_example": [],
    }
    for i, ex in enumerate(examples):
        if ranked:
            real = [k for k, v in enumerate(ex.scores) if v == v]   # NaN marks a filler completion
            row = {"line": ex.line, "scores": [ex.scores[k] for k in real], "policy_logps": pol[i, real].tolist()}
            if ref is not None:
                row["ref_logps"] = ref[i, real].tolist()
        else:
            row = {"line": ex.line, "policy_chosen_logps": pol[i, 0].item(), "policy_rejected_logps": pol[i, 1].item()}
            if ref is not None:
                row.update(ref_chosen_logps=ref[i, 0].item(), ref_rejected_logps=ref[i, 1].item())
        row["loss"] = out.losses[i].item()
        result["per_example"].append(row)
    return result
