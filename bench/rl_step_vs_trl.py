"""The whole RL step against TRL's GRPOTrainer: the same tiny model, prompts and settings, alternating runs.

    python -m venv --system-site-packages .venv-trl && .venv-trl/bin/pip install trl==1.16.0   # TRL's environment
    python bench/rl_step_vs_trl.py --trl-python .venv-trl/bin/python --out bench/rl_step_vs_trl_cpu.json

The model is a random 2-layer Qwen2 (hidden 64) over the tests' byte-level BPE tokenizer (600 tokens + the three
control tokens), the prompts are real MATH problems in the chat template. Both trainers sample `n` answers of
`tokens` new tokens for each of `prompts` prompts at temperature 0.6, take the k3 KL to a frozen reference
(coefficient 0.001), and make one AdamW update (lr 1e-5, no schedule, gradient clipping at 1.0) per step over the
whole batch in one micro-batch, in fp32 on the CPU. Random weights almost never sample EOS, so both train on full
length answers.

What cannot be matched: the loss (ours is DeGRPO, the control token normalised apart; TRL's `dapo` is one token-mean,
the closest); the rewards come from the same `thinkless.train.rewards.score` on both sides.

The two trainers run in separate processes (TRL in its own environment, `--trl-python`), alternately, `--rounds`
times each. A step's time is the wall-clock between the ends of consecutive steps as the trainer itself reports
them (our metrics line, TRL's `on_step_end`), so it holds everything of the step: sampling, rewards, log-probs,
the update, logging. The table gives the median over steps 3-12 of each run and the median over runs; the split
says where our time and TRL's went. Results: a JSON file (`--out`) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCHES = ((2, 4, 24), (4, 8, 64))  # prompts x samples x new tokens
SETTINGS = dict(temperature=0.6, kl_coef=0.001, lr=1e-5, seed=0)


# ----- the shared inputs -------------------------------------------------------------------------------------------


def build_inputs(work: Path) -> None:
    """The model folder (tokenizer with the control tokens, random Qwen2 over it) and the prompts, as both see them."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny

    from thinkless.train.config import load_config
    from thinkless.train.data import load_problems
    from thinkless.train.model import load_tokenizer

    base = work / "model"
    tiny.make_tokenizer(base)
    tokenizer = load_tokenizer(str(base))  # the control tokens added as the trainer adds them
    tokenizer.save_pretrained(base)
    tiny.make_model(base, tokenizer, hidden=64, layers=2)
    rows = json.loads((tiny.DATA / "math_train.json").read_text())
    problems = [{"problem": r["problem"], "answer": r["answer"]} for r in rows if r.get("answer")][:2000]
    (work / "all.json").write_text(json.dumps(problems))
    config = load_config(None, [f"model.path={base}"])
    examples = load_problems([str(work / "all.json")], tokenizer, config)
    # Prompts of 60-100 tokens: the batches' padded widths (and so the step's work) vary little from step to step.
    lengths = [len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"]) for e in examples]
    kept = [(p, e) for p, e, n in zip(problems, examples, lengths, strict=True) if 60 <= n <= 100][:400]
    (work / "problems.json").write_text(json.dumps([p for p, _ in kept]))
    (work / "prompts.json").write_text(json.dumps([{"prompt": e.prompt, "answer": e.answer} for _, e in kept]))


# ----- the workers (one process per run) ---------------------------------------------------------------------------


def thinkless_worker(spec: dict) -> dict:
    from thinkless.train.config import load_config
    from thinkless.train.metrics import MetricsLog
    from thinkless.train.rl import run_rl

    work, (prompts, n, tokens) = Path(spec["work"]), spec["batch"]
    ends, splits = [], []
    log = MetricsLog.log

    def timed(self, step, metrics):
        ends.append(time.perf_counter())
        splits.append({k: metrics.get(k) for k in ("rollout_seconds", "logprob_seconds", "update_seconds")})
        splits[-1]["logprob_path"] = metrics.get("logprob_path")
        return log(self, step, metrics)

    MetricsLog.log = timed
    config = load_config(None, [
        f"model.path={work / 'model'}", f"data.train_files=[{work / 'problems.json'}]",
        f"trainer.output_dir={spec['run_dir']}", f"trainer.total_steps={spec['steps']}",
        f"trainer.batch_size={prompts}", f"rollout.n={n}", f"rollout.max_new_tokens={tokens}",
        f"rollout.temperature={SETTINGS['temperature']}", f"algo.kl_coef={SETTINGS['kl_coef']}",
        f"algo.lr={SETTINGS['lr']}", f"algo.micro_batch_size={prompts * n}", f"trainer.seed={SETTINGS['seed']}",
        f"trainer.save_every={10**6}", "trainer.device=cpu", *spec["overrides"],
    ])  # fmt: skip
    run_rl(config)
    return {"ends": ends, "splits": splits}


def trl_worker(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT))
    from thinkless.modes import mode_of_text
    from thinkless.train.config import RewardsConfig
    from thinkless.train.rewards import score

    work, (prompts, n, tokens) = Path(spec["work"]), spec["batch"]
    rows = json.loads((work / "prompts.json").read_text())
    dataset = Dataset.from_list(rows)
    rewards = RewardsConfig()

    def reward(completions, answer, **_):  # the same rule as ours; the mode from the text's first token
        return [score(c, a, mode_of_text(c), rewards).reward for c, a in zip(completions, answer, strict=True)]

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    args = GRPOConfig(
        output_dir=spec["run_dir"], max_steps=spec["steps"], per_device_train_batch_size=prompts * n,
        gradient_accumulation_steps=1, num_generations=n, max_completion_length=tokens,
        temperature=SETTINGS["temperature"], top_p=1.0, top_k=0, beta=SETTINGS["kl_coef"],
        learning_rate=SETTINGS["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, num_iterations=1, steps_per_generation=1, epsilon=0.2, scale_rewards="none",
        loss_type="dapo", seed=SETTINGS["seed"], use_cpu=True, bf16=False, save_strategy="no", report_to="none",
        logging_steps=1, log_completions=False, dataloader_num_workers=0,
    )  # fmt: skip
    ends, splits = [], []
    phase = {"generate": 0.0, "score": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            phase.update(generate=0.0, score=0.0, begin=time.perf_counter())

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            ends.append(now)
            update = now - phase["begin"] - phase["score"]
            splits.append({"rollout_seconds": phase["generate"], "logprob_seconds": phase["score"] - phase["generate"],
                           "update_seconds": update})  # fmt: skip

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])  # fmt: skip

    def timed(method, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                phase[key] += time.perf_counter() - start

        return wrapper

    # generate: the sampling; score: generation + rewards + reference (and old) log-probs, TRL's _prepare_inputs.
    trainer._generate = timed(trainer._generate, "generate")
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "score")
    trainer.train()
    return {"ends": ends, "splits": splits, "trl": trl.__version__}


# ----- the driver --------------------------------------------------------------------------------------------------


def run_one(kind: str, python: str, spec: dict) -> dict:
    spec = {**spec, "run_dir": tempfile.mkdtemp(prefix=f"{kind}-", dir=Path(spec["work"]) / "runs")}
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        command = [python, __file__, "--worker", kind, "--spec", json.dumps(spec), "--result", out.name]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-20:]
            raise SystemExit(f"{kind} run failed ({proc.returncode}):\n" + "\n".join(tail))
        result = json.loads(Path(out.name).read_text())
    steps = [b - a for a, b in zip(result["ends"], result["ends"][1:], strict=False)]  # steps[i] is step i+2
    result["step_seconds"] = steps
    window = steps[1:11]  # steps 3-12
    result["median"] = statistics.median(window)
    result["split"] = {
        k: statistics.median(s[k] for s in result["splits"][2:12]) for k in ("rollout_seconds", "logprob_seconds",
                                                                               "update_seconds")
    }  # fmt: skip
    result["logprob_path"] = result["splits"][-1].get("logprob_path")
    del result["ends"], result["splits"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-python", help="a python with trl installed (its own environment)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each trainer per batch, alternating")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batches", default=",".join("x".join(map(str, b)) for b in BATCHES))
    parser.add_argument("--ours", default="", help="extra overrides of our trainer, comma-separated")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=("thinkless", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (thinkless_worker if args.worker == "thinkless" else trl_worker)(json.loads(args.spec))
        Path(args.result).write_text(json.dumps(result))
        return 0
    if args.steps < 12:
        parser.error("--steps must be at least 12: the medians are over steps 3-12")
    work = Path(tempfile.mkdtemp(prefix="thinkless-vs-trl-"))
    build_inputs(work)
    (work / "runs").mkdir()
    overrides = [o for o in args.ours.split(",") if o]
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from _common import device_name

    report = {"machine": device_name(torch.device("cpu")), "torch": torch.__version__, "settings": SETTINGS,
              "ours_overrides": overrides, "date": time.strftime("%Y-%m-%d"), "batches": []}  # fmt: skip
    for batch in [tuple(int(x) for x in b.split("x")) for b in args.batches.split(",")]:
        spec = {"work": str(work), "batch": batch, "steps": args.steps, "overrides": overrides}
        runs = {"thinkless": [], "trl": []}
        for _ in range(args.rounds):  # alternating, so that a slow spell of the machine hits both
            if args.trl_python:
                runs["trl"].append(run_one("trl", args.trl_python, spec))
            runs["thinkless"].append(run_one("thinkless", sys.executable, spec))
        entry = {"batch": "x".join(map(str, batch)), **{k: v for k, v in runs.items() if v}}
        for kind, rs in runs.items():
            if rs:
                entry[f"{kind}_median"] = statistics.median(r["median"] for r in rs)
        if runs["trl"]:
            entry["ratio"] = entry["thinkless_median"] / entry["trl_median"]
        report["batches"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k not in runs}), flush=True)
    if "trl" in report["batches"][0]:
        report["trl"] = report["batches"][0]["trl"][0].get("trl")
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def table(report: dict) -> str:
    def split(rs):
        s = {k: statistics.median(r["split"][k] for r in rs) for k in rs[0]["split"]}
        return f"{s['rollout_seconds']:.3f} / {s['logprob_seconds']:.3f} / {s['update_seconds']:.3f}"

    lines = [
        f"{report['machine']}, torch {report['torch']}, TRL {report.get('trl', '-')}; medians of steps 3-12, "
        "median over runs (range of the runs)\n",
        "| batch | TRL step s | thinkless step s | ratio | TRL split | thinkless split |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for e in report["batches"]:
        ours = e["thinkless"]
        rng = lambda rs: f"{min(r['median'] for r in rs):.3f}-{max(r['median'] for r in rs):.3f}"  # noqa: E731
        trl = f"{e['trl_median']:.3f} ({rng(e['trl'])})" if "trl" in e else "-"
        ratio = f"{e['ratio']:.2f}" if "ratio" in e else "-"
        lines.append(
            f"| {e['batch']} | {trl} | {e['thinkless_median']:.3f} ({rng(ours)}) | {ratio} | "
            f"{split(e['trl']) if 'trl' in e else '-'} | {split(ours)} |"
        )
    lines.append("\nsplit: rollout / log-probs (TRL: rewards, reference and old log-probs) / update, seconds")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
