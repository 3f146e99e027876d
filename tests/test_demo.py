"""The built-in demo: its task, its tiny model, and a shrunken run of `thinkless-train demo` end to end."""

import json
import random
import re
import shutil
import subprocess

import pytest

from thinkless.demo import task
from thinkless.demo.run import demo_config, mix_weights
from thinkless.modes import mode_of_text
from thinkless.train.config import ConfigError
from thinkless.train.rewards import check_answer, last_boxed


@pytest.mark.parametrize("level", [1, 2, 3, 5])
def test_both_responses_answer_the_sum(level):
    rng = random.Random(level)
    for _ in range(200):
        p = task.sample(level, rng)
        a, b = (int(x) for x in p.text.rstrip("=").split("+"))  # read back from the prompt text
        assert len(p.text) == 2 * level + 2 and (a, b) == (p.a, p.b)
        for response, mode in ((task.short_response(p), "short"), (task.think_response(p), "think")):
            assert mode_of_text(response) == mode
            assert int(last_boxed(response)) == a + b and len(last_boxed(response)) == level + 1
            assert check_answer(last_boxed(response), p.answer)


def test_the_scratchpad_adds_column_by_column():
    rng = random.Random(0)
    for level in range(1, 7):
        for _ in range(100):
            p = task.sample(level, rng)
            pad = task.think_response(p).split("<think>")[1].split("</think>")[0]
            columns = re.findall(r"(\d)(\d)(\d)=(\d)(\d),", pad)
            assert "".join("".join(c) + "," for c in columns) == pad.replace("=", "")
            assert len(columns) == level
            carry, digits = 0, []
            for i, (x, y, c, co, s) in enumerate(columns):  # least significant first
                assert int(x) == p.a // 10**i % 10 and int(y) == p.b // 10**i % 10 and int(c) == carry
                assert int(co) * 10 + int(s) == int(x) + int(y) + carry
                carry = int(co)
                digits.append(s)
            assert int(str(carry) + "".join(reversed(digits))) == p.a + p.b


def test_tokenizer_is_one_token_per_character(tmp_path):
    from thinkless.demo.tiny import build_model
    from thinkless.train.model import control_token_ids, load_model, load_tokenizer

    build_model(tmp_path, hidden=16)
    tokenizer = load_tokenizer(str(tmp_path))
    p = task.Problem(4, 77, 9305)
    response = task.think_response(p)
    ids = tokenizer(p.text + response, add_special_tokens=False)["input_ids"]
    pieces = re.findall(r"<short>|</think>|<think>|\\boxed\{|.", p.text + response)
    assert len(ids) == len(pieces) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == p.text + response
    assert set(control_token_ids(tokenizer).values()) <= set(ids) | {tokenizer.convert_tokens_to_ids("<short>")}
    model = load_model(str(tmp_path), tokenizer, demo_config(), __import__("torch").device("cpu"))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


def test_mix_and_bad_demo_settings():
    assert mix_weights(demo_config()) == [3, 1, 1, 1, 1]
    assert mix_weights(demo_config(None, ["demo.levels=3", "demo.mix=2"])) == [2, 2, 2]
    for bad in (["demo.mix=1,x"], ["demo.mix=0"], ["demo.levels=2", "demo.mix=1,1,1"], ["demo.mix=-1,2"]):
        with pytest.raises(ConfigError, match="demo.mix"):
            mix_weights(demo_config(None, bad))
    with pytest.raises(ConfigError, match="demo.levels"):
        demo_config(None, ["demo.levels=0"])


SHRUNKEN = [
    "demo.levels=3", "demo.warmup_steps=12", "demo.warmup_batch_size=16", "demo.eval_problems=8",
    "demo.hidden_size=32", "trainer.total_steps=3", "trainer.batch_size=4", "rollout.n=4", "trainer.save_every=2",
]  # fmt: skip


def test_shrunken_demo_writes_report_metrics_and_plots(tmp_path):
    exe = shutil.which("thinkless-train")
    assert exe, "thinkless-train is not on PATH: install the package (see README)"
    out = tmp_path / "demo"
    proc = subprocess.run([exe, "demo", f"trainer.output_dir={out}", *SHRUNKEN], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [lv["name"] for lv in report["levels"]] == ["1-digit", "2-digit", "3-digit"]
    for lv in report["levels"]:
        for stage in ("warmup", "final"):
            figures = lv[stage]
            assert 0 <= figures["accuracy"] <= 1 and 0 <= figures["think_ratio"] <= 1
            assert figures["mean_tokens"] > 0 and figures["n"] == 8
    # The report is what the evaluation files say (warm-up: the SFT run's folder; final: the demo's).
    final = json.loads((out / "eval" / "2-digit.json").read_text())
    warm = json.loads((out / "warmup" / "eval" / "2-digit.json").read_text())
    assert report["levels"][1]["final"]["accuracy"] == final["accuracy"]
    assert report["levels"][1]["warmup"]["think_ratio"] == warm["think_ratio"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    tags = {k.split("/")[1] for r in rows for k in r if k.startswith("think_ratio/")}
    assert tags and tags <= {"1-digit", "2-digit", "3-digit"}
    for r in rows:  # the overall ratio is a weighted mean of the per-level ones
        per_level = [v for k, v in r.items() if k.startswith("think_ratio/")]
        assert min(per_level) - 1e-9 <= r["think_ratio"] <= max(per_level) + 1e-9
    for png in ("think_ratio.png", "accuracy.png", "response_length.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "warm-up" in proc.stdout and "mean" in proc.stdout  # the before/after table
    # The final policy loads as a plain Hugging Face model.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "checkpoint-3") is not None

    # Run again: every stage finds its work done (no new metrics lines), and the report is rebuilt the same.
    again = subprocess.run([exe, "demo", f"trainer.output_dir={out}", *SHRUNKEN], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "report.json").read_text())["levels"] == report["levels"]


def test_a_signal_during_a_stage_stops_the_demo(tmp_path, monkeypatch, capsys):
    """SIGTERM during the warm-up: the stage saves its step and returns; the demo must then stop (the same command
    resumes), not evaluate and train RL from a half-trained warm-up."""
    import signal
    from types import SimpleNamespace

    from thinkless.demo import run as demo
    from thinkless.train import rl, sft
    from thinkless.train.config import load_config

    stopped = SimpleNamespace(preemption=SimpleNamespace(received=signal.SIGTERM))
    monkeypatch.setattr(sft, "run_sft", lambda config: stopped)
    monkeypatch.setattr(rl, "run_rl", lambda config: pytest.fail("RL after a stopped warm-up"))
    monkeypatch.setattr(demo, "evaluate", lambda *a, **k: pytest.fail("evaluated a stopped warm-up"))
    config = load_config(None, [f"trainer.output_dir={tmp_path / 'demo'}", *SHRUNKEN], defaults=demo.DEFAULTS)
    assert demo.run_demo(config) is None
    assert "stopped during the warm-up; run the same command to resume" in capsys.readouterr().out
    assert not (tmp_path / "demo" / "report.json").exists()


def test_bad_demo_setting_is_one_line_before_any_work(tmp_path):
    exe = shutil.which("thinkless-train")
    proc = subprocess.run(
        [exe, "demo", f"trainer.output_dir={tmp_path / 'd'}", "demo.mix=1,x"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "demo.mix" in proc.stderr and not (tmp_path / "d" / "model").exists()
