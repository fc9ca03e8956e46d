"""The frozen reference policy pi_ref, in the cheapest form that is still exact.

Three forms, chosen by :func:`prefopt.train` from the config:

* :class:`CachedReference` (the default whenever pi_ref is frozen): one no-grad pass
  over the data before training, stored on disk under a key that hashes the reference
  weights and the exact token ids (which covers the tokenizer, the data and every
  tokenization setting). A later run, a sweep over beta or loss, or a resume finds the
  file and skips the pass; any changed input changes the key, so a cache is never
  stale. No reference model stays in memory during training.
* :class:`ModelReference`: a separate frozen model run every step (needed for TR-DPO,
  whose reference moves, or when caching is switched off).
* :class:`AdapterDisabledReference`: with LoRA the reference is the base model with
  the adapters switched off, so no second copy of the weights exists.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prefopt.atomic import atomic_path
from prefopt.batching import PackedBatch, split_rows
from prefopt.sharding import is_partitioned, whole

# (model, batch) -> per-sequence log-probs [num_seqs] (after any LD-DPO transform)
SeqScorer = Callable[[torch.nn.Module, PackedBatch], torch.Tensor]

CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt"))


def hash_weights(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer, so a changed reference means a new cache key.

    Under ZeRO-3 each rank holds a slice of every weight: the weights are gathered one at a time,
    in name order (a collective each, so every rank calls this), never the whole model at once."""
    named = dict(model.named_parameters(remove_duplicate=False))
    if not any(is_partitioned(p) for p in named.values()):
        return _hash_tensors(model.state_dict().items())
    named.update(model.named_buffers())
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(n for n in model.state_dict() if n in named):
        with whole([named[name]]):
            _feed(h, name, named[name])
    return h.hexdigest()


def hash_buffers(model: torch.nn.Module) -> str:
    """A digest of the buffers a checkpoint does not hold (rotary frequencies, ALiBi slopes, causal
    tables): computed from the config and the code at load time, they change the numbers too."""
    saved = set(model.state_dict())
    return _hash_tensors((n, b) for n, b in model.named_buffers() if n not in saved)


def _hash_tensors(named) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(named, key=lambda item: item[0]):
        _feed(h, name, tensor)
    return h.hexdigest()


def _feed(h, name: str, tensor: torch.Tensor) -> None:
    t = tensor.detach()
    h.update(name.encode())
    h.update(str((t.dtype, tuple(t.shape))).encode())
    flat = t.reshape(-1).cpu().contiguous()
    if flat.dtype in (torch.bfloat16, torch.float16):
        flat = flat.view(torch.int16)
    elif flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    elif flat.dtype not in (torch.float32, torch.float64, torch.int64, torch.int32, torch.int16,
                            torch.int8, torch.uint8):
        flat = flat.float()
    h.update(flat.numpy().tobytes())


def hash_examples(examples: Iterable) -> str:
    """A digest of the exact token ids the reference will score."""
    h = hashlib.blake2b(digest_size=16)
    for ex in examples:
        item = [ex.prompt_ids, ex.completions]
        if getattr(ex, "scores", None) is not None:  # K-answer rows: the scores decide what is trained
            item.append(ex.scores)
        if getattr(ex, "completion_masks", None) is not None:  # which tokens are scored
            item.append(ex.completion_masks)
        h.update(json.dumps(item).encode())
    return h.hexdigest()


class CachedReference:
    """Reference log-probs looked up by dataset index: ``table[index, completion]``."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [num_examples, num_completions] float32

    def logps(self, batch: PackedBatch) -> torch.Tensor:
        rows = self.table.to(batch.example_index.device)[batch.example_index]
        return rows.reshape(-1)  # example-major, completion-minor: the batch's sequence numbering

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        batches: Iterable[PackedBatch],
        num_examples: int,
        num_completions: int,
        score: SeqScorer,
        *,
        cache_file: Path | None,
        device: torch.device | str = "cpu",
        progress: Callable[[int], None] | None = None,
        split: bool = True,
        forwards: int = 0,
        filler: PackedBatch | None = None,
        gather: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        write: bool = True,
        hit: bool | None = None,
    ) -> tuple["CachedReference", bool]:
        """Load the table from ``cache_file`` if present, else compute it (and save it).

        Returns the reference and whether it came from the cache. Over several processes each
        scores its share of ``batches``: ``gather`` joins the (index, values) of every process,
        ``hit`` is the main process's view of the cache (all must agree, or some would wait in a
        collective forever), ``write`` says whether this process saves the file. Under engines whose
        forwards are collectives (FSDP, ZeRO-3) ``split`` is off and ``filler`` is run until
        ``forwards`` forwards are done, so that every process runs as many.
        """
        if hit is None:
            hit = cache_file is not None and cache_file.exists()
        if hit:
            try:
                table = load_file(str(cache_file))["logps"]
            except (SafetensorError, KeyError, OSError):  # damaged or foreign file: recompute and replace it
                table = None
            if table is not None and table.shape == (num_examples, num_completions):
                return cls(table), True
            if gather is not None:
                raise RuntimeError(f"{cache_file}: the reference cache is unreadable or of another shape on this "
                                   "process; remove it and rerun")
        indices, values = [], []
        was_training = model.training
        model.eval()
        done = 0
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                for part in (split_rows(batch) if split else [batch]):  # row by row: no forward over padding
                    values.append(score(model, part).float().cpu().reshape(-1, num_completions))
                    indices.append(part.example_index.cpu())
                    done += 1
                if progress:
                    progress(batch.num_examples)
            while done < forwards:  # the same number of collective forwards as every other process
                score(model, filler.to(device))
                done += 1
        model.train(was_training)
        index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
        value = torch.cat(values) if values else torch.zeros(0, num_completions)
        if gather is not None:
            index, value = gather(index, value)
        table = torch.full((num_examples, num_completions), float("nan"))
        table[index] = value
        if torch.isnan(table).any():
            raise RuntimeError("reference pass left examples without log-probs")
        if cache_file is not None and write:
            atomic_save_tensors({"logps": table}, cache_file)
        return cls(table), False


class ModelReference:
    """A separate frozen model, evaluated every step without gradient."""

    def __init__(self, model: torch.nn.Module, score: SeqScorer):
        self.model = model
        self.score = score
        model.eval()
        model.requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: PackedBatch) -> torch.Tensor:
        return self.score(self.model, batch)

    @torch.no_grad()
    def sync(self, policy: torch.nn.Module, mode: str, alpha: float) -> None:
        """TR-DPO (arXiv 2404.09656): soft ``ref <- a*policy + (1-a)*ref`` or hard ``ref <- policy``."""
        for p_ref, p in zip(self.model.parameters(), policy.parameters(), strict=True):
            if mode == "hard":
                p_ref.copy_(p.detach())
            else:
                p_ref.mul_(1 - alpha).add_(p.detach().to(p_ref.dtype), alpha=alpha)


class AdapterDisabledReference:
    """LoRA: the policy's own base weights with its adapters switched off.

    ``model`` is what the loop calls (the policy as accelerate prepared it: under FSDP only the
    wrapped root gathers the weights), ``adapters`` the peft model inside it that switches them."""

    def __init__(self, model: torch.nn.Module, score: SeqScorer, adapters: torch.nn.Module | None = None):
        self.model = model
        self.score = score
        self.adapters = adapters if adapters is not None else model

    @torch.no_grad()
    def logps(self, batch: PackedBatch) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        with self.adapters.disable_adapter():
            out = self.score(self.model, batch)
        self.model.train(was_training)
        return out


def cache_key(weights_digest: str, examples_digest: str, extra: dict) -> str:
    """The cache file name: weights, token ids and anything else that changes the numbers."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"v": CACHE_VERSION, "w": weights_digest, "x": examples_digest, **extra},
                        sort_keys=True).encode())
    return h.hexdigest()


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see half a file."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
