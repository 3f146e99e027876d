"""The demo's figures (PNG, from the RL run's metrics.jsonl) and its before/after table."""

from __future__ import annotations

import json
from pathlib import Path

# The figures of `thinkless-train plot` (a trailing moving average on top: each RL step sees only 4-5 prompts of a
# level), one line per level here.
from thinkless.train.plot import figure, series

FIGURES = {
    "think_ratio": ("think_ratio.png", "share of samples that open with <think>", (0.0, 1.0)),
    "accuracy": ("accuracy.png", "accuracy of the samples", (0.0, 1.0)),
    "mean_tokens": ("response_length.png", "response tokens (mean)", None),
}


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line an interruption cut short
    return rows


def plot_metrics(metrics: Path, levels: list[str], out_dir: Path, title: str = "") -> list[Path]:
    """One figure per metric, one line per level (easiest first, viridis), against the RL step."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics) if Path(metrics).is_file() else []
    written = []
    for key, (file, label, ylim) in FIGURES.items():
        lines, colors = [], []
        for i, level in enumerate(levels):
            steps, values = series(rows, f"{key}/{level}")
            if steps:
                lines.append((level, steps, values))
                colors.append(plt.get_cmap("viridis")(i / max(1, len(levels) - 1)))
        written.append(figure(plt, out_dir / file, title, label, ylim, lines, colors=colors, legend_title="level"))
    return written


def format_table(report: dict) -> str:
    """Warm-up vs final, per level: accuracy, think ratio, mean response tokens."""
    head = f"{'level':>10} | {'accuracy':^15} | {'think ratio':^15} | {'tokens':^15}"
    sub = f"{'':>10} | {'warm-up':>7} {'final':>7} | {'warm-up':>7} {'final':>7} | {'warm-up':>7} {'final':>7}"
    lines = [head, sub, "-" * len(sub)]
    for lv in report["levels"]:
        w, f = lv["warmup"], lv["final"]
        lines.append(
            f"{lv['name']:>10} | {w['accuracy']:7.3f} {f['accuracy']:7.3f} | {w['think_ratio']:7.2f} "
            f"{f['think_ratio']:7.2f} | {w['mean_tokens']:7.1f} {f['mean_tokens']:7.1f}"
        )
    n = len(report["levels"])
    mean = lambda stage, key: sum(lv[stage][key] for lv in report["levels"]) / n  # noqa: E731
    lines.append("-" * len(sub))
    lines.append(
        f"{'mean':>10} | {mean('warmup', 'accuracy'):7.3f} {mean('final', 'accuracy'):7.3f} | "
        f"{mean('warmup', 'think_ratio'):7.2f} {mean('final', 'think_ratio'):7.2f} | "
        f"{mean('warmup', 'mean_tokens'):7.1f} {mean('final', 'mean_tokens'):7.1f}"
    )
    return "\n".join(lines)


def print_table(report: dict) -> None:
    alpha = f" (alpha={report['alpha']})" if report["algorithm"] == "DeGRPO" else ""
    print(f"\n{report['algorithm']}{alpha}, {report['seconds'] / 60:.1f} min")
    print(format_table(report))
