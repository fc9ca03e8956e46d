"""CI installs and tests exactly as the README tells a user to (the developers' rule), pinned."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "pytest" in l and "pip install" in l)
    return line.split("&&", 2)[2].strip()  # after `python3 -m venv .venv && . .venv/bin/activate`


def test_ci_runs_the_readme_install_and_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    install, test = (c.strip() for c in _readme_test_command().split("&& python -m pytest"))
    ci_install = next(l for l in ci if l.startswith("pip install"))
    assert ci_install.replace(" -q", "") == install
    assert "python -m pytest " + test in ci


def test_constraints_pin_the_stack_and_leave_torch_to_the_command_line():
    pins = {}
    for line in (ROOT / "constraints" / "ci.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints/ci.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = version
    assert "torch" not in pins and "prefopt" not in pins
    for dep in ("transformers", "accelerate", "datasets", "peft", "tokenizers", "deepspeed", "pytest"):
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", pins.get(dep, "")), f"{dep} not pinned"
    assert "-c constraints/ci.txt" in _readme_test_command()
