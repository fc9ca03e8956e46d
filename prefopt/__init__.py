"""prefopt: Direct Preference Optimization and its family of losses for causal language models.

The public pieces, importable from the package root (loaded on first use, so that
``import prefopt`` and the CLI's ``--help`` stay fast):

- ``TrainConfig``, ``build_config``: the one validated configuration (flags, YAML).
- ``train(config)``: the training entry point (DPO family, SFT, KTO).
- ``compute_loss``, ``kto_loss``, ``LOSSES``, ``PairLogps``, ``LossParams``: pure losses over log-prob tensors.
- ``completion_logps``, ``collate``: model + packed batch -> per-sequence completion log-probs.
- ``load_rows``, ``detect_format``, ``to_pairs``, ``tokenize_pairs``: the data loader.
- ``score_file``: what ``prefopt eval`` runs.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "prefopt.config",
    "build_config": "prefopt.config",
    "train": "prefopt.train",
    "compute_loss": "prefopt.losses",
    "kto_loss": "prefopt.losses",
    "LOSSES": "prefopt.losses",
    "PairLogps": "prefopt.losses",
    "LossParams": "prefopt.losses",
    "LossOutput": "prefopt.losses",
    "completion_logps": "prefopt.logprobs",
    "collate": "prefopt.batching",
    "load_rows": "prefopt.data",
    "detect_format": "prefopt.data",
    "to_pairs": "prefopt.data",
    "tokenize_pairs": "prefopt.data",
    "TokenizeSettings": "prefopt.data",
    "score_file": "prefopt.scoring",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
