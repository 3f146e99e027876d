"""Soak: a long CPU RL run on a tiny model, checkpointing every step with keep_last=2, watching memory and disk.

    python bench/soak_cpu.py --steps 300 --out bench/soak_cpu.json

After every step (from the metrics logger, in the training process itself) it records the process's resident set
(VmRSS from /proc) and the output folder's size on disk. A leak shows as a slope: the report compares the mean of
the first 50 steps after warm-up (steps 21-70) with the last 50, and fits a line over steps 21-end (MiB per 100
steps). The model: a random 2-layer Qwen2 (hidden 64, the tests' BPE tokenizer of 600 tokens), real MATH problems,
4 prompts x 4 samples x 16 new tokens per step, algo.entropy_coef so that every step changes the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench" / "soak_cpu.json"))
    args = parser.parse_args()

    import tiny
    import torch

    from thinkless.train.config import load_config
    from thinkless.train.metrics import MetricsLog
    from thinkless.train.rl import run_rl

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="thinkless-soak-"))
    tok = tiny.make_tokenizer(work / "base")
    tiny.make_model(work / "base", tok, hidden=64)
    rows = json.loads((tiny.DATA / "math_train.json").read_text())
    problems = [{"problem": r["problem"], "answer": r["answer"]} for r in rows if r.get("answer")][:400]
    (work / "rl.json").write_text(json.dumps(problems))
    out = work / "run"
    samples: list[dict] = []
    log = MetricsLog.log
    start = time.perf_counter()

    def watched(self, step, metrics):
        row = log(self, step, metrics)
        # the checkpoint of step k is written after its log line: measure the folder as step k-1 left it
        samples.append(
            {"step": step, "rss_mib": rss_mib(), "disk_mib": disk_mib(out), "seconds": time.perf_counter() - start}
        )
        return row

    MetricsLog.log = watched
    config = load_config(None, [
        f"model.path={work / 'base'}", f"data.train_files=[{work / 'rl.json'}]", f"trainer.output_dir={out}",
        f"trainer.total_steps={args.steps}", "trainer.save_every=1", "trainer.keep_last=2", "trainer.batch_size=4",
        "rollout.n=4", "rollout.max_new_tokens=16", "rollout.temperature=1.0", "algo.micro_batch_size=16",
        "algo.lr=1e-4", "algo.entropy_coef=0.01", "trainer.device=cpu", "data.max_prompt_tokens=512",
    ])  # fmt: skip
    run_rl(config)
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    late = [s for s in samples if s["step"] > 20]
    first, last = late[:50], late[-50:]
    mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
    steps, rss, disk = [s["step"] for s in late], [s["rss_mib"] for s in late], [s["disk_mib"] for s in samples]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "steps": args.steps,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "checkpoints_left": checkpoints,
        "rss_mib": {"steps_21_70": round(mean(first, "rss_mib"), 1), "last_50": round(mean(last, "rss_mib"), 1),
                    "slope_per_100_steps": round(100 * slope(steps, rss), 2), "max": round(max(rss), 1)},
        "disk_mib": {"steps_21_70": round(mean(first, "disk_mib"), 2), "last_50": round(mean(last, "disk_mib"), 2),
                     "max": round(max(disk), 2), "min_after_step_2": round(min(disk[2:]), 2)},
        "samples": samples,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
