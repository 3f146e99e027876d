"""The installed `thinkless-train` entry point."""

import shutil
import subprocess

import pytest


@pytest.fixture
def exe():
    path = shutil.which("thinkless-train")
    assert path, "thinkless-train is not on PATH: install the package (see README)"
    return path


def test_help_lists_the_stages(exe):
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for stage in ("sft", "rl", "eval", "demo"):
        assert stage in out


def test_demo_help_shows_the_demo_defaults(exe):
    out = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, check=True).stdout
    assert "trainer.output_dir = 'thinkless-runs/demo'" in out and "rollout.temperature = 1.0" in out
    rl = subprocess.run([exe, "rl", "--help"], capture_output=True, text=True, check=True).stdout
    assert "trainer.output_dir = 'thinkless-runs/run'" in rl and "rollout.temperature = 0.6" in rl


def test_stage_help_lists_every_setting(exe):
    out = subprocess.run([exe, "rl", "--help"], capture_output=True, text=True, check=True).stdout
    assert "rollout.n = 8" in out and "algo.alpha = 0.001" in out and "trainer.save_every" in out


def test_unknown_key_is_one_clear_line(exe):
    proc = subprocess.run([exe, "rl", "rollout.nn=8"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown key 'rollout.nn'; the keys of 'rollout' are: n, temperature" in proc.stderr


def test_overrides_may_follow_the_config_file(exe, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rollout:\n  n: 4\n")
    for args in (["--config", str(path), "rollout.nn=8"], ["rollout.nn=8", "--config", str(path)]):
        proc = subprocess.run([exe, "rl", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and "unknown key 'rollout.nn'" in proc.stderr, proc.stderr
