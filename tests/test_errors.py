"""Bad input to every command: the exact error class in-process, and through the CLI exit
status 2, one message naming the file/line/field or the option, and no traceback.

The corpus is tests/malformed/cases.py (with the bad files beside it). Also here: the
security rules (no unpickling, no remote code, no network for local paths), the
pad-token fallback and the ``--on-invalid skip`` path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_pairs
from prefopt import cli

os.environ["HF_HUB_OFFLINE"] = "1"
HERE = Path(__file__).resolve().parent
MALFORMED = HERE / "malformed"
REPO = HERE.parent

_spec = importlib.util.spec_from_file_location("malformed_cases", MALFORMED / "cases.py")
cases = importlib.util.module_from_spec(_spec)
sys.modules["malformed_cases"] = cases
_spec.loader.exec_module(cases)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: hub lookups are offline and any socket connection is recorded and refused."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("PREFOPT_CACHE", str(tmp_path / "cache"))
    attempts = []

    def refuse(self, address):
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def context(tiny_model_dir, tmp_path_factory):
    built: list[Path] = []

    def finished_run() -> Path:
        if not built:
            out = tmp_path_factory.mktemp("finished") / "out"
            argv = ["train", "--model", str(tiny_model_dir), "--data", str(MALFORMED / "single_row.jsonl"),
                    "--output-dir", str(out), "--max-steps", "1", "--save-steps", "1", "--no-progress",
                    "--cache-dir", str(out.parent / "cache")]
            assert cli.main(argv) == 0
            built.append(out)
        return built[0]

    return cases.Context(model=tiny_model_dir, finished_run=finished_run)


def _argv(case, context, tmp_path: Path, good_data: Path) -> list[str]:
    work = tmp_path / "work"
    work.mkdir()
    if case.setup:
        case.setup(work, context)
    values = {"M": str(context.model), "D": str(good_data), "O": str(tmp_path / "out"), "X": str(MALFORMED),
              "W": str(work)}
    return [a.format(**values) for a in case.argv]


def test_corpus_is_large_and_distinct():
    ids = [c.id for c in cases.CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    kinds = {c.error.__name__ for c in cases.CASES}
    assert {"DataError", "ConfigError", "ModelError", "CheckpointError", "SystemExit"} <= kinds


@pytest.mark.parametrize("case", cases.CASES, ids=lambda c: c.id)
def test_malformed_input(case, context, tmp_path, pref_files, capsys):
    argv = _argv(case, context, tmp_path, pref_files[1])
    parser = cli.build_parser()

    # 1. in-process: the command's own function raises exactly the expected class
    if case.error is SystemExit:
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
    else:
        args = parser.parse_args(argv)
        with pytest.raises(case.error) as info:
            args.func(args)
        assert type(info.value) is case.error
    capsys.readouterr()

    # 2. through the CLI: exit 2, the fragments on stderr, no traceback
    if case.error is SystemExit:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        code = info.value.code
    else:
        code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in case.expect:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    if case.error is not SystemExit:
        assert re.search(rf"^prefopt {argv[0]}: error: ", err, re.M), err
    if case.must_not_exist:
        assert not (tmp_path / "work" / case.must_not_exist).exists(), "untrusted code ran"


@pytest.mark.slow
def test_cli_subprocess_has_no_traceback(tmp_path):
    """The real entry point, once for a data error and once for an option error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for argv, needle in ((["data", "check", str(MALFORMED / "no_such.jsonl")], "no_such.jsonl: file not found"),
                         (["train", "--beta", "-1", "--model", "m", "--data", "d", "--output-dir", str(tmp_path)],
                          "--beta: must be > 0")):
        done = subprocess.run([sys.executable, "-m", "prefopt.cli", *argv], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------- --on-invalid


def test_on_invalid_skip_drops_rows_and_writes_them(tmp_path, tiny_model_dir, capsys, caplog):
    rows = make_pairs(8, seed=3)
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({"prompt": "the sky:", "chosen": None, "rejected": " grey"})
    lines[5] = json.dumps({"prompt": "the sky:", "chosen": " warm"})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "1", "--no-progress"]
    assert cli.main(argv) == 2  # the default stops before training, listing the problems
    err = capsys.readouterr().err
    assert "2 invalid row(s)" in err and "line 3, field 'chosen': is null" in err
    assert "line 6, field 'rejected': missing" in err and not (out / "checkpoints").exists()

    with caplog.at_level("WARNING", logger="prefopt"):
        assert cli.main([*argv, "--on-invalid", "skip", "--overwrite"]) == 0
    assert "skipped 2 invalid row(s)" in caplog.text and "rejected_rows.jsonl" in caplog.text
    rejected = [json.loads(line) for line in (out / "rejected_rows.jsonl").read_text().splitlines()]
    assert [(r["line"], r["errors"]) for r in rejected] == [(3, ["is null"]), (6, [
        "missing (the row has fields: prompt, chosen)"])]
    assert rejected[0]["row"]["rejected"] == " grey"
    assert "6 rows read" in capsys.readouterr().out


# ---------------------------------------------------------------------------- models and security


def test_tokenizer_without_pad_uses_eos_and_says_so(tmp_path, tiny_model_dir, caplog):
    import shutil

    from prefopt.modeling import load_tokenizer

    d = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["pad_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="prefopt"):
        tok = load_tokenizer(str(d))
    assert tok.pad_token_id == tok.eos_token_id is not None
    assert "has no pad token: using EOS" in caplog.text


def test_no_unsafe_deserialisation_in_the_source():
    """Every torch.load passes weights_only=True; nothing calls pickle/unpickle on files directly."""
    offenders = []
    for path in (REPO / "prefopt").rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                offenders.append(f"{path.name}: {m.group(0)}")
        for m in re.finditer(r"\b(pickle|dill|cloudpickle|joblib)\.loads?\(|weights_only\s*=\s*False", text):
            offenders.append(f"{path.name}: {m.group(0)}")
    assert not offenders


def test_remote_code_is_off_unless_asked():
    from prefopt.config import TrainConfig

    assert TrainConfig().trust_remote_code is False
    args = cli.build_parser().parse_args(["data", "check", "f.jsonl"])
    assert args.trust_remote_code is False


def test_local_paths_never_look_like_hub_names(tmp_path, monkeypatch):
    """A relative path that does not exist is refused as a path when it looks like one."""
    from prefopt.errors import ModelError
    from prefopt.modeling import load_tokenizer

    monkeypatch.chdir(tmp_path)
    for name in ("./model", "../model", "runs/a/model", "~/no/such/model"):
        with pytest.raises(ModelError, match="not found"):
            load_tokenizer(name)


def test_corrupt_reference_cache_is_recomputed(tmp_path, tiny_model_dir, pref_files):
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(pref_files[1]), "--max-steps", "1",
            "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "a")]) == 0
    (cached,) = (tmp_path / "cache" / "ref_logps").glob("*.safetensors")
    cached.write_bytes(b"\x00" * 16)
    assert cli.main([*argv, "--output-dir", str(tmp_path / "b")]) == 0
    from safetensors.torch import load_file

    assert load_file(cached)["logps"].shape == (32, 2)
