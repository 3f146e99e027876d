"""Fault tolerance: damaged checkpoints are detected and skipped at resume, a failed save leaves the previous ones
intact; each run ends bit-identical to an uninterrupted one (CPU, tiny random Qwen2, real MATH problems)."""

from __future__ import annotations

import json

import pytest
import tiny
import torch
from safetensors.torch import load_file

from thinkless.train.checkpoint import MANIFEST, verify_checkpoint
from thinkless.train.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    tok = tiny.make_tokenizer(root / "base")
    tiny.make_model(root / "base", tok)
    rows = json.loads((tiny.DATA / "math_train.json").read_text())[:16]
    (root / "rl.json").write_text(json.dumps([{"problem": r["problem"], "answer": r["answer"]} for r in rows]))
    return root


def _args(workdir, out, *extra) -> list[str]:
    return [
        "rl", f"model.path={workdir / 'base'}", f"data.train_files=[{workdir / 'rl.json'}]", "rollout.n=4",
        "rollout.max_new_tokens=8", "rollout.temperature=1.0", "trainer.batch_size=2", "algo.micro_batch_size=4",
        "algo.lr=1e-3", "trainer.total_steps=4", "trainer.save_every=1", "trainer.keep_last=3",
        f"trainer.output_dir={out}", *extra,
    ]  # fmt: skip


def _weights(checkpoint):
    return load_file(checkpoint / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(workdir):
    out = workdir / "straight"
    assert main(_args(workdir, out)) == 0
    return out


def test_every_checkpoint_has_a_manifest_that_catches_damage(straight, tmp_path):
    import shutil

    ckpt = straight / "checkpoint-4"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {"model.safetensors", "trainer_state.pt", "config.json"} <= set(files)
    assert verify_checkpoint(ckpt) is None
    copy = tmp_path / "checkpoint-4"
    shutil.copytree(ckpt, copy)
    data = bytearray((copy / "trainer_state.pt").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, the size unchanged
    (copy / "trainer_state.pt").write_bytes(bytes(data))
    assert verify_checkpoint(copy) == "trainer_state.pt does not match its checksum"
    (copy / "tokenizer.json").unlink()
    assert verify_checkpoint(copy) == "tokenizer.json is missing"


def test_a_truncated_checkpoint_is_skipped_and_the_run_ends_identical(workdir, straight, tmp_path):
    out = tmp_path / "truncated"
    assert main(_args(workdir, out, "trainer.total_steps=3")) == 0
    weights = out / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.warns(UserWarning, match=r"checkpoint-3 is damaged \(model.safetensors has \d+ bytes"):
        assert main(_args(workdir, out)) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 again, from checkpoint-2
    assert verify_checkpoint(out / "checkpoint-3") is None  # written again, whole
    assert _same(_weights(out / "checkpoint-4"), _weights(straight / "checkpoint-4"))


def test_a_failed_save_keeps_the_previous_checkpoint_and_a_rerun_finishes(workdir, straight, tmp_path, monkeypatch,
                                                                          capsys):  # fmt: skip
    from thinkless.train import checkpoint as ckpt_mod

    out = tmp_path / "full"
    real, calls = ckpt_mod.torch.save, []

    def disk_full(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # checkpoint-2's trainer state
            raise OSError(28, "No space left on device")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full)
    assert main(_args(workdir, out)) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "checkpoint-2: OSError" in err and "checkpoint-1 is intact" in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("thinkless-train rl: error: could not write") and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert verify_checkpoint(out / "checkpoint-1") is None
    monkeypatch.undo()
    assert main(_args(workdir, out)) == 0
    assert _same(_weights(out / "checkpoint-4"), _weights(straight / "checkpoint-4"))
