"""Fault tolerance: damaged checkpoints are detected and skipped at resume, a failed save leaves the previous ones
intact; each run ends bit-identical to an uninterrupted one (CPU, tiny random Qwen2, real MATH problems)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from thinkless.cli import main
from thinkless.train.checkpoint import MANIFEST, verify_checkpoint


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
        "algo.lr=1e-3", "algo.entropy_coef=0.01", "trainer.total_steps=4", "trainer.save_every=1",
        "trainer.keep_last=3", f"trainer.output_dir={out}", *extra,
    ]  # fmt: skip


def _weights(checkpoint):
    return load_file(checkpoint / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(workdir):
    out = workdir / "straight"
    assert main(_args(workdir, out)) == 0
    # every step moves the weights (the entropy term: a random model's rewards are all equal, its advantages 0)
    steps = [_weights(out / f"checkpoint-{k}") for k in (2, 3, 4)]
    assert not _same(steps[0], steps[1]) and not _same(steps[1], steps[2])
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


@pytest.mark.parametrize("cut", ["model.safetensors", "trainer_state.pt"])
def test_a_truncated_checkpoint_is_skipped_and_the_run_ends_identical(workdir, straight, tmp_path, cut):
    out = tmp_path / "truncated"
    assert main(_args(workdir, out, "trainer.total_steps=3")) == 0
    weights = out / "checkpoint-3" / cut
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.warns(UserWarning, match=rf"checkpoint-3 is damaged \({cut} has \d+ bytes"):
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


def _poison(monkeypatch, steps: set[int], where: str):
    """From the RL loop's mini-batch backward: a NaN in the loss of one micro-batch (`loss`) or in one gradient
    (`grad`, a hook on a parameter's gradient), at the given steps."""
    from thinkless.train import policy_loss, rl

    real = rl.mini_batch_backward
    calls = []

    def poisoned(model, *args, **kw):
        calls.append(1)
        if len(calls) not in steps:
            return real(model, *args, **kw)
        if where == "grad":
            param = next(p for p in model.parameters() if p.requires_grad)
            handle = param.register_hook(lambda g: g * float("nan"))
            try:
                return real(model, *args, **kw)
            finally:
                handle.remove()
        real_loss = policy_loss.policy_loss
        monkeypatch.setattr(policy_loss, "policy_loss", lambda *a, **k: _nan_loss(real_loss(*a, **k)))
        try:
            return real(model, *args, **kw)
        finally:
            monkeypatch.setattr(policy_loss, "policy_loss", real_loss)

    monkeypatch.setattr(rl, "mini_batch_backward", poisoned)


def _nan_loss(result):
    loss, metrics = result
    return loss * float("nan"), metrics


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_a_non_finite_update_is_skipped(workdir, tmp_path, monkeypatch, where):
    out = tmp_path / where
    _poison(monkeypatch, {2}, where)
    with pytest.warns(UserWarning, match=f"step 2: non-finite {'loss' if where == 'loss' else 'grad_norm'}"):
        assert main(_args(workdir, out, "trainer.total_steps=3")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in rows] == [0, 1, 0]
    # the update of step 2 never happened: its weights and optimizer state are step 1's
    assert _same(_weights(out / "checkpoint-2"), _weights(out / "checkpoint-1"))
    s1 = torch.load(out / "checkpoint-1" / "trainer_state.pt", weights_only=False)["optimizer"]
    s2 = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)["optimizer"]
    assert s1["state"].keys() == s2["state"].keys()
    for name in s1["state"]:
        for key, value in s1["state"][name].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s2["state"][name][key])), (name, key)
    assert not _same(_weights(out / "checkpoint-3"), _weights(out / "checkpoint-2"))  # step 3 trained again
    assert all(torch.isfinite(t).all() for t in _weights(out / "checkpoint-3").values())


def test_three_skipped_updates_in_a_row_stop_the_run(workdir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "stop"
    _poison(monkeypatch, {2, 3, 4}, "loss")
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert main(_args(workdir, out, "trainer.save_every=2")) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("thinkless-train rl: error: step 4: 3 updates in a row skipped") and "checkpoint-2" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert verify_checkpoint(out / "checkpoint-2") is None


def test_a_non_finite_weight_is_never_saved(workdir, tmp_path, monkeypatch, capsys):
    from thinkless.train.run import Run

    real = Run.save

    def corrupt_then_save(self, step):
        if step == 2:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("inf")
        return real(self, step)

    monkeypatch.setattr(Run, "save", corrupt_then_save)
    out = tmp_path / "inf"
    assert main(_args(workdir, out)) == 1
    assert "step 2: the model has a non-finite weight; checkpoint-2 is not written" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]


def test_a_save_below_a_damaged_checkpoint_sets_it_aside(workdir, tmp_path):
    """keep_last=1: the only checkpoint (3) is damaged, the run starts over and stops at step 2: checkpoint-2 is
    kept (not pruned for the damaged, higher one), which goes to checkpoint-3.damaged and is never resumed from."""
    from thinkless.train.checkpoint import latest_checkpoint

    out = tmp_path / "aside"
    assert main(_args(workdir, out, "trainer.total_steps=3", "trainer.keep_last=1")) == 0
    weights = out / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"resuming from model.path \(no other checkpoint is left\)"):
        assert main(_args(workdir, out, "trainer.total_steps=2", "trainer.keep_last=1")) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-2", "checkpoint-3.damaged"
    ]  # fmt: skip
    assert latest_checkpoint(out) == out / "checkpoint-2"


def test_any_write_error_of_a_save_is_a_checkpoint_error(tmp_path):
    """safetensors reports a full disk as its own SafetensorError (an Exception, not an OSError)."""
    from thinkless.train.checkpoint import CheckpointError, save_checkpoint

    class SafetensorError(Exception):
        pass

    class Model:
        def save_pretrained(self, folder, state_dict=None):
            Path(folder).mkdir(parents=True)
            raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    with pytest.raises(CheckpointError, match=r"checkpoint-5: SafetensorError: Error while serializing.*no earlier"):
        save_checkpoint(tmp_path, 5, Model(), None, {}, keep_last=2)
    assert not list(tmp_path.iterdir())  # no checkpoint-5.tmp left behind


@pytest.mark.parametrize(
    "manifest", ['{"files": ["x"]}', '{"files": {"a": 3}}', '{"files": {"a": {"bytes": "x"}}}', "[1]", '{"files"']
)
def test_a_manifest_of_the_wrong_shape_is_damage_not_a_crash(tmp_path, manifest):
    from thinkless.train.checkpoint import MANIFEST, verify_checkpoint

    (tmp_path / MANIFEST).write_text(manifest)
    assert verify_checkpoint(tmp_path).startswith(f"{MANIFEST} unreadable")
