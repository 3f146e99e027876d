"""`thinkless-train plot RUN_DIR`: the figures of an RL run, from its `metrics.jsonl`, as PNGs in `RUN_DIR/plots/`.

    think_ratio.png      share of samples opening with <think> (and per tag, with data.tag_key)
    accuracy.png         accuracy of all samples, of the short ones, of the think ones
    response_length.png  mean response tokens, overall and per mode
    reward.png           mean reward
    validation.png       val/<file>/accuracy and think_ratio, when the run validated (trainer.val_every)

Each figure is against the RL step: the raw values faint, a trailing moving average over about a twentieth of the
run on top (a step holds a few prompts' samples: the raw line is noisy). A step without any sample of a mode has no
point for that mode (its figures are None there; runs of thinkless 0.1 logged 0, which is no accuracy). Matplotlib's
Agg backend: files only, no display (servers, CI).
"""

from __future__ import annotations

import json
from pathlib import Path

from thinkless.modes import LEGACY_NAMES, LEGACY_TAG_NAMES
from thinkless.train.data import DataError

# file -> (y label, y range, [(metric key, legend label, the mode whose samples it needs or None)])
FIGURES = {
    "think_ratio.png": ("share of samples that open with <think>", (0.0, 1.0), [("think_ratio", "all", None)]),
    "accuracy.png": (
        "accuracy",
        (0.0, 1.0),
        [("accuracy", "all", None), ("accuracy_short", "<short>", "short"), ("accuracy_think", "<think>", "think")],
    ),
    "response_length.png": (
        "response tokens (mean)",
        None,
        [
            ("mean_tokens", "all", None),
            ("mean_tokens_short", "<short>", "short"),
            ("mean_tokens_think", "<think>", "think"),
        ],
    ),
    "reward.png": ("reward (mean)", None, [("reward_mean", "all", None)]),
}


def read_rows(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, in step order; a DataError when it holds no RL step (a think ratio)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (give a run's trainer.output_dir)")
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no such file (is {folder} a run folder?)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line an interruption cut short
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    if not any("think_ratio" in r for r in rows):
        raise DataError(f"{path}: no RL steps (rows with think_ratio); plot draws an rl run, not an sft one")
    return sorted(rows, key=lambda r: r["step"])


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` steps (a step's figures come from a few prompts)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _has_mode(row: dict, mode: str | None) -> bool:
    """Whether the step sampled the mode (its think ratio is strictly between the mode's absence and 1)."""
    ratio = row.get("think_ratio")
    if mode is None or not isinstance(ratio, (int, float)):
        return True
    return ratio > 0 if mode == "think" else ratio < 1


def metric(row: dict, key: str) -> float | None:
    """A row's figure under its `thinkless.modes` name, or under the name thinkless 0.1 gave it (older runs: `acc`
    for `accuracy`, `response_tokens/<tag>` for `mean_tokens/<tag>`); None when the row has no number for it."""
    value = row.get(key)
    if key not in row:  # (a row with the key and None: the step had no sample of the mode, whatever the alias says)
        name, _, tag = key.partition("/")
        names = LEGACY_TAG_NAMES if tag else LEGACY_NAMES
        old = next((o for o, new in names.items() if new == name), None)
        value = row.get(f"{old}/{tag}" if tag else old) if old else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def series(rows: list[dict], key: str, mode: str | None = None) -> tuple[list, list]:
    points = [(r["step"], metric(r, key)) for r in rows if metric(r, key) is not None and _has_mode(r, mode)]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])


def figure(
    plt, path: Path, title: str, ylabel: str, ylim, lines: list[tuple[str, list, list]], *, colors: list | None = None,
    legend_title: str | None = None,
) -> Path:  # fmt: skip
    """One PNG: each (label, steps, values) line raw and faint, its moving average on top; `colors` one per line
    (default: matplotlib's tab10 cycle)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colors = colors or [plt.get_cmap("tab10")(i % 10) for i in range(len(lines))]
    n = max((len(v) for _, _, v in lines), default=0)
    window = max(1, n // 20)
    for (label, steps, values), color in zip(lines, colors, strict=True):
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        marker = "o" if len(values) <= 30 else None  # a few points (validation, a short run): show each
        ax.plot(steps, smooth(list(values), window), color=color, label=label, linewidth=2, marker=marker)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(f"{title}: {ylabel}" if title else ylabel, fontsize=10)
    ax.grid(alpha=0.3)
    if len(lines) > 1 or legend_title:
        ax.legend(title=legend_title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """The run's figures (see the module's doc) in `out_dir` (default `RUN_DIR/plots/`); the paths written."""
    every = read_rows(run_dir)
    rows = [r for r in every if "think_ratio" in r]  # validation may come in rows of its own
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    title = Path(run_dir).resolve().name
    written = []
    for file, (ylabel, ylim, keys) in FIGURES.items():
        lines = [(label, *series(rows, key, mode)) for key, label, mode in keys]
        if file == "think_ratio.png":  # data.tag_key: one line per tag (e.g. MATH's level)
            tags = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("think_ratio/")})
            lines += [(tag, *series(rows, f"think_ratio/{tag}")) for tag in tags]
        lines = [line for line in lines if line[1]]
        if lines:
            written.append(figure(plt, out / file, title, ylabel, ylim, lines))
    val = sorted({k for r in every for k in r if k.startswith("val/") and k.endswith(("/accuracy", "/think_ratio"))})
    if val:
        lines = [(k.removeprefix("val/"), *series(every, k)) for k in val]
        written.append(figure(plt, out / "validation.png", title, "validation", (0.0, 1.0), lines))
    return written
