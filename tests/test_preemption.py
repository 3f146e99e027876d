"""Preemption: SIGTERM in the middle of a step finishes that step, saves it and exits 0 (one process, and two gloo
ranks with the signal sent to one); the resumed run ends bit-identical to an uninterrupted one. A second signal
exits at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import torchrun

HERE = Path(__file__).parent
RL = [
    "rl", "model.path=base", "data.train_files=[rl.jsonl]", "data.instruction=", "rollout.n=4",
    "rollout.max_new_tokens=10", "rollout.temperature=1.0", "trainer.batch_size=2", "trainer.save_every=10",
    "algo.micro_batch_size=4", "algo.lr=1e-3", "algo.entropy_coef=0.01", "trainer.device=cpu",
    "trainer.total_steps=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from thinkless.demo import task
    from thinkless.demo.tiny import build_model

    root = tmp_path_factory.mktemp("preempt")
    build_model(root / "base", hidden=32)
    problems = task.mixture([1, 2], [1, 1], 40, 0)
    (root / "rl.jsonl").write_text("".join(json.dumps({"problem": p.text, "answer": p.answer}) + "\n"
                                           for p in problems))  # fmt: skip
    return root


def _worker(base: Path, out: str, at: int, times: int = 1, *extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PREEMPT_AT": str(at), "PREEMPT_TIMES": str(times), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    cmd = [sys.executable, str(HERE / "preempt_worker.py"), *RL, f"trainer.output_dir={out}", *extra]
    return subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=600)


def _steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sigterm_saves_the_step_and_the_resumed_run_is_identical(base):
    from thinkless.cli import main

    cwd = os.getcwd()
    os.chdir(base)
    try:
        assert main([*RL, "trainer.output_dir=straight"]) == 0
    finally:
        os.chdir(cwd)
    proc = _worker(base, "stopped", at=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped by SIGTERM after step 2, saved as stopped/checkpoint-2; run the same command" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _steps(base / "stopped") == [1, 2]
    assert sorted(p.name for p in (base / "stopped").glob("checkpoint-*")) == ["checkpoint-2"]
    proc = _worker(base, "stopped", at=0)  # the same command again, no signal this time
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _steps(base / "stopped") == [1, 2, 3, 4]
    assert _same_weights(base / "stopped" / "checkpoint-4", base / "straight" / "checkpoint-4")
    assert not _same_weights(base / "stopped" / "checkpoint-2", base / "stopped" / "checkpoint-4")


def test_a_second_signal_exits_at_once(base):
    proc = _worker(base, "twice", at=2, times=2)
    assert proc.returncode == 128 + 15
    assert "SIGTERM again: exiting now, without saving" in proc.stderr
    assert not list((base / "twice").glob("checkpoint-*"))


def test_sigterm_to_one_of_two_ranks_saves_the_same_step_on_both(base):
    env_rank = {"PREEMPT_AT": "2", "PREEMPT_RANK": "1"}
    os.environ.update(env_rank)
    try:
        torchrun(str(HERE / "preempt_worker.py"), *RL, "trainer.output_dir=two-stopped", cwd=base)
        assert _steps(base / "two-stopped") == [1, 2]
        os.environ["PREEMPT_AT"] = "0"
        torchrun(str(HERE / "preempt_worker.py"), *RL, "trainer.output_dir=two-stopped", cwd=base)
        torchrun(str(HERE / "preempt_worker.py"), *RL, "trainer.output_dir=two-straight", cwd=base)
    finally:
        for key in env_rank:
            os.environ.pop(key, None)
    assert _steps(base / "two-stopped") == [1, 2, 3, 4]
    assert _same_weights(base / "two-stopped" / "checkpoint-4", base / "two-straight" / "checkpoint-4")
