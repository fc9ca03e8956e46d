"""Judges: whatever scores a completion, for sampling preference pairs and for evaluation.

A judge is called as ``judge(prompts, completions) -> list[float]`` (one score per
completion, higher is better). ``--judge`` accepts:

* a **reward-model directory**: a model saved with ``save_pretrained`` that loads with
  ``AutoModelForSequenceClassification`` and has ``num_labels=1``; its scalar output on
  prompt + completion is the score. Conversational prompts go through the reward
  model's own chat template when its tokenizer has one.
* a **Python callable** ``module:function`` (``function`` may be a dotted attribute
  path), taking ``(prompts, completions)``. Prompts are passed as they appear in the
  prompts file: strings, or message lists for conversational prompts. The current
  directory is importable, as with ``python -m``.
* ``vader``: the VADER sentiment lexicon's compound score (in [-1, 1]) of prompt +
  completion; ``vader-completion`` scores the completion alone. A real, fixed scorer
  that nobody here wrote, used by the demo's controlled-sentiment task.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError, DataError

JudgeFn = Callable[[list, list[str]], Sequence[float]]

BUILTIN = ("vader", "vader-completion")


class CallableJudge:
    """A user function ``(prompts, completions) -> scores``."""

    def __init__(self, fn: JudgeFn, name: str):
        self.fn, self.name = fn, name

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        return list(self.fn(prompts, completions))


class VaderJudge:
    """VADER compound sentiment of prompt + completion (or of the completion alone)."""

    def __init__(self, include_prompt: bool = True):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()
        self.include_prompt = include_prompt
        self.name = "vader" if include_prompt else "vader-completion"

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        from prefopt.generation import prompt_text

        texts = [(prompt_text(p) + c) if self.include_prompt else c for p, c in zip(prompts, completions)]
        return [float(self.analyzer.polarity_scores(t)["compound"]) for t in texts]


class RewardModelJudge:
    """A sequence-classification model with one output: its logit is the reward."""

    def __init__(self, path: str, *, device: str | None = None, batch_size: int = 16, dtype: str = "float32",
                 trust_remote_code: bool = False, max_length: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from prefopt.modeling import DTYPES, disable_dropout

        spec = f"--judge {path}"
        config = reward_model_config(path, trust_remote_code=trust_remote_code)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{spec}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise ConfigError(f"{spec}: its tokenizer has neither a pad nor an EOS token to pad batches with")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{spec}: cannot load the reward model ({str(e).splitlines()[0]})") from None
        if model.config.pad_token_id is None:
            # The classification head reads the last non-padding token, found through pad_token_id.
            model.config.pad_token_id = self.tokenizer.pad_token_id
        disable_dropout(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        limit = max_length or getattr(config, "max_position_embeddings", None) or 4096
        self.max_length = min(int(limit), int(getattr(self.tokenizer, "model_max_length", limit) or limit))
        self.name = path

    def _text(self, prompt: Any, completion: str) -> str:
        if isinstance(prompt, list):
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(
                    prompt + [{"role": "assistant", "content": completion}], tokenize=False)
            from prefopt.generation import prompt_text

            return prompt_text(prompt) + "\n" + completion
        return prompt + completion

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        import torch

        texts = [self._text(p, c) for p, c in zip(prompts, completions)]
        bos = self.tokenizer.bos_token
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start:start + self.batch_size]
                # a chat template that writes BOS itself must not get a second one
                add_special = not (bos and all(t.startswith(bos) for t in chunk))
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                     add_special_tokens=add_special, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


def reward_model_config(path: str, *, trust_remote_code: bool = False):
    """The config of a reward-model directory, checked to describe a one-output classifier."""
    from transformers import AutoConfig

    spec = f"--judge {path}"
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{spec}: not a model directory ({str(e).splitlines()[0]})") from None
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"{spec}: is a {', '.join(archs)} model, not a reward model; a judge directory must "
                          "hold an AutoModelForSequenceClassification with num_labels=1")
    if config.num_labels != 1:
        raise ConfigError(f"{spec}: the model has {config.num_labels} output labels; a reward model must have "
                          "exactly one (num_labels=1), whose value is the reward")
    return config


def check_judge(spec: str, *, trust_remote_code: bool = False) -> None:
    """Fail early on a bad ``--judge`` without loading any weights (imports a callable's module)."""
    spec = (spec or "").strip()
    path = Path(spec).expanduser()
    if spec and spec not in BUILTIN and path.is_dir():
        reward_model_config(str(path), trust_remote_code=trust_remote_code)
    elif not (spec in BUILTIN):
        load_judge(spec)


def _import_callable(spec: str) -> JudgeFn:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"--judge {spec}: a callable judge is written module:function, e.g. mypkg.judges:score")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--judge {spec}: cannot import module '{module_name}' ({type(e).__name__}: {e})") from None
    except Exception as e:  # the module's own code failed while importing
        raise ConfigError(f"--judge {spec}: importing '{module_name}' failed ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--judge {spec}: module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--judge {spec}: '{attr}' is a {type(obj).__name__}, not a function of "
                          "(prompts, completions)")
    return obj


def load_judge(spec: str, *, device: str | None = None, batch_size: int = 16, dtype: str = "float32",
               trust_remote_code: bool = False):
    """Turn a ``--judge`` value into a callable judge (see the module docstring for the forms)."""
    if not spec or not spec.strip():
        raise ConfigError("--judge is required: a reward-model directory, module:function, or 'vader'")
    spec = spec.strip()
    if spec in BUILTIN:
        return VaderJudge(include_prompt=spec == "vader")
    path = Path(spec).expanduser()
    if path.is_dir():
        return RewardModelJudge(str(path), device=device, batch_size=batch_size, dtype=dtype,
                                trust_remote_code=trust_remote_code)
    if path.exists():
        raise ConfigError(f"--judge {spec}: is a file; give a reward-model directory (written by save_pretrained) "
                          "or module:function")
    if ":" in spec:
        return CallableJudge(_import_callable(spec), spec)
    raise ConfigError(f"--judge {spec}: no such directory, and not module:function; a judge is a reward-model "
                      f"directory, a Python callable written module:function, or one of {', '.join(BUILTIN)}")


def judge_scores(judge, prompts: list, completions: list[str]) -> list[float]:
    """Call ``judge`` and check it returned one finite number per completion."""
    if not completions:
        return []
    name = getattr(judge, "name", repr(judge))
    try:
        raw = judge(list(prompts), list(completions))
    except Exception as e:
        if isinstance(e, (ConfigError, DataError)):
            raise
        raise DataError(f"judge {name} failed: {type(e).__name__}: {e}") from e
    try:
        scores = [float(s) for s in raw]
    except (TypeError, ValueError):
        raise DataError(f"judge {name} must return a list of numbers, got {type(raw).__name__}") from None
    if len(scores) != len(completions):
        raise DataError(f"judge {name} returned {len(scores)} scores for {len(completions)} completions")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise DataError(f"judge {name} returned a non-finite score ({scores[bad[0]]}) for completion {bad[0]}")
    return scores
