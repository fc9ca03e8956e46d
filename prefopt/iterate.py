"""`prefopt iterate`: iterative (on-policy) preference training, round after round.

Offline DPO trains on answers sampled once from the SFT model; as the policy moves, those
answers stop looking like its own. Iterative DPO samples again from the current policy
before every round (Xiong et al. 2024, "Iterative Preference Learning from Human Feedback",
arXiv 2312.11456; Yuan et al. 2024, "Self-Rewarding Language Models", arXiv 2401.10020).
Each round ``r`` (1-based) of :func:`run_iterate`:

1. **sample** ``K`` answers per training prompt from the round's start policy (round 1:
   the SFT model) at seed ``seed + r``, and have the judge score them
   (:func:`prefopt.generation.judged_samples`, the judges `prefopt sample` takes);
2. **write** ``round-r/data.jsonl`` in the K-answer format (``prompt``, ``completions``,
   ``scores``; :func:`prefopt.generation.make_ranked`) and, with ``iterate_format="pairs"``,
   best-vs-worst pairs in ``round-r/pairs.jsonl``;
3. **train** on them with :func:`prefopt.train.train` into ``round-r/train`` (any loss and
   train option); the round's policy is ``round-r/train/final``;
4. **evaluate** on held-out prompts: the judge's mean reward of the policy's samples, the
   win rate against the SFT model's samples, and KL(policy || SFT) estimated from the
   policy's samples (the estimator of :mod:`prefopt.generation`); written to
   ``round-r/metrics.json`` and as one line of ``rounds.jsonl``.

Round 0 is the SFT model itself (KL 0), so the curves start where training started.

**The reference.** ``reference="round"`` (the default) makes each round's reference the
policy the round starts from, as in Self-Rewarding LMs, where model ``M_{t+1}`` is trained
with DPO from ``M_t`` on data ``M_t`` generated. The reason to prefer it: DPO's loss is
derived for answers drawn from the reference, and only the round's start policy drew this
round's answers; beta then bounds how far one round moves, and the KL from the SFT model
may grow over rounds (``rounds.jsonl`` reports it). ``reference="sft"`` keeps the SFT model
as the reference of every round: the KL-regularised objective towards the initial policy
that Xiong et al. analyse, which bounds the total drift instead of each round's step.

**Resuming.** Every artefact is written atomically (:mod:`prefopt.atomic`) and a round's
``done`` marker last. Rerunning the same command continues where it stopped: finished
rounds are skipped, a round whose ``data.jsonl`` exists is not sampled again, and a round
whose training was cut off resumes from its latest checkpoint (``resume="latest"``; how
often one is written is ``--save-steps``). The settings are kept in ``iterate.yaml``; a
rerun with other settings is refused, except for ``rounds`` (more rounds continue the run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefopt.errors import ConfigError, DataError

log = logging.getLogger("prefopt")

REFERENCES = ("round", "sft")
ITERATE_FORMATS = ("ranked", "pairs")
CONFIG_FILE = "iterate.yaml"
ROUNDS_FILE = "rounds.jsonl"
#: TrainConfig fields that iterate sets itself for every round, so they are no train options of its own.
PER_ROUND_FIELDS = frozenset({"model", "ref_model", "data", "eval_data", "eval_fraction", "data_split", "output_dir",
                              "overwrite", "resume", "prompt_field", "chosen_field", "rejected_field",
                              "completions_field", "scores_field", "rating_field"})
#: Settings a rerun may change: more rounds extend the run; the progress bar changes no number.
MAY_CHANGE = frozenset({"rounds", "train.progress"})


@dataclass
class IterateConfig:
    """The options of `prefopt iterate` that are not train options (those are a TrainConfig)."""

    model: str
    prompts: str
    judge: str
    output_dir: str
    rounds: int = 2
    samples_per_prompt: int = 4
    prompt_field: str = "prompt"
    eval_prompts: str | None = None
    eval_fraction: float | None = None   # default 0.1 when there is no eval_prompts file
    eval_samples: int = 4
    reference: str = "round"
    iterate_format: str = "ranked"
    keep_truncated: bool = False
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    generation_batch_size: int = 16
    judge_batch_size: int = 16
    train: dict[str, Any] = field(default_factory=dict)  # the resolved TrainConfig, less PER_ROUND_FIELDS

    def validate(self) -> None:
        def need(cond: bool, flag: str, message: str) -> None:
            if not cond:
                raise ConfigError(f"--{flag}: {message}")

        need(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        need(self.samples_per_prompt >= 2, "samples-per-prompt",
             f"a preference needs at least 2 answers per prompt, got {self.samples_per_prompt}")
        need(self.eval_samples >= 1, "eval-samples", f"must be >= 1, got {self.eval_samples}")
        need(self.reference in REFERENCES, "reference", f"must be one of {', '.join(REFERENCES)}")
        need(self.iterate_format in ITERATE_FORMATS, "iterate-format", f"must be one of {', '.join(ITERATE_FORMATS)}")
        need(self.eval_prompts is None or self.eval_fraction is None, "eval-fraction",
             "give --eval-prompts FILE or --eval-fraction, not both")
        if self.eval_fraction is not None:
            need(0 < self.eval_fraction < 1, "eval-fraction", f"must be in (0, 1), got {self.eval_fraction}")

    @property
    def held_out_fraction(self) -> float:
        return 0.1 if self.eval_fraction is None else self.eval_fraction


# ---------------------------------------------------------------------------- configuration


def train_options(cfg) -> dict[str, Any]:
    """The resolved TrainConfig as iterate stores and compares it (the per-round fields left out)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in PER_ROUND_FIELDS}


def round_train_config(cfg: IterateConfig, *, model: str, ref_model: str | None, data: Path, output_dir: Path,
                       resume: bool):
    """The TrainConfig of one round: the user's train options, this round's model, data and directory.

    A round without a checkpoint starts over (``overwrite``): a directory holding only an
    interrupted start has nothing to continue from.
    """
    from prefopt.config import TrainConfig, validate

    tcfg = TrainConfig(**cfg.train, model=model, ref_model=ref_model, data=str(data), output_dir=str(output_dir),
                       resume="latest" if resume else None, overwrite=not resume)
    validate(tcfg)
    return tcfg


def _flatten(settings: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in settings.items() if k != "train"}
    out.update({f"train.{k}": v for k, v in settings.get("train", {}).items()})
    return out


def stored_settings(cfg: IterateConfig, prompts_digest: str) -> dict[str, Any]:
    """What iterate.yaml holds: every setting, and a digest of the prompts each round uses."""
    return {**dataclasses.asdict(cfg), "prompts_digest": prompts_digest}


def claim_output_dir(cfg: IterateConfig, settings: dict[str, Any], *, resume: bool, overwrite: bool) -> bool:
    """Use ``cfg.output_dir`` for this run; True when it continues an earlier one there.

    An existing run with other settings is refused (naming them) unless ``overwrite``,
    which deletes the rounds and starts again; a directory of other files is never used.
    """
    out = Path(cfg.output_dir)
    if resume and overwrite:
        raise ConfigError("--overwrite: cannot be combined with --resume")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out}: exists and is not a directory")
    marker = out / CONFIG_FILE
    ours = _iterate_entries(out)
    others = sorted(p.name for p in out.iterdir() if p not in ours) if out.is_dir() else []
    if others:
        raise ConfigError(f"--output-dir {out}: holds files that are not an iterate run's ({', '.join(others[:3])}); "
                          "choose an empty or new directory")
    continuing = False
    if marker.is_file() and not overwrite:
        try:
            saved = yaml.safe_load(marker.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--output-dir {out}: cannot read {CONFIG_FILE} ({e}); pass --overwrite to start "
                              "again") from None
        before, now = _flatten(saved), _flatten(settings)
        changed = sorted(k for k in set(before) | set(now) if k not in MAY_CHANGE and before.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            raise ConfigError(f"--output-dir {out}: holds an iterate run with other settings: {shown}{more}; rerun "
                              "with the same options to continue it, or pass --overwrite to start again")
        continuing = True
    elif resume:
        raise ConfigError(f"--resume: {out} holds no iterate run to continue (no {CONFIG_FILE})")
    elif overwrite:
        for p in ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif ours:
        raise ConfigError(f"--output-dir {out}: holds an unfinished iterate start without {CONFIG_FILE}; pass "
                          "--overwrite to start again")
    from prefopt.atomic import write_text

    write_text(marker, yaml.safe_dump(settings, sort_keys=False))
    return continuing


def _iterate_entries(out: Path) -> list[Path]:
    """What an iterate run writes in its directory, including the temporaries a kill can leave behind."""
    if not out.is_dir():
        return []

    def ours(name: str) -> bool:
        if name.startswith(".tmp-"):  # prefopt.atomic's temporary of a file: .tmp-NAME.<hex>
            name = name[len(".tmp-"):].rpartition(".")[0]
        return name in (CONFIG_FILE, ROUNDS_FILE, "plots") or (name.startswith("round-") and name[6:].isdigit())

    return [p for p in out.iterdir() if ours(p.name)]


# ---------------------------------------------------------------------------- prompts


def split_prompts(cfg: IterateConfig, seed: int) -> tuple[list, list]:
    """(training prompts, held-out evaluation prompts): from --eval-prompts, or a seeded split of --prompts."""
    from prefopt.generation import load_prompts

    prompts = load_prompts(cfg.prompts, prompt_field=cfg.prompt_field)
    if cfg.eval_prompts is not None:
        return prompts, load_prompts(cfg.eval_prompts, prompt_field=cfg.prompt_field)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(cfg.held_out_fraction * len(prompts)))
    if n_eval >= len(prompts):
        raise DataError(f"holds {len(prompts)} prompts: too few to hold out a fraction of "
                        f"{cfg.held_out_fraction} for evaluation and train on the rest; give --eval-prompts FILE",
                        source=cfg.prompts)
    held = sorted(order[:n_eval])
    kept = sorted(order[n_eval:])
    return [prompts[i] for i in kept], [prompts[i] for i in held]


def prompts_digest(train_prompts: list, eval_prompts: list) -> str:
    text = json.dumps([train_prompts, eval_prompts], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------- one round's stages


def _settings(cfg: IterateConfig, *, num_samples: int, seed: int):
    from prefopt.generation import GenerationSettings

    s = GenerationSettings(num_samples=num_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, seed=seed, batch_size=cfg.generation_batch_size,
                           max_prompt_length=cfg.train["max_prompt_length"])
    s.validate()
    return s


def sample_round(cfg: IterateConfig, round_dir: Path, policy: str, prompts: list, seed: int) -> dict[str, Any]:
    """Sample and judge the round's answers; write data.jsonl (K-answer rows), pairs.jsonl, sample.json.

    data.jsonl is written last: its presence says the round's sampling is complete.
    """
    from prefopt.atomic import write_json, write_jsonl
    from prefopt.generation import judged_samples, make_pairs, make_ranked, sampling_summary

    t = cfg.train
    settings = _settings(cfg, num_samples=cfg.samples_per_prompt, seed=seed)
    samples, scores = judged_samples(model=policy, prompts=prompts, judge=cfg.judge, settings=settings,
                                     tokenizer=t["tokenizer"] or cfg.model, dtype=t["dtype"],
                                     attn_implementation=t["attn_implementation"],
                                     trust_remote_code=t["trust_remote_code"], judge_batch_size=cfg.judge_batch_size)
    ranked, skipped = make_ranked(prompts, samples, scores, keep_truncated=cfg.keep_truncated)
    summary = sampling_summary(samples, scores, ranked, skipped, keep_truncated=cfg.keep_truncated,
                               output_format="ranked")
    summary["seed"] = seed
    rows = ranked
    if cfg.iterate_format == "pairs":
        rows, pair_skipped = make_pairs(prompts, samples, scores, "best-worst", seed=seed,
                                        keep_truncated=cfg.keep_truncated)
        summary["pairs"] = len(rows)
        summary["pair_skipped"] = pair_skipped
    if not rows:
        raise DataError(f"round {round_dir.name}: no prompt kept two answers of different scores (skipped: "
                        f"{skipped}); raise --max-new-tokens or --samples-per-prompt, or pass --keep-truncated")
    write_json(round_dir / "sample.json", summary, indent=1)
    if cfg.iterate_format == "pairs":
        write_jsonl(round_dir / "pairs.jsonl", rows)
    write_jsonl(round_dir / "data.jsonl", ranked)
    return summary


def training_file(cfg: IterateConfig, round_dir: Path) -> Path:
    return round_dir / ("pairs.jsonl" if cfg.iterate_format == "pairs" else "data.jsonl")


def train_round(cfg: IterateConfig, explicit: set[str], round_dir: Path, policy: str, sft: str) -> dict[str, Any]:
    """Train the round (or resume its training from the latest checkpoint); returns its last metrics."""
    from prefopt.checkpoint import list_checkpoints
    from prefopt.train import train

    out = round_dir / "train"
    final = out / "final"
    if final.is_dir():
        return last_train_metrics(out)
    ref_model = sft if cfg.reference == "sft" and policy != sft else None  # None: the round's start policy
    resume = bool(list_checkpoints(out))
    if resume:
        log.info("%s: resuming its training from the latest checkpoint", round_dir.name)
    tcfg = round_train_config(cfg, model=policy, ref_model=ref_model, data=training_file(cfg, round_dir),
                              output_dir=out, resume=resume)
    given = set(explicit) | {"model", "data", "output_dir"} | ({"ref_model"} if ref_model else set())
    return train(tcfg, given)


def last_train_metrics(train_dir: Path) -> dict[str, Any]:
    """The last logged training row of a finished run (read back when a rerun finds final/ written)."""
    path = train_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.is_file() else []
    return next((r for r in reversed(rows) if "loss" in r), {})


def evaluate_round(cfg: IterateConfig, policy: str, sft: str, prompts: list, seed: int, *,
                   sft_rewards=None) -> tuple[dict[str, Any], list[dict]]:
    """Judge reward of the policy's samples on the held-out prompts, and KL(policy || SFT) from them.

    The SFT model is evaluated with ``policy == sft``: its KL is 0 by definition and not
    estimated. ``sft_rewards`` (the SFT model's eval rewards, ``[P, K]``) adds the win rate.
    Models are loaded one at a time (policy, SFT, judge), as in ``eval --generate``.
    """
    import torch

    from prefopt.generation import (default_device, encode_prompts, generate, sample_logps, score_samples,
                                    summarize)
    from prefopt.judges import check_judge, load_judge
    from prefopt.modeling import load_causal_lm, load_tokenizer

    t = cfg.train
    settings = _settings(cfg, num_samples=cfg.eval_samples, seed=seed)
    check_judge(cfg.judge, trust_remote_code=t["trust_remote_code"])
    tok = load_tokenizer(t["tokenizer"] or cfg.model, trust_remote_code=t["trust_remote_code"])
    ids = encode_prompts(tok, prompts, settings.max_prompt_length)
    device = default_device()

    def load(name: str):
        return load_causal_lm(name, dtype=t["dtype"], attn_implementation=t["attn_implementation"],
                              trust_remote_code=t["trust_remote_code"]).to(device)

    logp_kw = {"batch_size": settings.batch_size, "pad_token_id": tok.pad_token_id,
               "chunk_size": t["lm_head_chunk_size"]}
    model = load(policy)
    samples = generate(model, tok, ids, settings)
    is_sft = policy == sft
    ratios = None
    if not is_sft:
        policy_logps = sample_logps(model, ids, samples, **logp_kw)
        del model
        reference = load(sft)
        ratios = (policy_logps - sample_logps(reference, ids, samples, **logp_kw)).double()
        del reference
    else:
        del model
    scorer = load_judge(cfg.judge, device=device, batch_size=cfg.judge_batch_size, dtype=t["dtype"],
                        trust_remote_code=t["trust_remote_code"])
    rewards = score_samples(scorer, prompts, samples)
    del scorer
    lengths = torch.tensor([[len(s.token_ids) for s in row] for row in samples], dtype=torch.float64)
    ref_rewards = None if sft_rewards is None else torch.as_tensor(sft_rewards, dtype=torch.float64)
    stats = summarize(rewards, ref_rewards, ratios if ratios is not None else torch.zeros_like(rewards), lengths)
    if not settings.plain:
        stats["kl_note"] = ("samples were drawn with temperature/top-p reshaping, so 'kl' is the mean log-ratio "
                            "under that reshaped distribution, not KL(policy || SFT) itself")
    per_sample = [{"prompt_index": i, "sample": k, "completion": s.text, "finished": s.finished,
                   "reward": rewards[i, k].item(), "log_ratio": 0.0 if ratios is None else ratios[i, k].item()}
                  for i, row in enumerate(samples) for k, s in enumerate(row)]
    return stats, per_sample


def read_eval_rewards(round_dir: Path, prompts: int, samples: int) -> list[list[float]]:
    """The per-sample rewards a round's evaluation wrote, ``[prompts][samples]``."""
    grid = [[0.0] * samples for _ in range(prompts)]
    for line in (round_dir / "eval_samples.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            grid[row["prompt_index"]][row["sample"]] = row["reward"]
    return grid


# ---------------------------------------------------------------------------- the loop


def round_record(r: int, stats: dict[str, Any], *, rows: int | None, train_metrics: dict[str, Any],
                 seconds: float, resumed: bool, policy: str) -> dict[str, Any]:
    """One line of rounds.jsonl (and the round's metrics.json)."""
    record: dict[str, Any] = {
        "round": r, "reward_mean": stats["policy_reward_mean"], "reward_stderr": stats["policy_reward_stderr"],
        "kl": stats["kl"], "kl_stderr": stats["kl_stderr"], "win_rate_vs_sft": stats.get("win_rate"),
        "win_rate_stderr": stats.get("win_rate_stderr"), "mean_tokens": stats["policy_mean_tokens"],
        "rows": rows, "train_loss": train_metrics.get("loss"),
        "train_accuracy": train_metrics.get("rewards/accuracies"), "seconds": round(seconds, 1),
        "resumed": resumed, "policy": policy,
    }
    if "kl_note" in stats:
        record["kl_note"] = stats["kl_note"]
    return record


def write_rounds_file(out: Path, last: int) -> Path:
    """rounds.jsonl: the metrics of rounds 0..last, rebuilt whole (atomic), so a rerun never doubles a line."""
    from prefopt.atomic import write_jsonl

    records = []
    for r in range(last + 1):
        path = out / f"round-{r}" / "metrics.json"
        if path.is_file():
            records.append(json.loads(path.read_text(encoding="utf-8")))
    return write_jsonl(out / ROUNDS_FILE, records)


def finish_round(out: Path, round_dir: Path, record: dict[str, Any], per_sample: list[dict]) -> None:
    """Write the round's evaluation, its metrics, rounds.jsonl, and the ``done`` marker last."""
    from prefopt.atomic import write_json, write_jsonl, write_text

    write_jsonl(round_dir / "eval_samples.jsonl", per_sample)
    write_json(round_dir / "metrics.json", record, indent=1, ensure_ascii=False)
    write_rounds_file(out, record["round"])
    write_text(round_dir / "done", "")


def run_iterate(cfg: IterateConfig, explicit: set[str] | None = None, *, resume: bool = False,
                overwrite: bool = False) -> list[dict[str, Any]]:
    """Run (or continue) ``cfg.rounds`` rounds; returns the records of rounds 0..rounds.

    ``explicit`` names the train options the user gave (for train's warnings about them).
    """
    cfg.validate()
    explicit = set(explicit or ())
    seed = cfg.train["seed"]
    train_prompts, eval_prompts = split_prompts(cfg, seed)
    out = Path(cfg.output_dir)
    continuing = claim_output_dir(cfg, stored_settings(cfg, prompts_digest(train_prompts, eval_prompts)),
                                  resume=resume, overwrite=overwrite)
    log.info("iterate: %s %s: %d training prompts x %d answers, %d held-out prompts x %d samples, %d rounds, "
             "reference: %s", "continuing" if continuing else "starting", out, len(train_prompts),
             cfg.samples_per_prompt, len(eval_prompts), cfg.eval_samples, cfg.rounds,
             "each round's start policy" if cfg.reference == "round" else "the SFT model")
    sft = cfg.model
    records: list[dict[str, Any]] = []
    sft_rewards = None
    for r in range(cfg.rounds + 1):
        round_dir = out / f"round-{r}"
        policy_before = sft if r <= 1 else str(out / f"round-{r - 1}" / "train" / "final")
        policy_after = sft if r == 0 else str(round_dir / "train" / "final")
        if (round_dir / "done").is_file():
            log.info("round %d: done earlier, skipped", r)
            records.append(json.loads((round_dir / "metrics.json").read_text(encoding="utf-8")))
        else:
            records.append(_run_round(cfg, explicit, out, round_dir, r, policy_before, policy_after, sft,
                                      train_prompts, eval_prompts, seed, sft_rewards))
        if r == 0:
            sft_rewards = read_eval_rewards(round_dir, len(eval_prompts), cfg.eval_samples)
    write_rounds_file(out, cfg.rounds)
    return records


def _run_round(cfg: IterateConfig, explicit: set[str], out: Path, round_dir: Path, r: int, policy_before: str,
               policy_after: str, sft: str, train_prompts: list, eval_prompts: list, seed: int,
               sft_rewards) -> dict[str, Any]:
    started = time.perf_counter()
    round_dir.mkdir(parents=True, exist_ok=True)
    rows: int | None = None
    train_metrics: dict[str, Any] = {}
    resumed = False
    if r > 0:
        data = round_dir / "data.jsonl"
        if data.is_file():
            resumed = True
            log.info("round %d: answers sampled earlier, not sampled again", r)
        else:
            log.info("round %d: sampling %d answers for each of %d prompts from %s", r, cfg.samples_per_prompt,
                     len(train_prompts), policy_before)
            summary = sample_round(cfg, round_dir, policy_before, train_prompts, seed + r)
            log.info("round %d: mean judge score of the answers %.4f; %d rows", r, summary["score_mean"],
                     summary["pairs"] if cfg.iterate_format == "pairs" else summary["rows"])
        resumed = resumed or (round_dir / "train").is_dir()
        train_metrics = train_round(cfg, explicit, round_dir, policy_before, sft)
        file = training_file(cfg, round_dir)
        rows = sum(1 for line in file.read_text(encoding="utf-8").splitlines() if line.strip())
    log.info("round %d: evaluating %s on %d held-out prompts", r, "the SFT model" if r == 0 else policy_after,
             len(eval_prompts))
    stats, per_sample = evaluate_round(cfg, policy_after, sft, eval_prompts, seed, sft_rewards=sft_rewards)
    record = round_record(r, stats, rows=rows, train_metrics=train_metrics, seconds=time.perf_counter() - started,
                          resumed=resumed, policy=policy_after)
    finish_round(out, round_dir, record, per_sample)
    log.info("round %d: reward %.4f ± %.4f, KL(policy || SFT) %.3f ± %.3f", r, record["reward_mean"],
             record["reward_stderr"], record["kl"], record["kl_stderr"])
    return record
