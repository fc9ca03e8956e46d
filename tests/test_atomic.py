"""prefopt.atomic: the one atomic-write primitive, and checkpoints written by several processes through it."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from prefopt import atomic
from prefopt import checkpoint as ckpt
from prefopt.atomic import atomic_path, write_json, write_jsonl, write_text
from prefopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


class Boom(Exception):
    pass


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _make_tree(path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)


# ---------------------------------------------------------------------------- files


def test_file_appears_whole_on_success_and_not_before(tmp_path):
    target = tmp_path / "sub" / "out.json"  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and tmp.is_file()
        tmp.write_text("new")
        assert not target.exists()  # nothing at the target until the body is done
    assert target.read_text() == "new"
    assert os.listdir(target.parent) == ["out.json"]


def test_file_replacement_keeps_the_old_file_until_the_rename(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        tmp.write_text("new, half")
        assert target.read_text() == "old"  # a reader meanwhile sees the old file whole
    assert target.read_text() == "new, half"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_exception_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise Boom
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]

    fresh = tmp_path / "fresh.txt"
    with pytest.raises(KeyboardInterrupt):  # not only Exception: an interrupt cleans up too
        with atomic_path(fresh) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["out.txt"]


def test_the_written_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_text(tmp_path / "f.txt", "x")
    assert events[:2] == ["fsync", "replace"]  # the data, then the name (then the folder)
    assert events[2:] == ["fsync"]


def test_concurrent_writers_get_their_own_temporaries(tmp_path):
    target = tmp_path / "f.txt"
    with atomic_path(target) as a, atomic_path(target) as b:
        assert a != b
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the last rename wins (a's, the outer block's), whole
    assert os.listdir(tmp_path) == ["f.txt"]


def test_new_files_follow_the_umask_like_open(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    write_text(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == plain.stat().st_mode


def test_conveniences(tmp_path):
    write_json(tmp_path / "a.json", {"k": "é"}, indent=1, ensure_ascii=False)
    assert (tmp_path / "a.json").read_text(encoding="utf-8") == '{\n "k": "é"\n}'
    write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"b": "é"}])
    assert [json.loads(x) for x in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()] == \
        [{"a": 1}, {"b": "é"}]


# ---------------------------------------------------------------------------- directories


def test_directory_appears_whole(tmp_path):
    target = tmp_path / "step-2"
    with atomic_path(target, directory=True) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp == atomic.staging_dir(target)
        _make_tree(tmp, {"a": "1", "sub/b": "2"})
        assert not target.exists()
    assert _tree(target) == {"a": "1", "sub/b": "2"}
    assert os.listdir(tmp_path) == ["step-2"]


def test_directory_exception_keeps_the_old_one_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "step-2"
    target.mkdir()
    _make_tree(target, {"a": "old"})
    with pytest.raises(Boom):
        with atomic_path(target, directory=True) as tmp:
            _make_tree(tmp, {"a": "half"})
            raise Boom
    assert _tree(target) == {"a": "old"}
    assert os.listdir(tmp_path) == ["step-2"]


def test_directory_replaces_an_existing_one(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    _make_tree(target, {"old-only": "x", "a": "old"})
    with atomic_path(target, directory=True) as tmp:
        _make_tree(tmp, {"a": "new"})
        assert _tree(target) == {"old-only": "x", "a": "old"}  # untouched until the body is done
    assert _tree(target) == {"a": "new"}  # replaced, not merged
    assert os.listdir(tmp_path) == ["final"]


def test_a_stale_staging_directory_is_replaced(tmp_path):
    target = tmp_path / "step-4"
    stale = atomic.staging_dir(target)
    stale.mkdir()
    (stale / "junk").write_text("from a crash")
    with atomic_path(target, directory=True) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "a").write_text("1")
    assert _tree(target) == {"a": "1"}
    assert os.listdir(tmp_path) == ["step-4"]


# The operations of atomic_path that change what is on disk, in this module's namespace.
def _crash_at(k: int, monkeypatch) -> None:
    """Make the process die (no cleanup, like kill -9) just before the k-th of them."""
    calls = [0]

    def wrap(fn):
        def crashing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == k:
                os._exit(0)
            return fn(*args, **kwargs)
        return crashing

    for mod, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree"), (atomic, "_exchange"),
                      (atomic, "_remove")):
        monkeypatch.setattr(mod, name, wrap(getattr(mod, name)))


def _replace_in_child(target: Path, k: int, no_exchange: bool) -> None:
    pid = os.fork()
    if pid == 0:  # the child replaces the directory and dies at the k-th step; pytest's fixtures are the parent's
        try:
            mp = pytest.MonkeyPatch()
            if no_exchange:
                mp.setattr(atomic, "_exchange", lambda a, b: False)
            _crash_at(k, mp)
            with atomic_path(target, directory=True) as tmp:
                _make_tree(tmp, {"a": "new", "b": "new"})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.parametrize("no_exchange", [False, True], ids=["exchange", "rename-aside"])
def test_a_crash_at_any_point_of_a_replacement_leaves_old_or_new_whole(tmp_path, no_exchange):
    old, new = {"a": "old", "c": "old"}, {"a": "new", "b": "new"}
    outcomes = set()
    for k in range(1, 12):  # past the last step: the replacement completes
        root = tmp_path / str(k)
        target = root / "step-2"
        target.mkdir(parents=True)
        _make_tree(target, old)
        _replace_in_child(target, k, no_exchange)
        if not no_exchange:  # swapped in one step: the target is whole at every moment
            seen = _tree(target)
        else:  # the old one may be whole aside; the next write (or here, a failed one) puts it back
            with pytest.raises(Boom):
                with atomic_path(target, directory=True):
                    raise Boom
            seen = _tree(target)
        assert seen in (old, new), (k, seen)
        outcomes.add("new" if seen == new else "old")
        with atomic_path(target, directory=True) as tmp:  # and the next write cleans up any leftover
            _make_tree(tmp, {"z": "1"})
        assert os.listdir(root) == ["step-2"] and _tree(target) == {"z": "1"}, k
    assert outcomes == {"old", "new"}  # the crashes did land both before and after the switch


# ---------------------------------------------------------------------------- checkpoints


def test_check_process_group_refuses_lone_processes_of_a_launch(monkeypatch):
    from accelerate.utils import DistributedType

    class Lone:
        num_processes, distributed_type = 1, DistributedType.NO

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="started 2 processes.*overwrite each other's checkpoints"):
        ckpt.check_process_group(Lone())
    Lone.num_processes = 2
    ckpt.check_process_group(Lone())
    monkeypatch.delenv("WORLD_SIZE")
    Lone.num_processes = 1
    ckpt.check_process_group(Lone())


def test_a_safetensors_io_error_is_explained():
    from safetensors import SafetensorError

    e = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "the disk is full" in str(ckpt._explain(e, Path("out/checkpoints/step-2")))
    assert "not writable" in str(ckpt._explain(OSError(errno.EACCES, "Permission denied"), Path("x")))


WORKER = textwrap.dedent(r'''
    import datetime, errno, json, os, sys, time
    from pathlib import Path
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from prefopt import checkpoint as ckpt
    from prefopt.errors import CheckpointError

    rank, out, fail = int(os.environ["RANK"]), Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))

    class ShardingAccelerator:
        """What save_checkpoint uses of accelerate's, with FSDP's/DeepSpeed's habit: every rank writes."""
        num_processes, process_index, is_main_process = 2, rank, rank == 0
        distributed_type = DistributedType.FSDP

        def wait_for_everyone(self):
            dist.barrier()

        def save_state(self, output_dir, safe_serialization=True):
            os.makedirs(output_dir, exist_ok=True)  # as accelerate's does, on every rank
            if rank == 1:
                time.sleep(0.5)  # the slow rank: the main process must not rename before it is done
            if fail == f"rank{rank}":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            Path(output_dir, f"shard_rank{rank}.bin").write_text(f"rank {rank}")

    acc = ShardingAccelerator()
    os.environ["WORLD_SIZE"] = "2"
    result = {"rank": rank}
    try:
        ckpt.save_checkpoint(acc, out, 2, {"step": 2}, None)
        result["ok"] = True
    except CheckpointError as e:
        result["error"] = str(e)
    except RuntimeError as e:  # a peer died: gloo says so
        result["peer"] = str(e).splitlines()[0]
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # as a launcher does with the rest once one process fails: no more collectives
''')


def _save_over_two_ranks(out: Path, fail: str) -> dict[int, dict]:
    out.mkdir(parents=True, exist_ok=True)
    script = out / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(out), fail], env=dict(env, RANK=str(r)))
             for r in range(2)]
    for p in procs:
        p.wait(timeout=120)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}


def test_every_rank_writes_into_the_checkpoint_before_it_is_renamed(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-1").mkdir(parents=True)  # a stale one from a crash
    results = _save_over_two_ranks(out, fail="none")
    assert results[0].get("ok") and results[1].get("ok"), results
    step = out / "checkpoints" / "step-2"
    assert _tree(step) == {"shard_rank0.bin": "rank 0", "shard_rank1.bin": "rank 1",
                           ckpt.STATE_FILE: json.dumps({"step": 2}, indent=1)}
    assert sorted(os.listdir(out / "checkpoints")) == ["step-2"]
    assert ckpt.list_checkpoints(out) == [step]


@pytest.mark.parametrize("failing", ["rank0", "rank1"])
def test_a_rank_failing_leaves_no_checkpoint_by_the_final_name(tmp_path, failing):
    out = tmp_path / "run"
    results = _save_over_two_ranks(out, fail=failing)
    failed = results[int(failing[-1])]
    assert "the disk is full" in failed["error"] and "checkpoints/step-2" in failed["error"], results
    assert not any(r.get("ok") for r in results.values()), results
    assert not (out / "checkpoints" / "step-2").exists()
    assert ckpt.list_checkpoints(out) == []
    # at most the temporary directory is left (rank 1 may recreate it after the main process removed it);
    # the next save removes it (see the stale one in the test above)
    assert set(os.listdir(out / "checkpoints")) <= {".tmp-step-2"}
