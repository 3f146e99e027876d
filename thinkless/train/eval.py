"""Evaluation: for each file in `data.val_files`, accuracy, think ratio and response length, overall and per mode.

Each file gets `<output_dir>/eval/<file stem>.json` (accuracy, think_ratio, mean_tokens, n, and the per-mode
figures) and a line of the printed table. `model.path` may be a run folder: its latest checkpoint is evaluated.
Sampling follows `rollout.*` (`rollout.n` samples per problem; n counts samples).

    thinkless-train eval model.path=runs/rl data.val_files=[math500.json,aime2024.json] trainer.output_dir=runs/rl
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from thinkless.train.data import load_problems
from thinkless.train.model import load_tokenizer
from thinkless.train.rewards import score
from thinkless.train.rollout import generate
from thinkless.train.run import resolve_model_path, start_run


def evaluate_file(run, file: str, examples: list, config) -> dict:
    modes, correct, lengths = [], [], []
    for i in range(0, len(examples), max(1, config.trainer.batch_size)):
        batch = examples[i : i + config.trainer.batch_size]
        ro = generate(run.model, run.tokenizer, [e.prompt for e in batch], config.rollout)
        for text, mode, p, n in zip(ro.texts, ro.modes, ro.prompt_index.tolist(), ro.lengths.tolist(), strict=True):
            modes.append(mode)
            correct.append(score(text, batch[p].answer, mode, config.rewards).correct)
            lengths.append(n)
    c, L = torch.tensor(correct, dtype=torch.float64), torch.tensor(lengths, dtype=torch.float64)
    short = torch.tensor([m == "short" for m in modes])
    think = torch.tensor([m == "think" for m in modes])
    mean = lambda x, m: x[m].mean().item() if m.any() else None  # noqa: E731
    return {
        "file": file,
        "n": len(correct),
        "accuracy": c.mean().item() if len(correct) else 0.0,
        "think_ratio": think.double().mean().item() if len(correct) else 0.0,
        "mean_tokens": L.mean().item() if len(correct) else 0.0,
        "accuracy_short": mean(c, short),
        "accuracy_think": mean(c, think),
        "mean_tokens_short": mean(L, short),
        "mean_tokens_think": mean(L, think),
        "format_errors": sum(m is None for m in modes),
    }


def run_eval(config) -> list[dict]:
    tokenizer = load_tokenizer(resolve_model_path(config.model.path))
    # Every file is read and checked once, before the model generates anything.
    if not config.data.val_files:
        load_problems([], tokenizer, config, what="data.val_files")  # raises: the list is empty
    examples = {file: load_problems([file], tokenizer, config, what="data.val_files") for file in config.data.val_files}
    run = start_run(config, "eval", train=False)
    out = Path(config.trainer.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    print(f"{'file':40} {'n':>6} {'accuracy':>9} {'think':>6} {'tokens':>8}")
    names = [Path(f).stem for f in config.data.val_files]
    for file, name in zip(config.data.val_files, names, strict=True):
        if names.count(name) > 1:  # two test.json from different folders keep both reports
            name = f"{Path(file).parent.name}_{name}"
        report = evaluate_file(run, file, examples[file], config)
        (out / f"{name}.json").write_text(json.dumps(report, indent=2))
        print(
            f"{Path(file).name:40} {report['n']:6d} {report['accuracy']:9.3f} {report['think_ratio']:6.2f} "
            f"{report['mean_tokens']:8.1f}"
        )
        reports.append(report)
    return reports
