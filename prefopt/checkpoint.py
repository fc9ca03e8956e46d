"""Atomic checkpoints: a crash at any moment leaves the newest complete one usable.

A checkpoint is written under ``checkpoints/.tmp-step-N`` (model, optimizer, scheduler
and RNG states through ``accelerator.save_state``, plus ``trainer_state.json`` with the
data position) and only then renamed to ``checkpoints/step-N``. A rename within one
directory is atomic, so ``step-*`` directories are always complete; leftovers of an
interrupted write are ignored and cleaned up on the next save. ``trainer_state.json`` is
written last inside the temporary directory, so its presence marks completeness twice. The
writing, renaming and replacing is :func:`prefopt.atomic.atomic_path`'s; under sharded engines
every rank writes into the same temporary directory (see :func:`save_checkpoint`).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from prefopt.atomic import atomic_path, staging_dir, write_json
from prefopt.errors import CheckpointError, ConfigError

STATE_FILE = "trainer_state.json"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | Path, resume: str) -> Path:
    """'latest' -> the newest complete checkpoint; otherwise a checkpoint directory."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise CheckpointError(f"--resume latest: no complete checkpoint under {checkpoints_dir(output_dir)}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"--resume {resume}: not a complete prefopt checkpoint (no {STATE_FILE})")
    return path


def remove_newer(accelerator, output_dir: str | Path, step: int) -> None:
    """After resuming from step ``step``, drop this run's checkpoints from later steps: they belong to
    the run being replaced, and ``--resume latest`` or pruning would otherwise pick them."""
    if accelerator.is_main_process:
        for path in list_checkpoints(output_dir):
            m = _STEP.match(path.name)
            if m and int(m.group(1)) > step:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{checkpoint / STATE_FILE}: unreadable checkpoint state ({e})") from None


def _explain(e: Exception, path: Path) -> CheckpointError:
    """A failed write as one line: an ``OSError``, or a ``SafetensorError`` wrapping one ("(os error 28)")."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"\(os error (\d+)\)", str(e))
        code = int(m.group(1)) if m else None
    if code == errno.ENOSPC:
        why = "the disk is full"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the output directory is not writable"
    else:
        why = getattr(e, "strerror", None) or (os.strerror(code) if code else str(e))
    return CheckpointError(f"cannot write checkpoint {path}: {why}. The previous checkpoint is intact; "
                           "free space or fix permissions, then rerun with --resume latest")


def check_process_group(accelerator) -> None:
    """Refuse processes that a launcher started together but that do not form one group.

    accelerate falls back to one lone process per launched process (distributed type NO) where the config
    asks for what this machine cannot run, e.g. FSDP on a CPU, or DeepSpeed with ``use_cpu: true``: each would
    train the whole model by itself and all would write (and clean up) the same checkpoints.
    """
    launched = launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        raise ConfigError(
            f"the launcher started {launched} processes, but accelerate put this one in a group of "
            f"{accelerator.num_processes} (distributed type {accelerator.distributed_type.value}): each would train "
            "alone and they would overwrite each other's checkpoints. accelerate runs FSDP only on GPUs or other "
            "accelerators (and DeepSpeed only with use_cpu: false); on a CPU use data parallelism, "
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N ..., or DeepSpeed with "
            "use_cpu: false in its config")


def launched_processes() -> int:
    """How many processes the launcher started (torchrun, MPI), whatever accelerate made of them."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    total_limit: int | None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and prune old ones; returns its path.

    Every process calls it. Under FSDP and DeepSpeed every rank writes its own shards through
    ``save_state``, so: the main process prepares the temporary directory (removing stale ones); all wait;
    all write into it; all wait; the main process writes ``trainer_state.json`` last and renames the
    directory to ``step-<step>``; all wait. The rename needs every rank past the second wait, so a rank
    that fails (and raises, or dies) leaves at most the temporary directory, never a ``step-<step>``.
    No process enters a collective after a failure (the others may be inside one of ``save_state``'s):
    each raises, and the launcher ends the rest.
    """
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step}"
    main = accelerator.is_main_process
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        with atomic_path(final, directory=True) if main else nullcontext(staging_dir(final)) as tmp:
            accelerator.wait_for_everyone()  # the directory exists for every rank
            accelerator.save_state(str(tmp), safe_serialization=True)
            accelerator.wait_for_everyone()  # every rank's files are written
            if main:
                write_json(tmp / STATE_FILE, state, indent=1)  # last: its presence marks completeness
    except (OSError, SafetensorError) as e:
        raise _explain(e, final) from None
    accelerator.wait_for_everyone()  # step-<step> exists for every rank
    if main and total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final
