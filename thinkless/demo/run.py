"""`thinkless-train demo`: warm-up SFT, then DeGRPO, on the addition task, through the trainer's own stages.

    thinkless-train                       # the same as `thinkless-train demo`
    thinkless-train demo algo.decoupled=false trainer.output_dir=thinkless-runs/grpo   # vanilla GRPO

Everything goes to `trainer.output_dir` (default `thinkless-runs/demo/`):

    model/            the random tiny Qwen2 and its tokenizer (built in code)
    data/             warmup.jsonl (both modes of every problem), rl.jsonl, eval/<level>.jsonl
    warmup/           the SFT run (checkpoints, metrics.jsonl) and warmup/eval/<level>.json
    checkpoint-<N>/   the RL run: the final policy loads with from_pretrained
    metrics.jsonl     the RL run, with think_ratio/accuracy/mean_tokens per level
    eval/<level>.json the final evaluation
    report.json       {"levels": [{"name", "warmup": {...}, "final": {...}}, ...]}, easiest level first
    think_ratio.png, accuracy.png, response_length.png

Every stage resumes: run the same command again after an interruption and it goes on where it stopped. The keys
of every section override the demo's defaults below; `demo.*` sets the task, the model and the warm-up.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from thinkless.demo import task
from thinkless.train.config import ConfigError, load_config
from thinkless.train.files import write_text

if TYPE_CHECKING:
    from thinkless.train.config import Config


# The demo's defaults, over the trainer's (which suit 1.5B models on GPUs). Why these values: see README, "Demo".
DEFAULTS = {
    "trainer.output_dir": "thinkless-runs/demo",
    "trainer.batch_size": 32,  # prompts per RL step, 8 samples each
    "trainer.total_steps": 100,
    "trainer.save_every": 25,
    "trainer.device": "cpu",  # a tiny model: CUDA launches would cost more than the math
    "rollout.n": 8,
    "rollout.temperature": 1.0,
    "rollout.max_new_tokens": 64,  # the longest answer (5 digits, thinking) is 46 tokens
    "data.instruction": "",  # the prompt is the problem itself
    "data.tag_key": "level",
    "data.max_prompt_tokens": 64,
    "algo.lr": 1e-4,
    "algo.alpha": 1.0,
    "algo.normalize_std": True,
    "algo.micro_batch_size": 256,
    "algo.warmup_steps": 5,
}


def demo_config(config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()):
    return load_config(config_file, overrides, defaults=DEFAULTS)


def mix_weights(config: Config) -> list[float]:
    levels, text = config.demo.levels, config.demo.mix
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"demo.mix must be comma-separated numbers, one per level, got {text!r}") from None
    if len(weights) == 1:
        weights = weights * levels
    if len(weights) < levels:  # "3,1" with 5 levels: the last weight repeats
        weights += [weights[-1]] * (levels - len(weights))
    if len(weights) != levels or any(w < 0 for w in weights) or not any(weights):
        raise ConfigError(f"demo.mix must give {levels} non-negative weights (demo.levels={levels}), got {text!r}")
    return weights


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))  # an interrupted demo leaves no half file


def write_data(root: Path, config: Config) -> dict:
    """The demo's files, a function of the settings and the seed (rewritten identically on resume)."""
    d, seed = config.demo, config.trainer.seed
    levels = list(range(1, d.levels + 1))
    data = root / "data"
    warmup = []
    # Harder levels get more warm-up problems (weight = digits): their longer scratchpads take longer to learn, and
    # with equal shares some seeds ended the warm-up without a working 5-digit scratchpad.
    for p in task.mixture(levels, [float(n) for n in levels], d.warmup_steps * d.warmup_batch_size // 2 or 1, seed):
        warmup.append({"problem": p.text, "response": task.short_response(p), "level": p.name})
        warmup.append({"problem": p.text, "response": task.think_response(p), "level": p.name})
    _write_jsonl(data / "warmup.jsonl", warmup)
    n_rl = max(config.trainer.total_steps, 1) * config.trainer.batch_size
    rl = task.mixture(levels, mix_weights(config), n_rl, seed + 1)
    _write_jsonl(data / "rl.jsonl", [{"problem": p.text, "answer": p.answer, "level": p.name} for p in rl])
    files = {}
    for level in levels:
        name = task.level_name(level)
        files[name] = data / "eval" / f"{name}.jsonl"
        problems = task.problems(level, d.eval_problems, seed + 2)
        _write_jsonl(files[name], [{"problem": p.text, "answer": p.answer, "level": name} for p in problems])
    return files


def build_base_model(root: Path, config: Config) -> Path:
    from thinkless.demo.tiny import build_model

    folder = root / "model"
    if (folder / "config.json").is_file():
        return folder
    if config.demo.hidden_size % 8:  # 4 heads of an even size (RoPE rotates pairs)
        raise ConfigError(f"demo.hidden_size must be a multiple of 8, got {config.demo.hidden_size}")
    tmp = root / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(tmp, hidden=config.demo.hidden_size, seed=config.trainer.seed)
    os.replace(tmp, folder)
    return folder


def _stage(config: Config, **settings):
    """A copy of `config` with `settings` ({"section__key": value}) changed."""
    import copy

    out = copy.deepcopy(config)
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(out, section), name, value)
    return out


def evaluate(config: Config, model_path: Path, output_dir: Path, files: dict) -> dict:
    """Accuracy, think ratio and mean tokens per level: one sample per problem at the RL temperature, the model
    choosing its own control token (the same decoding before and after RL)."""
    from thinkless.train.eval import run_eval

    stage = _stage(
        config,
        model__path=str(model_path),
        data__val_files=[str(f) for f in files.values()],
        data__tag_key="",
        trainer__output_dir=str(output_dir),
        trainer__batch_size=config.demo.eval_problems,
        rollout__n=1,
    )
    reports = run_eval(stage)
    return {name: report for name, report in zip(files, reports, strict=True)}


def _stopped(run, stage: str) -> bool:
    """Whether a signal stopped this stage (it saved its step): then the demo stops too, instead of going on from
    an unfinished model; the same command resumes it."""
    if run.preemption.received is None:
        return False
    print(f"thinkless demo: stopped during {stage}; run the same command to resume")
    return True


def run_demo(config: Config) -> dict | None:
    from thinkless.demo.plots import plot_metrics, print_table
    from thinkless.train.rl import run_rl
    from thinkless.train.sft import run_sft

    start = time.perf_counter()
    root = Path(config.trainer.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    mix_weights(config)  # a bad mix stops the demo before anything runs
    print(f"thinkless demo: {config.demo.levels} levels of L-digit addition; writing to {root}/")
    model = build_base_model(root, config)
    files = write_data(root, config)
    d = config.demo

    print(f"thinkless demo: [1/4] warm-up SFT on both modes of every problem ({d.warmup_steps} steps)")
    warmup_dir = root / "warmup"
    warmup = run_sft(
        _stage(
            config,
            model__path=str(model),
            data__train_files=[str(root / "data" / "warmup.jsonl")],
            data__tag_key="",
            data__max_length=128,
            trainer__output_dir=str(warmup_dir),
            trainer__batch_size=d.warmup_batch_size,
            trainer__total_steps=d.warmup_steps,
            trainer__save_every=max(1, d.warmup_steps // 4),
            trainer__keep_last=1,
            algo__lr=d.warmup_lr,
            algo__lr_scheduler="cosine",
            algo__warmup_steps=min(20, d.warmup_steps // 10),
            algo__micro_batch_size=d.warmup_batch_size,
        )
    )
    if _stopped(warmup, "the warm-up"):
        return None
    print("thinkless demo: [2/4] evaluating the warm-up model on every level")
    before = evaluate(config, warmup_dir, warmup_dir, files)

    t, algorithm = config.trainer, "DeGRPO" if config.algo.decoupled else "vanilla GRPO"
    print(f"thinkless demo: [3/4] {algorithm}: {t.total_steps} steps of {t.batch_size} prompts x {config.rollout.n}")
    rl = run_rl(
        _stage(
            config,
            model__path=str(warmup_dir),
            data__train_files=[str(root / "data" / "rl.jsonl")],
        )
    )
    if _stopped(rl, "RL"):
        return None
    print("thinkless demo: [4/4] evaluating the RL model on every level")
    after = evaluate(config, root, root, files)

    keys = ("accuracy", "think_ratio", "mean_tokens", "accuracy_short", "accuracy_think", "n")
    report = {
        "levels": [
            {"name": name, "warmup": {k: before[name][k] for k in keys}, "final": {k: after[name][k] for k in keys}}
            for name in files
        ],
        "algorithm": "DeGRPO" if config.algo.decoupled else "GRPO",
        "alpha": config.algo.alpha,
        "seconds": time.perf_counter() - start,
    }
    for stage in ("warmup", "final"):
        report[f"mean_accuracy_{stage}"] = sum(lv[stage]["accuracy"] for lv in report["levels"]) / len(files)
    (root / "report.json").write_text(json.dumps(report, indent=2))
    plot_metrics(root / "metrics.jsonl", list(files), root, title=report["algorithm"])
    print_table(report)
    return report
