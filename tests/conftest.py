"""Shared fixtures: a tiny BPE tokenizer, a tiny Llama, and a learnable preference task.

Everything is built here, on the CPU, in a second or two; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# Tests that launch several processes: with ``pytest -n 2`` (the README's command) they all run in one
# worker, one after another: two of these at once would oversubscribe the two cores they were sized
# for. Each launch takes a free port (free_port) for its rendezvous.
LAUNCHING_MODULES = {"test_distributed.py", "test_fsdp2.py", "test_gpu_check.py"}


def pytest_addoption(parser):
    parser.addoption("--segment-kernel", choices=("auto", "prefopt_sdpa", "prefopt_flex"), default="auto",
                     help="the block-attention kernel every test gets (default: the machine's choice, "
                          "prefopt.attention.segment_kernel); prefopt_flex proves FlexAttention on a CPU "
                          "(forward only: torch has no CPU backward for it, so the check switches it off there)")


def pytest_configure(config):
    kernel = config.getoption("--segment-kernel")
    if kernel != "auto":
        import prefopt.attention

        prefopt.attention.segment_kernel = lambda: kernel


def free_port() -> int:
    """A TCP port nothing listens on now, for one launch's rendezvous: accelerate's default (29500)
    can still be held by the previous launch's store as it shuts down, or by anything else on the
    machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Modules whose tests share one expensive module fixture (a whole demo run): one worker builds it once.
SHARED_FIXTURE_MODULES = {"test_demo.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in LAUNCHING_MODULES or "across_processes" in item.name:
            item.add_marker(pytest.mark.xdist_group("launch"))
        elif item.path.name in SHARED_FIXTURE_MODULES:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


GOOD = ["sunny", "bright", "warm", "gentle", "kind", "happy", "calm", "clear"]
BAD = ["stormy", "dark", "cold", "harsh", "cruel", "sad", "angry", "grey"]
FILLER = ["the", "a", "day", "sky", "morning", "road", "town", "river", "field", "house", "and", "was"]


def make_pairs(n: int, seed: int) -> list[dict]:
    """Prompts of filler words; chosen completions use GOOD words, rejected ones BAD words.

    A rule a tiny model can learn and that generalises to unseen pairs: raise the
    probability of GOOD words after a prompt, lower that of BAD ones.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 8))) + ":"
        k = rng.randint(2, 5)
        chosen = " " + " ".join(rng.choice(GOOD) for _ in range(k))
        rejected = " " + " ".join(rng.choice(BAD) for _ in range(rng.randint(2, 5)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus() -> list[str]:
    rows = make_pairs(400, seed=123)
    return [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from prefopt.tiny import train_tokenizer

    return train_tokenizer(corpus(), vocab_size=200)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama + tokenizer directory, loadable with from_pretrained."""
    from prefopt.tiny import build_llama, save_tiny

    model = build_llama(tiny_tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0)
    return save_tiny(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def pref_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("prefs")
    return write_jsonl(make_pairs(96, seed=1), d / "train.jsonl"), write_jsonl(make_pairs(32, seed=2), d / "eval.jsonl")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("PREFOPT_CACHE", str(d))
    return d
