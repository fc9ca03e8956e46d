"""Charts of training runs and of reward-vs-KL frontiers (`prefopt plot`).

Training charts are read from each run's ``metrics.jsonl`` (one JSON object per logged
step; evaluation rows carry ``eval/...`` keys). Several runs are drawn on the same axes,
one line each, labelled with the run directory's name. A metric no run logged (SFT runs
have no rewards, for example) gets no chart.

The frontier chart places each generation evaluation at (KL from the reference, mean
reward), the picture of the DPO paper's Figure 2 (left): a better method reaches more
reward for the same KL. Its points come from JSON files of three shapes:

* ``prefopt eval --generate`` results: ``kl`` and ``policy_reward_mean``;
* any object with ``kl`` and ``reward`` (optionally ``label`` and ``method``);
* an object with a ``points`` list of such objects (the demo's ``summary.json`` and the
  reproduction's results).

An iterate directory (`prefopt iterate`, holding ``rounds.jsonl``) gets a chart by round:
the judge's reward and KL(policy || SFT) against the round, and reward against KL with
the rounds joined in order, so the path the rounds took is seen next to the frontier.

matplotlib runs with the non-interactive Agg backend: no display is needed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefopt.errors import DataError

#: One chart per entry: file name, title, y label, metric keys drawn on it.
TRAIN_CHARTS: list[tuple[str, str, str, list[str]]] = [
    ("loss.png", "Training loss", "loss", ["loss"]),
    ("rewards.png", "Implicit rewards  beta * log(pi / pi_ref)", "reward",
     ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("accuracy.png", "Reward accuracy (chosen reward > rejected reward)", "accuracy", ["rewards/accuracies"]),
    ("logps.png", "Policy log-probabilities of the completions", "log-prob", ["logps/chosen", "logps/rejected"]),
    ("eval.png", "Held-out evaluation", "value",
     ["eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"]),
]


def _pyplot():
    import logging

    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` (unreadable lines are an error naming the line)."""
    return [row for _, row in _jsonl(Path(run_dir) / "metrics.jsonl", "metrics")
            if isinstance(row, dict) and "step" in row]


def _jsonl(path: Path, what: str) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line; unreadable files and lines are errors naming them."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {what} ({e.strerror or e})", source=str(path)) from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", source=str(path), line=number) from None
    return rows


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding metrics.jsonl) among ``paths`` and, for a directory that is
    not a run itself, among its immediate sub-directories (e.g. the demo's sft/ and dpo/)."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise DataError("not a directory", source=str(p))
        if (p / "metrics.jsonl").is_file():
            runs.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / "metrics.jsonl").is_file())
        if not subs:
            raise DataError("holds no metrics.jsonl (nor do its sub-directories); is it a prefopt run directory?",
                            source=str(p))
        runs.extend(subs)
    return runs


def _label(run: Path, runs: list[Path]) -> str:
    names = [r.name for r in runs]
    if names.count(run.name) > 1:
        return f"{run.parent.name}/{run.name}"
    return run.name


def plot_runs(run_dirs: list[str | Path], output_dir: str | Path) -> list[Path]:
    """Write the training charts of one or several runs; returns the PNG paths written."""
    plt = _pyplot()
    runs = find_runs(run_dirs)
    data = {run: read_metrics(run) for run in runs}
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, ylabel, keys in TRAIN_CHARTS:
        series = []
        for run, rows in data.items():
            for key in keys:
                pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
                if pts:
                    series.append((run, key, pts))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for run, key, pts in series:
            xs, ys = zip(*pts)
            label = key if len(runs) == 1 else f"{_label(run, runs)}: {key}"
            style = "o-" if len(pts) < 4 else "-"
            ax.plot(xs, ys, style, label=label, markersize=3, linewidth=1.4)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1 or len(runs) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def frontier_points(obj: Any, source: str = "") -> list[dict[str, Any]]:
    """(kl, reward, label, method) points found in one parsed JSON document."""
    if isinstance(obj, dict) and isinstance(obj.get("points"), list):
        pts = []
        for p in obj["points"]:
            pts.extend(frontier_points(p, source))
        return pts
    if not isinstance(obj, dict):
        return []
    reward = obj.get("reward", obj.get("policy_reward_mean"))
    kl = obj.get("kl")
    if not isinstance(reward, (int, float)) or not isinstance(kl, (int, float)):
        return []
    label = obj.get("label") or Path(str(obj.get("policy") or source)).name or "policy"
    return [{"kl": float(kl), "reward": float(reward), "label": str(label),
             "method": str(obj.get("method") or label), "kl_stderr": obj.get("kl_stderr"),
             "reward_stderr": obj.get("reward_stderr", obj.get("policy_reward_stderr"))}]


def read_frontier_files(files: list[str | Path]) -> list[dict[str, Any]]:
    """Points of every file; a file without any is an error that says what shape is expected."""
    points = []
    for f in map(Path, files):
        try:
            obj = json.loads(f.read_text(encoding="utf-8"))
        except OSError as e:
            raise DataError(f"cannot read ({e.strerror or e})", source=str(f)) from None
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg}", source=str(f), line=e.lineno) from None
        found = frontier_points(obj, f.stem)
        if not found:
            raise DataError("holds no generation-eval result: expected 'kl' with 'reward' or "
                            "'policy_reward_mean' (as written by eval --generate), or a 'points' list of those",
                            source=str(f))
        points.extend(found)
    return points


def detect_frontier_files(paths: list[str | Path]) -> list[Path]:
    """JSON files directly inside ``paths`` that hold generation-eval results."""
    found = []
    for p in map(Path, paths):
        if not p.is_dir():
            continue
        for f in sorted(p.glob("*.json")):
            try:
                obj = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if frontier_points(obj, f.stem):
                found.append(f)
    return found


def plot_frontier(points: list[dict[str, Any]], path: str | Path, *, title: str | None = None,
                  reward_label: str = "mean reward (judge)", log_kl: bool | None = None) -> Path:
    """Reward against KL, one colour per method; points of a method are joined in KL order.

    ``log_kl`` draws KL on a symmetric-log axis (linear near 0), for points whose KLs
    span orders of magnitude; by default it is used when the largest KL is over 20 times
    the median of the positive ones.
    """
    plt = _pyplot()
    if not points:
        raise DataError("no points to draw a reward-vs-KL chart from")
    methods: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        methods.setdefault(p["method"], []).append(p)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    markers = "osD^vP*Xh<>"
    for n, (method, pts) in enumerate(methods.items()):
        pts = sorted(pts, key=lambda p: p["kl"])
        xs = [p["kl"] for p in pts]
        ys = [p["reward"] for p in pts]
        xerr = [p.get("kl_stderr") or 0.0 for p in pts]
        yerr = [p.get("reward_stderr") or 0.0 for p in pts]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=markers[n % len(markers)] + ("-" if len(pts) > 1 else ""),
                    label=method, capsize=2, markersize=6, linewidth=1.2, alpha=0.9)
        for p in pts:
            if p["label"] != method:
                ax.annotate(p["label"], (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    kls = sorted(p["kl"] for p in points if p["kl"] > 0)
    if log_kl is None:
        log_kl = bool(kls) and kls[-1] > 20 * kls[len(kls) // 2]
    if log_kl:
        ax.set_xscale("symlog", linthresh=0.5)
    ax.set_xlabel("KL(policy || reference), nats per completion" + (" (symlog scale)" if log_kl else ""))
    ax.set_ylabel(reward_label)
    ax.set_title(title or "Reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi=120)


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Lay the figure out, write it as a PNG (creating its directory) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def is_iterate_dir(path: str | Path) -> bool:
    """True for a `prefopt iterate` output directory (it holds rounds.jsonl)."""
    return (Path(path) / "rounds.jsonl").is_file()


def read_rounds(iterate_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``DIR/rounds.jsonl``, in round order (unreadable lines are an error naming the line)."""
    path = Path(iterate_dir) / "rounds.jsonl"
    rows = []
    for number, row in _jsonl(path, "rounds"):
        if not (isinstance(row, dict) and all(isinstance(row.get(k), (int, float)) for k in ("round", "reward_mean",
                                                                                            "kl"))):
            raise DataError("a round's record needs numbers 'round', 'reward_mean' and 'kl'", source=str(path),
                            line=number)
        rows.append(row)
    if not rows:
        raise DataError("holds no rounds yet", source=str(path))
    return sorted(rows, key=lambda r: r["round"])


def plot_rounds(iterate_dirs: list[str | Path], path: str | Path, *, reward_label: str = "mean judge reward") -> Path:
    """One PNG, three panels: reward by round, KL(policy || SFT) by round, and reward against KL.

    Several iterate runs are drawn on the same axes, one line each, labelled by directory name.
    """
    plt = _pyplot()
    runs = [(Path(d).name or str(d), read_rounds(d)) for d in iterate_dirs]
    fig, (ax_r, ax_k, ax_f) = plt.subplots(1, 3, figsize=(14, 4.2))
    for label, rows in runs:
        rounds = [r["round"] for r in rows]
        rewards = [r["reward_mean"] for r in rows]
        kls = [r["kl"] for r in rows]
        r_err = [r.get("reward_stderr") or 0.0 for r in rows]
        k_err = [r.get("kl_stderr") or 0.0 for r in rows]
        ax_r.errorbar(rounds, rewards, yerr=r_err, fmt="o-", capsize=2, label=label)
        ax_k.errorbar(rounds, kls, yerr=k_err, fmt="o-", capsize=2, label=label)
        ax_f.errorbar(kls, rewards, xerr=k_err, yerr=r_err, fmt="o-", capsize=2, label=label)
        for n, x, y in zip(rounds, kls, rewards):
            ax_f.annotate(f"r{n}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax_r.set(title="Reward by round", xlabel="round (0 = SFT model)", ylabel=reward_label)
    ax_k.set(title="KL from the SFT model by round", xlabel="round (0 = SFT model)",
             ylabel="KL(policy || SFT), nats per completion")
    ax_f.set(title="Reward vs KL through the rounds", xlabel="KL(policy || SFT), nats per completion",
             ylabel=reward_label)
    for ax in (ax_r, ax_k):
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in (ax_r, ax_k, ax_f):
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    return _save(fig, path, dpi=110)


def iterate_train_runs(iterate_dir: str | Path) -> list[Path]:
    """The training runs of an iterate directory's rounds (round-N/train), in round order."""
    found = []
    for d in Path(iterate_dir).glob("round-*/train"):
        suffix = d.parent.name.removeprefix("round-")
        if suffix.isdigit() and (d / "metrics.jsonl").is_file():
            found.append((int(suffix), d))
    return [d for _, d in sorted(found)]
