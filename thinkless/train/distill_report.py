"""The distill stage's report: what each model got right, what was kept, and how long the kept answers are.

report.json   problems (read, duplicates merged, contaminated per validation file, used), per model its samples
              and verdicts (correct, wrong, format_error, truncated), accuracy and problems solved; rows kept per
              mode; problems with both, one or neither mode; token lengths per mode; rows over data.max_length
report.md     the same as tables
lengths.png   the histogram of the kept responses' token lengths, per mode
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from thinkless.train.rewards import mode_of_text

VERDICTS = ("correct", "wrong", "format_error", "truncated")


def _length_tokenizer(config):
    """`model.path`'s tokenizer (with the control tokens, as `sft` counts), else the short model's own."""
    from thinkless.train.run import resolve_model_path

    if config.model.path:
        from thinkless.train.model import load_tokenizer

        path = resolve_model_path(config.model.path)
        return path, load_tokenizer(path)
    from thinkless.train.distill import teacher_tokenizer

    path = resolve_model_path(config.distill.short_model)
    return path, teacher_tokenizer(path)


def _spread(values: list[int]) -> dict:
    if not values:
        return {"n": 0, "mean": None, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {
        "n": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1],
    }  # fmt: skip


def model_figures(per_problem: list[list], source: str) -> dict:
    """One side's samples ([[response, verdict], ...] per problem) as counts and rates."""
    verdicts = [v for samples in per_problem for _, v in samples]
    counts = {v: verdicts.count(v) for v in VERDICTS}
    solved = sum(any(v == "correct" for _, v in samples) for samples in per_problem)
    return {
        "source": source, "samples": len(verdicts), **counts,
        "accuracy": counts["correct"] / len(verdicts) if verdicts else 0.0,
        "problems": len(per_problem), "problems_solved": solved,
        "problems_without_samples": sum(not samples for samples in per_problem),
    }  # fmt: skip


def write_report(config, out: Path, rows: list[dict], kept: list[dict], samples: dict, counts: dict) -> dict:
    d = config.distill
    sources = {"think": d.think_file or d.think_model, "short": d.short_model}
    solved = [(k["solved"]["think"], k["solved"]["short"]) for k in kept]
    path, tokenizer = _length_tokenizer(config)
    lengths = {"think": [], "short": []}
    encoded = tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"] if rows else []
    for row, ids in zip(rows, encoded, strict=True):
        lengths[mode_of_text(row["response"])].append(len(ids) + 1)  # + the EOS that sft appends
    report = {
        "problems": counts,
        "models": {side: model_figures(samples[side], sources[side]) for side in ("think", "short")},
        "kept_rows": {"think": len(lengths["think"]), "short": len(lengths["short"]), "total": len(rows)},
        "problems_with": {
            "both": solved.count((True, True)),
            "think_only": solved.count((True, False)),
            "short_only": solved.count((False, True)),
            "neither": solved.count((False, False)),
        },  # fmt: skip
        "require_both": d.require_both,
        "dropped_by_require_both": sum(a != b for a, b in solved) if d.require_both else 0,
        "tokens": {"tokenizer": path, **{m: _spread(v) for m, v in lengths.items()}},
        "rows_over_max_length": sum(n > config.data.max_length for v in lengths.values() for n in v),
        "hybrid_file": f"hybrid.{d.format}",  # beside this report
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot_lengths(lengths, out / "lengths.png")
    k = report["kept_rows"]
    print(f"thinkless distill: {k['total']} rows ({k['think']} <think>, {k['short']} <short>) in "
          f"{out / report['hybrid_file']}; report in {out / 'report.md'}")  # fmt: skip
    return report


def markdown(report: dict) -> str:
    p, m = report["problems"], report["models"]
    contaminated = ", ".join(f"{Path(f).name}: {n}" for f, n in p["contaminated"].items()) or "no validation file"
    lines = [
        "# Hybrid warm-up data", "",
        f"Problems: {p['read']} read, {p['duplicates_merged']} duplicates merged, contaminated (dropped) "
        f"{contaminated}, {p['used']} used.", "",
        "| mode | source | samples | accuracy | correct | wrong | format error | truncated | problems solved |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for side in ("think", "short"):
        f = m[side]
        lines.append(f"| <{side}> | {f['source']} | {f['samples']} | {f['accuracy']:.3f} | {f['correct']} | "
                     f"{f['wrong']} | {f['format_error']} | {f['truncated']} | {f['problems_solved']} / "
                     f"{f['problems']} |")  # fmt: skip
    w, k, t = report["problems_with"], report["kept_rows"], report["tokens"]
    lines += [
        "", f"Problems with a correct answer in both modes: {w['both']}; think only: {w['think_only']}; short only: "
        f"{w['short_only']}; neither: {w['neither']}"
        + (f" (require_both dropped {report['dropped_by_require_both']})." if report["require_both"] else "."),
        "", f"Rows kept: {k['total']} ({k['think']} <think>, {k['short']} <short>). Tokens ({t['tokenizer']}):", "",
        "| mode | rows | mean | median | p90 | max |", "| --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for mode in ("think", "short"):
        s = t[mode]
        cell = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(f"| <{mode}> | {s['n']} | {cell(s['mean'])} | {cell(s['median'])} | {cell(s['p90'])} | "
                     f"{cell(s['max'])} |")  # fmt: skip
    lines += ["", f"Rows longer than data.max_length: {report['rows_over_max_length']}.", ""]
    return "\n".join(lines)


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    top = max([1, *(max(v) for v in lengths.values() if v)])
    bins = [top * i / 40 for i in range(41)]
    for mode, color in (("short", "tab:blue"), ("think", "tab:orange")):
        if lengths[mode]:
            ax.hist(lengths[mode], bins=bins, alpha=0.6, color=color, label=f"<{mode}> ({len(lengths[mode])})")
    ax.set_xlabel("response tokens")
    ax.set_ylabel("rows")
    ax.set_title("kept responses by mode")
    if any(lengths.values()):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
