"""Atomic checkpoints: a crash at any moment leaves the newest complete one usable.

A checkpoint is written under ``checkpoints/.tmp-step-N`` (model, optimizer, scheduler
and RNG states through ``accelerator.save_state``, plus ``trainer_state.json`` with the
data position) and only then renamed to ``checkpoints/step-N``. A rename within one
directory is atomic, so ``step-*`` directories are always complete; leftovers of an
interrupted write are ignored and cleaned up on the next save. ``trainer_state.json`` is
written last inside the temporary directory, so its presence marks completeness twice.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from prefopt.errors import CheckpointError

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


def _explain(e: OSError, path: Path) -> CheckpointError:
    if e.errno == errno.ENOSPC:
        why = "the disk is full"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the output directory is not writable"
    else:
        why = e.strerror or str(e)
    return CheckpointError(f"cannot write checkpoint {path}: {why}. The previous checkpoint is intact; "
                           "free space or fix permissions, then rerun with --resume latest")


def save_checkpoint(accelerator, output_dir: str | Path, step: int, state: dict[str, Any],
                    total_limit: int | None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and prune old ones; returns its path."""
    root = checkpoints_dir(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state_tmp = tmp / (STATE_FILE + ".part")
            state_tmp.write_text(json.dumps(state, indent=1))
            _fsync_tree(tmp)
            os.replace(state_tmp, tmp / STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _explain(e, final) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
