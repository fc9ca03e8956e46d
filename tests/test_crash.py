"""Crashes during training: kill -9 at several moments, non-finite steps, a full disk.

The kill test runs the real CLI (``python -m prefopt.cli train``) in a subprocess. A
``sitecustomize`` put on its PYTHONPATH (only for these runs) makes it stop at a chosen
moment (the start of a step, the middle of a checkpoint write, the middle of writing
final/) and logs which examples each training micro-batch held; the test then sends
SIGKILL, resumes with ``--resume latest`` and compares everything with an uninterrupted
run.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_pairs, write_jsonl
from prefopt import checkpoint as ckpt
from prefopt import cli
from prefopt import train as T
from prefopt.config import build_config
from prefopt.errors import CheckpointError, TrainingError

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]

# Loaded by the training subprocess when its PYTHONPATH holds this file as sitecustomize.py.
HOOKS = r'''
import json, os, time
from pathlib import Path

if os.environ.get("PREFOPT_TEST_SEEN"):
    import accelerate.checkpointing as AC
    import prefopt.train as T

    HANG = os.environ.get("PREFOPT_TEST_HANG", "")
    MARKER = Path(os.environ["PREFOPT_TEST_MARKER"])
    SEEN = open(os.environ["PREFOPT_TEST_SEEN"], "a")

    def stop_here():
        MARKER.write_text(HANG)
        time.sleep(600)

    parts, calls = T.row_parts, [0]

    def row_parts(batch, *args, **kwargs):  # called once per training micro-batch
        calls[0] += 1
        if HANG == f"step:{calls[0]}":
            stop_here()
        SEEN.write(json.dumps(batch.example_index.tolist()) + "\n")
        SEEN.flush()
        return parts(batch, *args, **kwargs)

    save = AC.save

    def hanging_save(obj, path, *args, **kwargs):
        if HANG.startswith("save:") and f".tmp-step-{HANG[5:]}" in str(path) and str(path).endswith("optimizer.bin"):
            stop_here()
        return save(obj, path, *args, **kwargs)

    card = T.model_card

    def hanging_card(*args, **kwargs):
        if HANG == "final":
            stop_here()
        return card(*args, **kwargs)

    T.row_parts, AC.save, T.model_card = row_parts, hanging_save, hanging_card
'''


def _args(model: Path, data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--cache-dir", str(cache),
            "--epochs", "2", "--batch-size", "4", "--save-steps", "4", "--logging-steps", "3",
            "--learning-rate", "1e-3", "--seed", "7", "--no-progress", *extra]


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_second")
    return rows


class Run:
    """One training subprocess that may be stopped at a hook and killed."""

    def __init__(self, tmp: Path, name: str, argv: list[str], hang: str | None):
        hooks = tmp / "hooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "sitecustomize.py").write_text(HOOKS)
        self.marker, self.seen = tmp / f"{name}.marker", tmp / f"{name}.seen"
        env = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
               "PREFOPT_LOG": "WARNING", "PREFOPT_TEST_SEEN": str(self.seen), "PREFOPT_TEST_MARKER": str(self.marker),
               "PREFOPT_TEST_HANG": hang or ""}
        self.proc = subprocess.Popen([sys.executable, "-m", "prefopt.cli", *argv], cwd=tmp, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_hang_then_kill(self) -> None:
        deadline = time.time() + 120
        while not self.marker.exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                pytest.fail(f"training ended (rc={self.proc.returncode}) before the planned kill:\n{out}\n{err}")
            if time.time() > deadline:
                self.proc.kill()
                pytest.fail("training never reached the planned kill point")
            time.sleep(0.05)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self) -> None:
        out, err = self.proc.communicate(timeout=300)
        assert self.proc.returncode == 0, f"{out}\n{err}"
        assert "Traceback" not in err

    def batches(self) -> list[list[int]]:
        return [json.loads(line) for line in self.seen.read_text().splitlines()] if self.seen.exists() else []


@pytest.mark.slow
def test_kill9_at_any_moment_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(make_pairs(24, seed=5), tmp_path / "train.jsonl")
    cache = tmp_path / "cache"

    # Uninterrupted run, in-process, logging each micro-batch's examples the same way.
    seen_ref: list[list[int]] = []
    parts = T.row_parts

    def logging_parts(batch, *args, **kwargs):  # called once per training micro-batch
        seen_ref.append(batch.example_index.tolist())
        return parts(batch, *args, **kwargs)

    monkeypatch.setattr(T, "row_parts", logging_parts)
    ref_out = tmp_path / "ref"
    assert cli.main(_args(tiny_model_dir, data, ref_out, cache)) == 0
    monkeypatch.setattr(T, "row_parts", parts)
    assert len(seen_ref) == 12 and Counter(i for b in seen_ref for i in b) == {i: 2 for i in range(24)}

    out = tmp_path / "run"
    argv = _args(tiny_model_dir, data, out, cache)
    resume = [*argv, "--resume", "latest"]

    # 1. killed at the start of step 6: step-4 is the newest checkpoint; steps 5-6 are lost.
    run1 = Run(tmp_path, "run1", argv, "step:6")
    run1.wait_for_hang_then_kill()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-4"]
    committed = ckpt.read_state(ckpt.list_checkpoints(out)[-1])
    assert committed["micro_batches"] == 4 and committed["pairs_seen"] == 16

    # 2. resumed, then killed in the middle of writing step-8 (model written, optimizer not).
    run2 = Run(tmp_path, "run2", resume, "save:8")
    run2.wait_for_hang_then_kill()
    tmp_dir = out / "checkpoints" / ".tmp-step-8"
    assert tmp_dir.is_dir() and not (tmp_dir / ckpt.STATE_FILE).exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-4"]  # the half-written one does not count

    # 3. resumed again (from step-4), killed while final/ is being written.
    run3 = Run(tmp_path, "run3", resume, "final")
    run3.wait_for_hang_then_kill()
    assert (out / ".tmp-final").is_dir() and not (out / "final").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-4", "step-8", "step-12"]
    assert not tmp_dir.exists()  # the next save cleaned up the interrupted write

    # 4. resumed at step 12: nothing left to train, final/ is written.
    run4 = Run(tmp_path, "run4", resume, None)
    run4.finish()

    # Every pair was trained on exactly as often, in the same order, as without the kills.
    seen = run1.batches()[:4] + run3.batches()[:8] + run4.batches()
    assert run2.batches()[:4] == seen_ref[4:8]  # the replayed steps are the lost ones
    assert seen == seen_ref
    final_state = ckpt.read_state(ckpt.list_checkpoints(out)[-1])
    assert final_state["pairs_seen"] == 48 and final_state["micro_batches"] == 12

    assert _metrics(out) == _metrics(ref_out)
    got, want = load_file(out / "final" / "model.safetensors"), load_file(ref_out / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------------------- non-finite steps


def _cfg(model: Path, data: Path, out: Path, cache: Path, **kw):
    flags = dict(model=str(model), data=str(data), output_dir=str(out), cache_dir=str(cache), batch_size=4,
                 learning_rate=1e-3, logging_steps=1, progress=False, shuffle=False)
    flags.update(kw)
    return build_config(flags)


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose backward blows up."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _inject(monkeypatch, bad_loss_steps: set[int], bad_grad_steps: set[int]) -> list[dict[str, torch.Tensor]]:
    """Patch the step's pieces; return the list of weight snapshots taken at the start of each step.

    A step (grad-accum 1) is one micro-batch, which the loop may run as several rows: row_parts
    marks the start of a step, and every forward of that step's rows gets the injection.
    """
    forward, parts = T.forward_loss, T.row_parts
    snapshots: list[dict[str, torch.Tensor]] = []
    new_step = [False]

    def patched_parts(batch, *args, **kwargs):
        new_step[0] = True
        return parts(batch, *args, **kwargs)

    def patched(model, batch, *args, **kwargs):
        losses, out, pol = forward(model, batch, *args, **kwargs)
        if model.training:
            if new_step[0]:
                snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                new_step[0] = False
            step = len(snapshots)
            if step in bad_loss_steps:
                losses = losses * float("nan")
            if step in bad_grad_steps:
                losses = _NanGrad.apply(losses)
        return losses, out, pol

    monkeypatch.setattr(T, "forward_loss", patched)
    monkeypatch.setattr(T, "row_parts", patched_parts)
    return snapshots


def _same(a: dict, b: dict) -> bool:
    """Equal weights; keys may differ by a wrapper prefix ("model.") between a live module and a saved file."""
    def bare(d):
        return {k.removeprefix("model."): v for k, v in d.items()}

    a, b = bare(a), bare(b)
    keys = a.keys() & b.keys()
    assert len(keys) >= 10
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, tiny_model_dir, pref_files, monkeypatch):
    snaps = _inject(monkeypatch, bad_loss_steps={3}, bad_grad_steps={5})
    cfg, explicit = _cfg(tiny_model_dir, pref_files[0], tmp_path / "out", tmp_path / "cache", max_steps=7)
    T.train(cfg, explicit)
    # snapshot k+1 is the state after step k: steps 3 and 5 changed nothing, the others did
    after = snaps[1:] + [load_file(tmp_path / "out" / "final" / "model.safetensors")]
    for step in range(1, 8):
        before, now = snaps[step - 1], after[step - 1]
        if step in (3, 5):
            assert _same(before, now), f"step {step} was not skipped"
        elif step < 7:
            assert not _same(before, now), f"step {step} did not update"
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 1, 1, 2, 2, 2]
    assert "loss" not in rows[2] and "loss" not in rows[4]  # skipped steps stay out of the averages
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i not in (2, 4))


def test_too_many_nonfinite_steps_in_a_row_stop_with_last_good_checkpoint(tmp_path, tiny_model_dir, pref_files,
                                                                          monkeypatch, capsys):
    snaps = _inject(monkeypatch, bad_loss_steps={5, 6, 7, 8, 9}, bad_grad_steps=set())
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(pref_files[0]), "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--learning-rate", "1e-3",
            "--logging-steps", "1", "--no-progress", "--no-shuffle", "--max-steps", "20", "--save-steps", "2",
            "--max-nonfinite-steps", "3"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "3 non-finite steps in a row (step 7)" in err and "Traceback" not in err
    assert len(snaps) == 7
    newest = ckpt.list_checkpoints(out)[-1]
    assert newest.name == "step-6"  # written after 2 skipped steps: the weights are still step 4's
    weights = load_file(newest / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert _same(snaps[4], weights)  # state at the start of step 5 = after step 4
    assert not (out / "final").exists()

    # The library raises the same error as the CLI reports (the injection counts steps afresh).
    snaps.clear()
    cfg, explicit = _cfg(tiny_model_dir, pref_files[0], tmp_path / "lib", tmp_path / "cache", max_steps=20,
                         max_nonfinite_steps=2, save_steps=None)
    with pytest.raises(TrainingError, match="2 non-finite steps in a row"):
        T.train(cfg, explicit)


def test_loss_stuck_at_ln2_warns(tmp_path, tiny_model_dir, pref_files, caplog):
    """A learning rate too small for float32 leaves the policy equal to the reference."""
    cfg, explicit = _cfg(tiny_model_dir, pref_files[0], tmp_path / "out", tmp_path / "cache", max_steps=21,
                         batch_size=2, learning_rate=1e-15, ref_cache=False)
    with caplog.at_level("WARNING", logger="prefopt"):
        T.train(cfg, explicit)
    assert "loss has stayed at ln 2 with zero margins for 20 steps" in caplog.text
    # and a policy that moves gets no such warning
    caplog.clear()
    cfg, explicit = _cfg(tiny_model_dir, pref_files[0], tmp_path / "moving", tmp_path / "cache", max_steps=21,
                         batch_size=2, learning_rate=1e-3)
    with caplog.at_level("WARNING", logger="prefopt"):
        T.train(cfg, explicit)
    assert "ln 2" not in caplog.text


# ---------------------------------------------------------------------------- disk full, unwritable


@pytest.mark.parametrize("err, why", [(errno.ENOSPC, "the disk is full"),
                                      (errno.EACCES, "the output directory is not writable")])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, tiny_model_dir, pref_files, monkeypatch, err, why):
    from accelerate import Accelerator

    save_state, calls = Accelerator.save_state, [0]

    def failing(self, output_dir, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            Path(output_dir, "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
            Path(output_dir, "model.safetensors").write_bytes(b"half")  # a partial write, then the failure
            raise OSError(err, os.strerror(err))
        return save_state(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", failing)
    out = tmp_path / "out"
    cfg, explicit = _cfg(tiny_model_dir, pref_files[0], out, tmp_path / "cache", max_steps=6, save_steps=2)
    with pytest.raises(CheckpointError, match=why) as info:
        T.train(cfg, explicit)
    assert "checkpoints/step-4" in str(info.value) and "--resume latest" in str(info.value)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-2"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert ckpt.read_state(out / "checkpoints" / "step-2")["step"] == 2
    load_file(out / "checkpoints" / "step-2" / "model.safetensors")

    # Once there is room again, --resume latest continues from step 2 and finishes.
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    cfg, explicit = _cfg(tiny_model_dir, pref_files[0], out, tmp_path / "cache", max_steps=6, save_steps=2,
                         resume="latest")
    T.train(cfg, explicit)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-2", "step-4", "step-6"]
    assert (out / "final" / "model.safetensors").exists()


def test_disk_full_while_writing_final_is_a_clear_error(tmp_path, tiny_model_dir, pref_files, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(pref_files[0]), "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--max-steps", "2", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and str(out / "final") in err and "Traceback" not in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-2"]


def test_resume_tolerates_a_metrics_line_cut_by_a_kill(tmp_path):
    class Main:
        is_main_process = True

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.6}\n{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.4}\n{"step": 4, "lo')
    T._truncate_metrics(path, 2, Main())
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_ln2_count_survives_a_resume(tmp_path, tiny_model_dir, pref_files, caplog):
    """12 stuck steps, a checkpoint, a resume and 9 more: the warning comes at step 20 all the same."""
    out = tmp_path / "out"
    common = dict(batch_size=2, learning_rate=1e-15, ref_cache=False, save_steps=12)
    cfg, explicit = _cfg(tiny_model_dir, pref_files[0], out, tmp_path / "cache", max_steps=12, **common)
    with caplog.at_level("WARNING", logger="prefopt"):
        T.train(cfg, explicit)
    assert "ln 2" not in caplog.text
    cfg, explicit = _cfg(tiny_model_dir, pref_files[0], out, tmp_path / "cache", max_steps=21, resume="latest",
                         **common)
    with caplog.at_level("WARNING", logger="prefopt"):
        T.train(cfg, explicit)
    assert "loss has stayed at ln 2 with zero margins for 20 steps" in caplog.text
