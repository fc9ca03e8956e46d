"""Sampling completions from a causal LM, and what the samples tell about a policy.

Two jobs of the DPO pipeline need generations (the DPO paper, sections 4 and 6):

* **Making preference data** (`prefopt sample`): draw ``y1, y2, ... ~ pi(.|x)`` from the
  SFT model for each prompt and have a judge score them (see :mod:`prefopt.judges`).
* **Evaluating a trained policy** (`prefopt eval --generate`): sample from the policy and
  from the reference on held-out prompts, compare the judge's rewards, and estimate the
  sequence-level KL divergence the policy paid for them.

Generation is batched with left padding and an attention mask, so every prompt of a
batch ends at the same column and the model's positions (computed by ``generate`` from
the mask) start at 0 for each prompt. Only the new tokens are decoded. A sample keeps
its token ids up to and including the first EOS; whatever ``generate`` put after it
(padding) is not part of the sample.

The KL estimate. For samples ``y_i ~ pi_theta(.|x)``,
``KL(pi_theta || pi_ref) = E_y[log pi_theta(y|x) - log pi_ref(y|x)]``, so the mean of
the per-sample log-ratios is an unbiased Monte-Carlo estimate whose standard error is
their standard deviation over ``sqrt(n)``. Both log-probs are computed by
:func:`prefopt.logprobs.completion_logps` on the sampled token ids (EOS included), with
the prompt shared by all samples of that prompt. The estimate is of the KL between the
models' own distributions only when sampling is plain (``temperature=1``, ``top_p=1``);
otherwise the samples come from a reshaped distribution and the number is reported with
a note saying so.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefopt.data.formats import best_and_worst
from prefopt.errors import ConfigError, DataError

log = logging.getLogger("prefopt")

Prompt = Any  # a string, or a list of {"role", "content"} messages


@dataclass
class GenerationSettings:
    """How to sample: ``num_samples`` completions of at most ``max_new_tokens`` per prompt."""

    num_samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16              # sequences per generate() call and per log-prob batch
    max_prompt_length: int | None = 512

    def validate(self) -> None:
        def need(cond: bool, flag: str, message: str) -> None:
            if not cond:
                raise ConfigError(f"--{flag}: {message}")

        need(self.num_samples >= 1, "num-samples", f"must be >= 1, got {self.num_samples}")
        need(self.max_new_tokens >= 1, "max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")
        need(self.temperature >= 0 and math.isfinite(self.temperature), "temperature",
             f"must be >= 0 (0 = greedy), got {self.temperature}")
        need(0 < self.top_p <= 1, "top-p", f"must be in (0, 1], got {self.top_p}")
        need(self.batch_size >= 1, "batch-size", f"must be >= 1, got {self.batch_size}")
        need(self.max_prompt_length is None or self.max_prompt_length >= 1, "max-prompt-length",
             f"must be >= 1, got {self.max_prompt_length}")

    @property
    def plain(self) -> bool:
        """True when samples come from the model's own distribution (no temperature, no nucleus)."""
        return self.temperature == 1.0 and self.top_p == 1.0


@dataclass
class Sample:
    """One sampled completion."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]   # the new tokens, up to and including the first EOS
    text: str              # decoded new tokens, special tokens removed
    finished: bool         # True when it ended with EOS (False: cut at max_new_tokens)


# ---------------------------------------------------------------------------- prompts


def load_prompts(source: str, *, prompt_field: str = "prompt", unique: bool = False) -> list[Prompt]:
    """Prompts from a file: ``.txt`` (one per line) or anything :func:`prefopt.data.load_rows` reads.

    Rows use ``prompt_field`` when they have it; otherwise the prompt is found the way
    training finds it (implicit-prompt pairs, chat ``messages`` rows). ``unique`` drops
    repeated prompts (preference files often hold several pairs per prompt).
    """
    from prefopt.data import Fields, detect_format, load_rows, to_sft

    path = Path(source).expanduser()
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError("file not found", source=source)
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read prompts: {e}", source=source) from None
        prompts: list[Prompt] = [line for line in lines if line.strip()]
    else:
        rows = load_rows(source)
        if all(prompt_field in r.data for r in rows):
            prompts = []
            for r in rows:
                value = r.data[prompt_field]
                if not (isinstance(value, str) and value.strip()) and not (isinstance(value, list) and value):
                    raise DataError("the prompt is empty or not text / a message list", source=r.source,
                                    line=r.line, field=prompt_field)
                prompts.append(value)
        else:
            fields = Fields(prompt=prompt_field)
            prompts = [ex.prompt for ex in to_sft(rows, detect_format(rows, fields=fields), fields)]
    if not prompts:
        raise DataError("holds no prompts", source=source)
    if unique:
        seen, kept = set(), []
        for p in prompts:
            key = json.dumps(p, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(p)
        prompts = kept
    return prompts


def encode_prompts(tokenizer, prompts: list[Prompt], max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt as training sees them: BOS once, chat template for conversations.

    A prompt longer than ``max_prompt_length`` keeps its end (behind its BOS).
    """
    from prefopt.data import SpecialTokens

    specials = SpecialTokens.of(tokenizer)
    out = []
    for p in prompts:
        if isinstance(p, list):
            if not getattr(tokenizer, "chat_template", None):
                raise ConfigError("the prompts are conversations but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        else:
            text = p
        has_bos = specials.bos_text is not None and text.startswith(specials.bos_text)
        ids = list(tokenizer(text, add_special_tokens=not has_bos)["input_ids"])
        n = len(specials.suffix)
        if not has_bos and n and tuple(ids[-n:]) == specials.suffix:
            ids = ids[:-n]
        if not ids:
            raise DataError(f"prompt {p!r} encodes to no tokens, so there is nothing to continue from")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if specials.bos_id is not None and ids[0] == specials.bos_id:
                ids = ids[:1] + ids[len(ids) - max_prompt_length + 1:]
            else:
                ids = ids[-max_prompt_length:]
        out.append(ids)
    return out


def prompt_text(prompt: Prompt) -> str:
    """A one-line rendering of a prompt for tables and judges that take plain text."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
    return prompt


# ---------------------------------------------------------------------------- sampling


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's own stop tokens."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    if not ids:
        raise ConfigError("the tokenizer has no EOS token, so generated completions could never end")
    return ids


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def decode_completion(tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> str:
    """The text the completion adds to the prompt (decoded together, so word-initial spaces survive)."""
    kw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    head = tokenizer.decode(prompt_ids, **kw)
    full = tokenizer.decode(prompt_ids + completion_ids, **kw)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(completion_ids, **kw)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings) -> list[list[Sample]]:
    """``settings.num_samples`` completions of every prompt; ``result[i][k]`` is sample k of prompt i.

    Sampling is reproducible for a given seed, batch size and device, and leaves the
    global random state as it was.
    """
    from transformers import GenerationConfig

    settings.validate()
    stops = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = _device_of(model)
    sampling = settings.temperature > 0
    # A clean config: nothing from the model's generation_config.json (repetition penalties,
    # top-k defaults) may reshape the distribution we sample from.
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=sampling, num_beams=1,
        temperature=settings.temperature if sampling else None, top_p=settings.top_p if sampling else None,
        top_k=0 if sampling else None, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        typical_p=1.0, pad_token_id=pad_id, eos_token_id=stops, bos_token_id=tokenizer.bos_token_id,
    )
    saved_config = model.generation_config
    model.generation_config = config
    was_training = model.training
    model.eval()
    jobs = [(i, k) for i in range(len(prompt_ids)) for k in range(settings.num_samples)]
    # Similar lengths together: less left padding. The order depends only on the prompts.
    jobs.sort(key=lambda job: (len(prompt_ids[job[0]]), job[0], job[1]))
    results: list[list[Sample | None]] = [[None] * settings.num_samples for _ in prompt_ids]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            for start in range(0, len(jobs), settings.batch_size):
                chunk = jobs[start:start + settings.batch_size]
                width = max(len(prompt_ids[i]) for i, _ in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (i, _) in enumerate(chunk):
                    ids = prompt_ids[i]
                    input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                    mask[row, width - len(ids):] = 1
                out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)
                new = out[:, width:].tolist()
                for row, (i, k) in enumerate(chunk):
                    ids = new[row]
                    end = next((t for t, tok in enumerate(ids) if tok in stops), None)
                    finished = end is not None
                    ids = ids[:end + 1] if finished else ids
                    results[i][k] = Sample(i, k, ids, decode_completion(tokenizer, prompt_ids[i], ids), finished)
    finally:
        model.generation_config = saved_config
        model.train(was_training)
    return results  # type: ignore[return-value]


@torch.no_grad()
def sample_logps(model, prompt_ids: list[list[int]], samples: list[list[Sample]], *, batch_size: int = 16,
                 pad_token_id: int = 0, chunk_size: int = 1024) -> torch.Tensor:
    """``log pi(y|x)`` of every sample, ``[num_prompts, num_samples]`` float32.

    Each prompt and its samples form one prefix-shared segment ``[x | y_1 | ... | y_K]``
    (see :mod:`prefopt.batching`), so the prompt is computed once for all its samples.
    Every sampled token counts, EOS included; nothing after it was ever part of a sample. The layout
    is proven on the model first (:func:`prefopt.fastpath.decide`, log-probs only).
    """
    from prefopt.batching import collate
    from prefopt.data import TokenizedExample
    from prefopt.fastpath import ORDER, check_rows, decide
    from prefopt.logprobs import completion_logps

    if not samples:
        return torch.zeros(0, 0)
    k = len(samples[0])
    examples = [TokenizedExample(prompt_ids=list(p), completions=[s.token_ids for s in row], index=i, line=i + 1)
                for i, (p, row) in enumerate(zip(prompt_ids, samples))]
    was_training = model.training
    model.eval()
    device = _device_of(model)
    out = torch.zeros(len(examples), k)
    per_batch = max(1, batch_size // k)
    fast = decide(model, check_rows(examples), dict.fromkeys(ORDER, True), pad_id=pad_token_id, with_grad=False,
                  split=False, chunk_size=chunk_size, device=device, dtype=next(model.parameters()).dtype)
    try:
        for start in range(0, len(examples), per_batch):
            batch = collate(examples[start:start + per_batch], pad_token_id=pad_token_id,
                            prefix_sharing=fast.features["prefix_sharing"], packing=fast.features["packing"],
                            plain=not fast.features["masks"]).to(device)
            seq = completion_logps(model, batch, chunk_size=chunk_size, full_head=not fast.features["fused_head"])
            out[batch.example_index.cpu()] = seq.logps.float().cpu().view(-1, k)
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------- statistics


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation over sqrt(n); 0 for one value)."""
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = x.numel()
    if n == 0:
        return float("nan"), float("nan")
    mean = x.mean().item()
    if n == 1:
        return mean, 0.0
    return mean, (x.std(unbiased=True) / math.sqrt(n)).item()


def win_rates(policy_rewards: torch.Tensor, ref_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair outcome of policy sample vs reference sample: 1 win, 0.5 tie, 0 loss."""
    return (policy_rewards > ref_rewards).double() + 0.5 * (policy_rewards == ref_rewards).double()


def summarize(policy_rewards: torch.Tensor, ref_rewards: torch.Tensor | None, log_ratios: torch.Tensor | None,
              policy_tokens: torch.Tensor, ref_tokens: torch.Tensor | None = None) -> dict[str, float]:
    """The headline numbers of a generation evaluation (all tensors ``[num_prompts, num_samples]``)."""
    out: dict[str, float] = {}
    out["policy_reward_mean"], out["policy_reward_stderr"] = mean_and_stderr(policy_rewards)
    if ref_rewards is not None:
        out["ref_reward_mean"], out["ref_reward_stderr"] = mean_and_stderr(ref_rewards)
        out["win_rate"], out["win_rate_stderr"] = mean_and_stderr(win_rates(policy_rewards, ref_rewards))
    if log_ratios is not None:
        out["kl"], out["kl_stderr"] = mean_and_stderr(log_ratios)
    out["policy_mean_tokens"] = policy_tokens.double().mean().item()
    if ref_tokens is not None:
        out["ref_mean_tokens"] = ref_tokens.double().mean().item()
    return out


def _lengths(samples: list[list[Sample]]) -> torch.Tensor:
    return torch.tensor([[len(s.token_ids) for s in row] for row in samples], dtype=torch.float64)


def _texts(samples: list[list[Sample]]) -> list[str]:
    return [s.text for row in samples for s in row]


def score_samples(judge, prompts: list[Prompt], samples: list[list[Sample]]) -> torch.Tensor:
    """The judge's reward of every sample, ``[num_prompts, num_samples]`` float64."""
    from prefopt.judges import judge_scores

    k = len(samples[0]) if samples else 0
    flat_prompts = [prompts[s.prompt_index] for row in samples for s in row]
    scores = judge_scores(judge, flat_prompts, _texts(samples))
    return torch.tensor(scores, dtype=torch.float64).view(len(samples), k)


# ---------------------------------------------------------------------------- preference pairs

PAIRINGS = ("best-worst", "all", "bradley-terry")


def _usable_samples(row: list[Sample], row_scores: list[float], keep_truncated: bool,
                    skipped: dict[str, int]) -> tuple[list[Sample], list[float]]:
    """The samples of one prompt that may enter preference data, with their scores.

    Cut samples (``finished`` False) go unless ``keep_truncated``, then empty ones; each
    removal is counted in ``skipped`` (``truncated_samples``, ``empty_samples``).
    """
    whole = [k for k, smp in enumerate(row) if keep_truncated or smp.finished]
    skipped["truncated_samples"] += len(row) - len(whole)
    keep = [k for k in whole if row[k].text.strip()]
    skipped["empty_samples"] += len(whole) - len(keep)
    return [row[k] for k in keep], [row_scores[k] for k in keep]


def make_pairs(prompts: list[Prompt], samples: list[list[Sample]], scores: torch.Tensor, pairing: str = "best-worst",
               *, seed: int = 0, bt_scale: float = 1.0, keep_truncated: bool = True,
               ) -> tuple[list[dict], dict[str, int]]:
    """Preference rows from judged samples, and counts of what was skipped.

    * ``best-worst``: per prompt, the highest-scored sample over the lowest-scored one.
    * ``all``: every two samples of a prompt with different scores, the higher one chosen.
    * ``bradley-terry``: samples paired in order (1 with 2, 3 with 4, ...) and the label
      drawn at random with ``P(y1 > y2) = sigmoid(bt_scale * (s1 - s2))``, the preference
      model DPO assumes; equal scores give a coin flip.

    Pairs of identical texts carry no preference and are skipped, as are score ties in
    the deterministic modes. Empty completions (EOS sampled first) are left out: a
    preference row needs text on both sides. Unless ``keep_truncated``, so are samples
    cut at ``max_new_tokens`` (``finished`` False): training appends EOS to every
    completion, so a cut sample would teach the model to stop mid-sentence. A prompt
    left with fewer than 2 usable samples yields no pair (``too_few_samples``). Rows
    keep both scores (``chosen_score``, ``rejected_score``).
    """
    import random

    if pairing not in PAIRINGS:
        raise ConfigError(f"--pairing: must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    rng = random.Random(seed)
    rows: list[dict] = []
    skipped = {"identical": 0, "tied": 0, "truncated_samples": 0, "empty_samples": 0, "too_few_samples": 0}

    def emit(i: int, win: Sample, lose: Sample, s_win: float, s_lose: float, **extra) -> None:
        rows.append({"prompt": prompts[i], "chosen": win.text, "rejected": lose.text, "chosen_score": s_win,
                     "rejected_score": s_lose, "prompt_index": i, **extra})

    for i, full_row in enumerate(samples):
        row, s = _usable_samples(full_row, scores[i].tolist(), keep_truncated, skipped)
        if len(row) < 2:
            skipped["too_few_samples"] += 1
            continue
        if pairing == "best-worst":
            hi, lo = best_and_worst(s)
            if s[hi] == s[lo]:
                skipped["tied"] += 1
            elif row[hi].text == row[lo].text:
                skipped["identical"] += 1
            else:
                emit(i, row[hi], row[lo], s[hi], s[lo])
        elif pairing == "all":
            for a in range(len(row)):
                for b in range(a + 1, len(row)):
                    if s[a] == s[b]:
                        skipped["tied"] += 1
                    elif row[a].text == row[b].text:
                        skipped["identical"] += 1
                    elif s[a] > s[b]:
                        emit(i, row[a], row[b], s[a], s[b])
                    else:
                        emit(i, row[b], row[a], s[b], s[a])
        else:
            for a in range(0, len(row) - 1, 2):
                b = a + 1
                if row[a].text == row[b].text:
                    skipped["identical"] += 1
                    continue
                p_a = 1.0 / (1.0 + math.exp(-bt_scale * (s[a] - s[b])))
                if rng.random() < p_a:
                    emit(i, row[a], row[b], s[a], s[b], p_chosen=p_a)
                else:
                    emit(i, row[b], row[a], s[b], s[a], p_chosen=1.0 - p_a)
    return rows, skipped


def make_ranked(prompts: list[Prompt], samples: list[list[Sample]], scores: torch.Tensor, *,
                keep_truncated: bool = True) -> tuple[list[dict], dict[str, int]]:
    """K-answer rows ``{"prompt", "completions", "scores"}`` from judged samples, one per prompt.

    The same samples are usable as in :func:`make_pairs` (no empty ones; no cut ones unless
    ``keep_truncated``). A text sampled twice is kept once, with its first score: training
    would otherwise compare an answer with itself. A prompt left with fewer than two
    answers (``too_few_samples``) or whose answers all score the same (``tied``: no pair
    of them carries a preference) yields no row. Rows also carry ``prompt_index`` and
    ``finished`` (one flag per answer), which the trainer ignores.
    """
    rows: list[dict] = []
    skipped = {"duplicate_samples": 0, "tied": 0, "truncated_samples": 0, "empty_samples": 0, "too_few_samples": 0}
    for i, full_row in enumerate(samples):
        usable, usable_scores = _usable_samples(full_row, scores[i].tolist(), keep_truncated, skipped)
        seen: set[str] = set()
        kept: list[tuple[Sample, float]] = []
        for smp, score in zip(usable, usable_scores):
            if smp.text in seen:
                skipped["duplicate_samples"] += 1
                continue
            seen.add(smp.text)
            kept.append((smp, score))
        if len(kept) < 2:
            skipped["too_few_samples"] += 1
            continue
        if len({score for _, score in kept}) == 1:
            skipped["tied"] += 1
            continue
        rows.append({"prompt": prompts[i], "completions": [smp.text for smp, _ in kept],
                     "scores": [score for _, score in kept], "prompt_index": i,
                     "finished": [smp.finished for smp, _ in kept]})
    return rows, skipped


OUTPUT_FORMATS = ("pairs", "ranked")


def judged_samples(*, model: str, prompts: list[Prompt], judge: str, settings: GenerationSettings,
                   tokenizer: str | None = None, dtype: str = "float32", attn_implementation: str = "sdpa",
                   trust_remote_code: bool = False, judge_batch_size: int = 16,
                   ) -> tuple[list[list[Sample]], torch.Tensor]:
    """``settings.num_samples`` samples of every prompt from ``model``, and the judge's score of each.

    The judge is loaded first, so a bad ``--judge`` fails before any generation; the policy
    is freed before scoring, so a reward model does not share memory with it for long.
    """
    from prefopt.judges import load_judge
    from prefopt.modeling import load_causal_lm, load_tokenizer

    settings.validate()
    device = default_device()
    scorer = load_judge(judge, device=device, batch_size=judge_batch_size, dtype=dtype,
                        trust_remote_code=trust_remote_code)
    tok = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
    prompt_ids = encode_prompts(tok, prompts, settings.max_prompt_length)
    policy = load_causal_lm(model, dtype=dtype, attn_implementation=attn_implementation,
                            trust_remote_code=trust_remote_code).to(device)
    samples = generate(policy, tok, prompt_ids, settings)
    del policy
    return samples, score_samples(scorer, prompts, samples)


def sampling_summary(samples: list[list[Sample]], scores: torch.Tensor, rows: list[dict], skipped: dict[str, int],
                     *, keep_truncated: bool, output_format: str) -> dict[str, Any]:
    """What `prefopt sample` prints and `prefopt iterate` records about one round of judged samples."""
    mean, stderr = mean_and_stderr(scores)
    total = sum(len(r) for r in samples)
    finished = sum(s.finished for r in samples for s in r)
    summary: dict[str, Any] = {"prompts": len(samples), "samples": total, "output_format": output_format,
                               "rows": len(rows), "skipped": skipped, "score_mean": mean, "score_stderr": stderr,
                               "finished_fraction": finished / max(1, total), "truncated_samples": total - finished,
                               "keep_truncated": keep_truncated}
    if output_format == "pairs":
        summary["pairs"] = len(rows)
    return summary


def sample_pairs(*, model: str, prompts: list[Prompt], judge: str, settings: GenerationSettings,
                 pairing: str = "best-worst", bt_scale: float = 1.0, tokenizer: str | None = None,
                 dtype: str = "float32", attn_implementation: str = "sdpa", trust_remote_code: bool = False,
                 judge_batch_size: int = 16, keep_truncated: bool = False,
                 output_format: str = "pairs") -> tuple[list[dict], dict[str, Any]]:
    """`prefopt sample`: generate, judge, and write pairs or K-answer rows. Returns the rows and a summary.

    ``output_format="pairs"`` pairs the samples as ``pairing`` says (:func:`make_pairs`);
    ``"ranked"`` writes one row per prompt with all its usable samples and their scores
    (:func:`make_ranked`), which K-answer training turns into pairs or a ranking itself.
    Samples cut at ``settings.max_new_tokens`` are left out unless ``keep_truncated``;
    ``summary["truncated_samples"]`` counts them either way.
    """
    settings.validate()
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"--output-format: must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    if pairing not in PAIRINGS:
        raise ConfigError(f"--pairing: must be one of {', '.join(PAIRINGS)}, got {pairing!r}")
    if settings.num_samples < 2:
        raise ConfigError(f"--num-samples: a preference needs at least 2 samples per prompt, "
                          f"got {settings.num_samples}")
    samples, scores = judged_samples(model=model, prompts=prompts, judge=judge, settings=settings,
                                     tokenizer=tokenizer, dtype=dtype, attn_implementation=attn_implementation,
                                     trust_remote_code=trust_remote_code, judge_batch_size=judge_batch_size)
    if output_format == "ranked":
        rows, skipped = make_ranked(prompts, samples, scores, keep_truncated=keep_truncated)
    else:
        rows, skipped = make_pairs(prompts, samples, scores, pairing, seed=settings.seed, bt_scale=bt_scale,
                                   keep_truncated=keep_truncated)
    summary = sampling_summary(samples, scores, rows, skipped, keep_truncated=keep_truncated,
                               output_format=output_format)
    return rows, summary


# ---------------------------------------------------------------------------- eval --generate


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def generation_eval(*, model: str, ref_model: str, judge: str, prompts: list[Prompt], settings: GenerationSettings,
                    tokenizer: str | None = None, dtype: str = "float32", attn_implementation: str = "sdpa",
                    trust_remote_code: bool = False, chunk_size: int = 1024, judge_batch_size: int = 16,
                    keep_samples: int | None = None) -> dict[str, Any]:
    """Sample from policy and reference, judge both, and estimate KL(policy || reference).

    Models are loaded one at a time (policy, then reference, then the judge), so the
    peak memory is that of the largest, not of all three.
    """
    from prefopt.judges import check_judge, load_judge
    from prefopt.modeling import load_causal_lm, load_tokenizer

    settings.validate()
    if not ref_model:
        raise ConfigError("--ref-model is required with --generate: the policy is compared with its reference")
    check_judge(judge, trust_remote_code=trust_remote_code)  # a bad --judge fails before any generation
    tok = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
    prompt_ids = encode_prompts(tok, prompts, settings.max_prompt_length)
    device = default_device()

    def load(name: str):
        return load_causal_lm(name, dtype=dtype, attn_implementation=attn_implementation,
                              trust_remote_code=trust_remote_code).to(device)

    logp_kw = {"batch_size": settings.batch_size, "pad_token_id": tok.pad_token_id, "chunk_size": chunk_size}
    policy = load(model)
    policy_samples = generate(policy, tok, prompt_ids, settings)
    policy_logps = sample_logps(policy, prompt_ids, policy_samples, **logp_kw)
    del policy
    reference = load(ref_model)
    ref_samples = generate(reference, tok, prompt_ids, settings)
    ref_logps = sample_logps(reference, prompt_ids, policy_samples, **logp_kw)
    del reference
    scorer = load_judge(judge, device=device, batch_size=judge_batch_size, dtype=dtype,
                        trust_remote_code=trust_remote_code)
    policy_rewards = score_samples(scorer, prompts, policy_samples)
    ref_rewards = score_samples(scorer, prompts, ref_samples)
    del scorer
    log_ratios = (policy_logps - ref_logps).double()
    result: dict[str, Any] = {
        "mode": "generate",
        "policy": model,
        "reference": ref_model,
        "judge": judge,
        "num_prompts": len(prompts),
        "num_samples": settings.num_samples,
        "settings": {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                     "top_p": settings.top_p, "seed": settings.seed, "max_prompt_length": settings.max_prompt_length},
        **summarize(policy_rewards, ref_rewards, log_ratios, _lengths(policy_samples), _lengths(ref_samples)),
        "policy_finished_fraction": sum(s.finished for row in policy_samples for s in row) / max(
            1, len(prompts) * settings.num_samples),
    }
    result["reward"] = result["policy_reward_mean"]
    if not settings.plain:
        result["kl_note"] = ("samples were drawn with temperature/top-p reshaping, so 'kl' is the mean log-ratio "
                             "under that reshaped distribution, not KL(policy || reference) itself")
    rows = []
    for i, p in enumerate(prompts):
        for k in range(settings.num_samples):
            rows.append({"prompt_index": i, "sample": k, "prompt": p,
                         "policy": policy_samples[i][k].text, "reference": ref_samples[i][k].text,
                         "policy_reward": policy_rewards[i, k].item(), "ref_reward": ref_rewards[i, k].item(),
                         "policy_logp": policy_logps[i, k].item(), "ref_logp_of_policy_sample": ref_logps[i, k].item(),
                         "log_ratio": log_ratios[i, k].item()})
    result["per_sample"] = rows if keep_samples is None else rows[:keep_samples]
    return result
