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
from typing import TYPE_CHECKING

from thinkless.modes import mode_of_text
from thinkless.train.distill_store import SIDES
from thinkless.train.distill_teacher import VERDICTS
from thinkless.train.files import write_atomic, write_text

if TYPE_CHECKING:
    from thinkless.train.config import Config


LENGTH_SAMPLE = 20_000  # kept rows per mode whose tokens are counted: evenly spaced over the file, all when fewer


def _length_tokenizer(config: Config):
    """`model.path`'s tokenizer (with the control tokens, as `sft` counts), else the short model's own."""
    from thinkless.train.run import resolve_model_path

    if config.model.path:
        from thinkless.train.model import load_tokenizer

        path = resolve_model_path(config.model.path)
        return path, load_tokenizer(path)
    from thinkless.train.distill_teacher import teacher_tokenizer

    path = resolve_model_path(config.distill.short_model)
    return path, teacher_tokenizer(path)


def _spread(values: list[int]) -> dict:
    if not values:
        return {"counted": 0, "mean": None, "median": None, "p90": None, "max": None}
    ordered = sorted(values)
    return {
        "counted": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
        "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max": ordered[-1],
    }  # fmt: skip


class Tally:
    """The report's figures, added up shard by shard: only counts and a bounded sample of lengths are kept.

    Token lengths: the kept rows of each mode are counted one in `stride` (1 at first); when the sample reaches
    2 x LENGTH_SAMPLE every other one is dropped and the stride doubles, so the sample stays evenly spread over the
    file, the same on every run."""

    def __init__(self, config: Config, cap: int = LENGTH_SAMPLE):
        self.config, self.cap = config, cap
        self.tokenizer_path, self.tokenizer = _length_tokenizer(config)
        self.student = bool(config.model.path)  # its prompt is known: lengths compare with data.max_length
        self.too_long = dict.fromkeys(SIDES, 0)
        self.verdicts = {side: dict.fromkeys(VERDICTS, 0) for side in SIDES}
        self.solved = dict.fromkeys(SIDES, 0)
        self.without_samples = dict.fromkeys(SIDES, 0)
        self.problems = 0
        self.problems_with = {"both": 0, "think_only": 0, "short_only": 0, "neither": 0}
        self.kept = dict.fromkeys(SIDES, 0)
        # (row index, (response tokens, prompt tokens))
        self.lengths: dict[str, list[tuple[int, tuple[int, int]]]] = {side: [] for side in SIDES}
        self.stride = dict.fromkeys(SIDES, 1)

    def add(self, think: dict, short: dict, kept: list[dict], rows: list[dict]) -> None:
        """One shard: each side's {"samples", "prompts_too_long"}, which modes each problem solved, its rows."""
        for side, shard in (("think", think), ("short", short)):
            self.too_long[side] += shard["prompts_too_long"]
            for samples in shard["samples"]:
                for _, v in samples or []:
                    self.verdicts[side][v] += 1
                self.solved[side] += any(v == "correct" for _, v in samples or [])
                self.without_samples[side] += not samples
        self.problems += len(kept)
        for k in kept:
            t, s = k["solved"]["think"], k["solved"]["short"]
            name = "both" if t and s else "think_only" if t else "short_only" if s else "neither"
            self.problems_with[name] += 1
        picked = {side: [] for side in SIDES}
        for row in rows:
            mode = mode_of_text(row["response"])
            if self.kept[mode] % self.stride[mode] == 0:
                picked[mode].append((self.kept[mode], row))
            self.kept[mode] += 1
        for mode, items in picked.items():
            if not items:
                continue
            self.lengths[mode] += [(i, n) for (i, _), n in zip(items, self._count([r for _, r in items]), strict=True)]
            while len(self.lengths[mode]) >= 2 * self.cap:
                self.stride[mode] *= 2
                self.lengths[mode] = [(i, n) for i, n in self.lengths[mode] if i % self.stride[mode] == 0]

    def _count(self, rows: list[dict]) -> list[tuple[int, int]]:
        """(response tokens + the EOS sft appends, prompt tokens) of rows; the prompt as `sft` builds it when
        `model.path` is the model it will train, else 0 (unknown)."""
        responses = self.tokenizer([r["response"] for r in rows], add_special_tokens=False)["input_ids"]
        if not self.student:
            return [(len(ids) + 1, 0) for ids in responses]
        from thinkless.train.data import chat_prompt, user_turn

        data = self.config.data
        prompts = [chat_prompt(self.tokenizer, user_turn(r["problem"], data.instruction, data.instruction_position))
                   for r in rows]  # fmt: skip
        counts = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        return [(len(ids) + 1, len(p)) for ids, p in zip(responses, counts, strict=True)]

    def write(self, out: Path, counts: dict) -> dict:
        """report.json, report.md and lengths.png in `out`; the report as a dict."""
        d = self.config.distill
        sources = {"think": d.think_file or d.think_model, "short": d.short_model}
        lengths = {mode: [n for _, (n, _) in pairs] for mode, pairs in self.lengths.items()}
        totals = [n + p for pairs in self.lengths.values() for _, (n, p) in pairs]
        models = {}
        for side in SIDES:
            v = self.verdicts[side]
            samples = sum(v.values())
            models[side] = {
                "source": sources[side], "samples": samples, **v,
                "accuracy": v["correct"] / samples if samples else 0.0,
                "problems": self.problems, "problems_solved": self.solved[side],
                "problems_without_samples": self.without_samples[side], "prompts_too_long": self.too_long[side],
            }  # fmt: skip
        w = self.problems_with
        report = {
            "problems": counts,
            "models": models,
            "kept_rows": {**self.kept, "total": sum(self.kept.values())},
            "problems_with": dict(w),
            "require_both": d.require_both,
            "dropped_by_require_both": w["think_only"] + w["short_only"] if d.require_both else 0,
            "tokens": {
                "tokenizer": self.tokenizer_path,
                **{m: {"rows": self.kept[m], **_spread(v)} for m, v in lengths.items()},
            },  # fmt: skip
            # sft cuts prompt + response at data.max_length; the prompt is counted when model.path is the student
            "over_max_length_share": sum(t > self.config.data.max_length for t in totals) / max(1, len(totals)),
            "over_max_length_counts_prompt": self.student,
            "hybrid_file": f"hybrid.{d.format}",  # beside this report
        }
        write_text(out / "report.json", json.dumps(report, indent=2))
        write_text(out / "report.md", markdown(report))
        write_atomic(out / "lengths.png", lambda tmp: plot_lengths(lengths, tmp))
        k = report["kept_rows"]
        print(f"thinkless distill: {k['total']} rows ({k['think']} <think>, {k['short']} <short>) in "
              f"{out / report['hybrid_file']}; report in {out / 'report.md'}")  # fmt: skip
        return report


def markdown(report: dict) -> str:
    p, m = report["problems"], report["models"]
    contaminated = ", ".join(f"{Path(f).name}: {n}" for f, n in p["contaminated"].items()) or "no validation file"
    lines = [
        "# Hybrid warm-up data", "",
        f"Problems: {p['read']} read, {p['without_answer']} without a reference answer (skipped), "
        f"{p['duplicates_merged']} duplicates merged, contaminated (dropped) {contaminated}, {p['used']} used."
        + (f" Think file: {p['think_file']['matched']} of its {p['think_file']['problems']} problems matched."
           if "think_file" in p else ""), "",
        "| mode | source | samples | accuracy | correct | wrong | format error | thinking | truncated | solved | "
        "prompt too long |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for side in ("think", "short"):
        f = m[side]
        lines.append(f"| <{side}> | {f['source']} | {f['samples']} | {f['accuracy']:.3f} | {f['correct']} | "
                     f"{f['wrong']} | {f['format_error']} | {f['thinking']} | {f['truncated']} | "
                     f"{f['problems_solved']} / {f['problems']} | {f['prompts_too_long']} |")  # fmt: skip
    w, k, t = report["problems_with"], report["kept_rows"], report["tokens"]
    lines += [
        "", f"Problems with a correct answer in both modes: {w['both']}; think only: {w['think_only']}; short only: "
        f"{w['short_only']}; neither: {w['neither']}"
        + (f" (require_both dropped {report['dropped_by_require_both']})." if report["require_both"] else "."),
        "", f"Rows kept: {k['total']} ({k['think']} <think>, {k['short']} <short>). Tokens ({t['tokenizer']}):", "",
        "| mode | rows | counted | mean | median | p90 | max |", "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for mode in ("think", "short"):
        s = t[mode]
        cell = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(f"| <{mode}> | {s['rows']} | {s['counted']} | {cell(s['mean'])} | {cell(s['median'])} | "
                     f"{cell(s['p90'])} | {cell(s['max'])} |")  # fmt: skip
    share, what = (
        report["over_max_length_share"],
        "prompt + response"
        if report["over_max_length_counts_prompt"]
        else ("the response alone: set model.path to the model sft will train to count its prompt too"),
    )
    lines += ["", f"Counted rows longer than data.max_length ({what}): {100 * share:.1f} %.", ""]
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
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
