"""`thinkless-train plot RUN_DIR`: PNG figures from a run's metrics.jsonl; bad folders are one-line errors."""

import json
import math
import shutil
import subprocess

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def exe():
    path = shutil.which("thinkless-train")
    assert path, "thinkless-train is not on PATH: install the package (see README)"
    return path


def _rl_rows(steps: int) -> list[dict]:
    rows = []
    for s in range(1, steps + 1):
        think = 0.5 + 0.4 * math.sin(s / 5)
        rows.append({
            "step": s, "loss": 0.1, "reward_mean": -0.5 + s / steps, "think_ratio": think, "acc": 0.3 + s / 100,
            "acc_short": 0.2, "acc_think": 0.6, "response_tokens_mean": 100 + s, "response_tokens_short": 20.0,
            "response_tokens_think": 300.0, "think_ratio/Level 1": think / 2, "think_ratio/Level 5": 1.0,
        })  # fmt: skip
    rows[3].update(think_ratio=1.0, acc_short=0.0, response_tokens_short=0.0)  # no short sample: RL logs 0 there
    return rows


def test_plot_writes_valid_pngs(exe, tmp_path):
    import matplotlib.image

    run = tmp_path / "run"
    run.mkdir()
    rows = _rl_rows(40)
    lines = [json.dumps(r) for r in rows]
    lines.insert(10, json.dumps({"step": 10, "val/math500/accuracy": 0.4, "val/math500/think_ratio": 0.3}))
    lines.append('{"step": 41, "loss": 0.')  # a line a crash cut short
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([exe, "plot", str(run)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = ["think_ratio.png", "accuracy.png", "response_length.png", "reward.png", "validation.png"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(names)
    assert proc.stdout.split() == [str(run / "plots" / n) for n in names]
    for name in names:
        path = run / "plots" / name
        assert path.read_bytes()[:8] == PNG
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plot_skips_steps_without_a_mode():
    """A step that sampled no <short> answer has no short accuracy (thinkless 0.1's RL metrics logged 0 there)."""
    from thinkless.train.plot import series

    rows = _rl_rows(6)
    steps, values = series(rows, "accuracy_short", "short")  # the old run's acc_short, under today's name
    assert steps == [1, 2, 3, 5, 6] and values == [0.2] * 5
    assert series(rows, "accuracy_think", "think")[0] == [1, 2, 3, 4, 5, 6]


def test_plot_reads_todays_names_first_and_skips_null():
    """Today's rows: `accuracy_short` is null when the step sampled no <short> answer; the old alias beside it (0
    there) is not read then, and a run with both names plots today's."""
    from thinkless.train.plot import metric, series

    rows = [
        {"step": 1, "think_ratio": 0.5, "accuracy_short": 0.25, "acc_short": 0.25, "accuracy/L1": 0.5},
        {"step": 2, "think_ratio": 1.0, "accuracy_short": None, "acc_short": 0.0, "acc/L1": 0.75},
        {"step": 3, "think_ratio": 0.5, "accuracy_short": 0.75, "acc_short": 0.5},
    ]
    assert series(rows, "accuracy_short") == ([1, 3], [0.25, 0.75])
    assert [metric(r, "accuracy/L1") for r in rows] == [0.5, 0.75, None]  # `acc/<tag>` of an older run
    assert metric({"think_ratio": True}, "think_ratio") is None  # a boolean is no figure


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no-such-run: no such folder"),
        ("empty", "metrics.jsonl: no such file"),
        ("sft", "metrics.jsonl: no RL steps (rows with think_ratio); plot draws an rl run, not an sft one"),
    ],
)
def test_bad_run_folders_are_one_line_errors(exe, tmp_path, setup, message):
    run = tmp_path / "no-such-run"
    if setup != "missing":
        run.mkdir()
    if setup == "sft":
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "lr": 1e-5}\n{"step": 2, "loss": 2.1}\n')
    proc = subprocess.run([exe, "plot", str(run)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"thinkless-train plot: error: {run}" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (run / "plots").exists()


def test_plot_takes_a_folder_not_settings(exe, tmp_path):
    proc = subprocess.run([exe, "plot", str(tmp_path), "rollout.n=8"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unrecognized argument: rollout.n=8" in proc.stderr
    proc = subprocess.run([exe, "plot"], capture_output=True, text=True)
    assert proc.returncode == 2 and "RUN_DIR" in proc.stderr
