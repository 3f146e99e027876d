"""The trainer end to end on a tiny random Qwen2 and real MATH problems: sft, rl (crash and resume), eval."""

import importlib.util
import json
import subprocess
import sys

import pytest
import tiny
import torch

from thinkless.train.config import ConfigError, load_config
from thinkless.train.metrics import MetricsLog

N_PROBLEMS = 24


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok = tiny.make_tokenizer(root / "base")
    tiny.make_model(root / "base", tok)
    rows = json.loads((tiny.DATA / "math_train.json").read_text())[:N_PROBLEMS]
    hybrid = []
    for r in rows:  # both modes for every problem, as the warm-up data has them
        hybrid.append({"problem": r["problem"], "response": f"<short>The answer is \\boxed{{{r['answer']}}}."})
        thought = r["problem"][:60]
        hybrid.append({"problem": r["problem"], "response": f"<think>{thought}</think> \\boxed{{{r['answer']}}}"})
    (root / "sft.jsonl").write_text("\n".join(json.dumps(x) for x in hybrid))
    (root / "rl.json").write_text(json.dumps([{"problem": r["problem"], "answer": r["answer"]} for r in rows]))
    (root / "val.json").write_text(json.dumps([{"problem": r["problem"], "answer": r["answer"]} for r in rows[:6]]))
    return root


def _config(workdir, stage, *extra):
    common = ["trainer.batch_size=4", "algo.micro_batch_size=4", "trainer.keep_last=2"]
    if stage == "sft":
        settings = [f"model.path={workdir / 'base'}", f"data.train_files=[{workdir / 'sft.jsonl'}]"]
        settings += [f"trainer.output_dir={workdir / 'sft'}", "trainer.total_steps=6", "trainer.save_every=3"]
        settings += ["algo.lr=3e-3", "data.max_length=128"]
    else:
        settings = [f"model.path={workdir / 'sft'}", f"data.train_files=[{workdir / 'rl.json'}]", "rollout.n=4"]
        settings += ["rollout.max_new_tokens=12", "rollout.temperature=1.0", "trainer.total_steps=4"]
        settings += ["trainer.save_every=2", "algo.lr=1e-4"]
    return load_config(None, [*settings, *common, *extra])


def _steps(folder):
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sft_rl_crash_resume_eval(workdir, monkeypatch):
    from thinkless.train.eval import run_eval
    from thinkless.train.rl import run_rl
    from thinkless.train.sft import run_sft

    run_sft(_config(workdir, "sft"))
    sft_rows = [json.loads(line) for line in (workdir / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sft_rows] == [1, 2, 3, 4, 5, 6]
    assert sft_rows[-1]["loss"] < sft_rows[0]["loss"]  # it learns
    assert sorted(p.name for p in (workdir / "sft").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # A straight RL run, for reference.
    # With a KL reference lacking the control tokens: loading it resizes its embeddings, which draws random numbers.
    # Validated before the first step and every second one (trainer.val_*), with the authors' extra terms on.
    kl = ["algo.kl_coef=0.02", f"model.ref_path={workdir / 'base'}", "algo.kl_clamp=10", "algo.entropy_coef=0.001"]
    kl += [f"trainer.val_files=[{workdir / 'val.json'}]", "trainer.val_every=2", "trainer.val_n=2"]
    run_rl(_config(workdir, "rl", f"trainer.output_dir={workdir / 'straight'}", *kl))
    straight = [json.loads(line) for line in (workdir / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in straight] == [0, 1, 2, 3, 4]
    val_keys = {"val/val/accuracy", "val/val/think_ratio", "val/val/mean_tokens"}
    assert [val_keys <= set(r) for r in straight] == [True, False, True, False, True]
    for step in (0, 2, 4):
        report = json.loads((workdir / "straight" / "eval" / f"step-{step}" / "val.json").read_text())
        assert report["n"] == 2 * 6 and report["accuracy"] == straight[step]["val/val/accuracy"]
    straight = straight[1:]  # the training steps
    from thinkless.cli import main as cli_main

    assert cli_main(["plot", str(workdir / "straight")]) == 0  # the figures of a real run, validation included
    for name in ("think_ratio", "accuracy", "response_length", "reward", "validation"):
        assert (workdir / "straight" / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for key in (
        "loss",
        "control_loss",
        "response_loss",
        "reward_mean",
        "think_ratio",
        "acc_short",
        "acc_think",
        "response_tokens_mean",
        "response_tokens_short",
        "response_tokens_think",
        "groups_all_correct",
        "groups_all_wrong",
        "groups_all_correct_think",
        "groups_all_correct_short",
        "groups_mixed_modes",
        "clip_frac",
        "kl",
        "entropy",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "step_seconds",
        "rollout_seconds",
        "logprob_seconds",
        "update_seconds",
    ):
        assert key in straight[0], key  # fmt: skip
    for row in straight:  # the three phases split the step's time, each one a real stretch of it
        phases = [row["rollout_seconds"], row["logprob_seconds"], row["update_seconds"]]
        assert all(t > 0 for t in phases) and sum(phases) == pytest.approx(row["step_seconds"], rel=1e-9)
        assert 0 < row["sample_seconds"] <= row["rollout_seconds"]  # the generation, inside the rollout phase

    # The same run, killed after logging step 3 (its last checkpoint is step 2) and with a half-written
    # checkpoint-4.tmp left behind, then started again with the same command.
    out = workdir / "crashed"
    log = MetricsLog.log

    def dies_after_step_3(self, step, metrics):
        row = log(self, step, metrics)
        if step == 3:
            (out / "checkpoint-4.tmp").mkdir()
            raise KeyboardInterrupt
        return row

    monkeypatch.setattr(MetricsLog, "log", dies_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_rl(_config(workdir, "rl", f"trainer.output_dir={out}", *kl))
    monkeypatch.undo()
    assert _steps(out) == [0, 1, 2, 3]
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 0.')  # and the crash cut a line short
    run_rl(_config(workdir, "rl", f"trainer.output_dir={out}", *kl))
    assert _steps(out) == [0, 1, 2, 3, 4]  # each step exactly once, the validation before training kept
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = json.loads((workdir / "straight" / "metrics.jsonl").read_text().splitlines()[0])
    drop_time = lambda row: {k: v for k, v in row.items() if k != "val_seconds"}  # noqa: E731
    assert drop_time(resumed[0]) == drop_time(first)  # validation draws from its own seed: the same numbers
    resumed = resumed[1:]
    for a, b in zip(straight, resumed, strict=True):  # RNG, optimizer and data position all came back
        for key in val_keys & set(a):  # validations of the same weights, in order
            assert a[key] == b[key], (a["step"], key)
        assert a["reward_mean"] == b["reward_mean"] and a["response_tokens_mean"] == b["response_tokens_mean"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
        assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-9)

    config = _config(workdir, "rl", f"model.path={out}", f"trainer.output_dir={out}",
                     f"data.val_files=[{workdir / 'rl.json'}]", "rollout.n=2")  # fmt: skip
    (report,) = run_eval(config)
    saved = json.loads((out / "eval" / "rl.json").read_text())
    assert saved == report and saved["n"] == 2 * N_PROBLEMS
    for key in ("accuracy", "think_ratio", "mean_tokens"):
        assert saved[key] >= 0 and (key == "mean_tokens" or saved[key] <= 1)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "thinkless.cli", *args], capture_output=True, text=True)


def test_bad_input_fails_before_training_with_one_line(workdir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?"}]))
    cases = [
        (["rl", f"model.path={workdir / 'base'}", f"data.train_files=[{bad}]"], "bad.json: row 1: missing 'answer'"),
        (["rl", f"model.path={tmp_path / 'no-model'}", f"data.train_files=[{workdir / 'rl.json'}]"], "no such folder"),
        (["sft", "trainer.outputdir=x"], "unknown key 'trainer.outputdir'; the keys of 'trainer' are: output_dir"),
    ]
    for args, message in cases:
        proc = _cli(*args, f"trainer.output_dir={tmp_path / 'run'}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_rl_with_kl_filtered_groups_and_short_prompts(workdir, capsys):
    """The reference model and its KL term (padding-free), zero-variance groups dropped, long prompts dropped with a
    count."""
    from thinkless.train.rl import run_rl

    if not (workdir / "sft").exists():
        from thinkless.train.sft import run_sft

        run_sft(_config(workdir, "sft"))
    out = workdir / "kl"
    kl = ["algo.kl_coef=0.05", "algo.kl_type=k3", f"model.ref_path={workdir / 'base'}"]
    kl += ["algo.padding_free=true", "algo.micro_batch_tokens=400"]  # packed, dynamic micro-batches
    config = _config(
        workdir, "rl", f"trainer.output_dir={out}", "trainer.total_steps=2", "data.max_prompt_tokens=150", *kl
    )
    run_rl(config)
    assert "prompts longer than 150 tokens" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # The reference is the untrained base model and the policy its SFT'd descendant: their KL is positive.
    assert all(r["updates"] == 1 and r["kl"] > 0 for r in rows)

    out = workdir / "filtered"
    run_rl(_config(workdir, "rl", f"trainer.output_dir={out}", "algo.filter_groups=true", "trainer.total_steps=2"))
    for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()):
        # Groups whose samples all failed have equal rewards and are dropped; no group left, no update.
        assert r["updates"] == (0 if r["groups_all_wrong"] == 4 else 1)


@pytest.mark.parametrize(
    "padding_free,compile", [(False, False), (True, True)], ids=["padded-generate", "packed-compiled"]
)
def test_on_policy_shortcut_equals_the_separate_pass(workdir, monkeypatch, padding_free, compile):
    """One update per step: the old log-probs come from the training forward (ratio 1), no separate pass. The
    losses, metrics and trained weights equal those of the path it replaces (a separate old-policy pass); with
    either rollout (HF generate, the compiled static-cache decoder)."""
    from safetensors.torch import load_file

    from thinkless.train import rl

    def run(name, shortcut):
        with monkeypatch.context() as m:
            if not shortcut:
                m.setattr(rl, "on_policy", lambda config, model: False)
            out = workdir / name
            rl.run_rl(_config(
                workdir, "rl", f"model.path={workdir / 'base'}", f"trainer.output_dir={out}", "trainer.total_steps=2",
                "algo.entropy_coef=0.05", "algo.kl_coef=0.05", f"model.ref_path={workdir / 'base'}",
                f"algo.padding_free={str(padding_free).lower()}", "algo.micro_batch_size=3",
                f"rollout.compile={str(compile).lower()}",
            ))  # fmt: skip
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return rows, load_file(out / "checkpoint-2" / "model.safetensors")

    (fast, fast_weights), (slow, slow_weights) = run("shortcut", True), run("separate", False)
    assert [r["logprob_path"] for r in fast] == ["on_policy"] * 2 and [r["logprob_path"] for r in slow] == [
        "separate"
    ] * 2
    for a, b in zip(fast, slow, strict=True):
        assert a["response_tokens_mean"] == b["response_tokens_mean"] and a["reward_mean"] == b["reward_mean"]
        for key in ("loss", "control_loss", "response_loss", "kl", "entropy", "grad_norm", "rollout_logp_diff"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["clip_frac"] == 0.0 and a["rollout_logp_diff"] < 1e-4
    assert fast_weights.keys() == slow_weights.keys()
    changed = 0
    for name, w in fast_weights.items():
        torch.testing.assert_close(w, slow_weights[name], rtol=1e-5, atol=1e-7)
        changed += int(not torch.equal(w, load_file(workdir / "base" / "model.safetensors").get(name, w)))
    assert changed > 0  # the steps trained something


def test_on_policy_needs_one_update_and_a_deterministic_forward(workdir):
    """The shortcut's conditions: one PPO epoch over one mini-batch, no importance correction, no dropout (a layer,
    a config rate, or an MoE router's jitter)."""
    from thinkless.train.model import load_model, load_tokenizer
    from thinkless.train.rl import on_policy

    config = _config(workdir, "rl", f"model.path={workdir / 'base'}")
    model = load_model(str(workdir / "base"), load_tokenizer(str(workdir / "base")), config, torch.device("cpu"))
    assert on_policy(config, model)
    for override in ("algo.ppo_epochs=2", "algo.mini_batch_size=2", "algo.is_correction=true"):
        assert not on_policy(_config(workdir, "rl", override), model), override
    assert on_policy(_config(workdir, "rl", "algo.mini_batch_size=4"), model)  # = trainer.batch_size: one
    for name, value in (("attention_dropout", 0.1), ("router_jitter_noise", 0.01)):
        setattr(model.config, name, value)
        assert not on_policy(config, model), name
        setattr(model.config, name, 0.0)
    model.model.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    assert not on_policy(config, model)


def test_sft_options_checkpointing_epochs_and_reporting(workdir, tmp_path):
    """Gradient checkpointing gives the same SFT step; PPO epochs and mini-batches multiply the updates; a missing
    report_to package is a one-line settings error."""
    from thinkless.train.config import ConfigError
    from thinkless.train.rl import run_rl
    from thinkless.train.sft import run_sft

    rows = {}
    for flag in ("false", "true"):
        out = tmp_path / f"ckpt-{flag}"
        run_sft(_config(workdir, "sft", f"trainer.output_dir={out}", "trainer.total_steps=1",
                        f"model.gradient_checkpointing={flag}"))  # fmt: skip
        rows[flag] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert rows["true"]["loss"] == pytest.approx(rows["false"]["loss"], rel=1e-5)
    assert rows["true"]["grad_norm"] == pytest.approx(rows["false"]["grad_norm"], rel=1e-4)

    if not (workdir / "sft").exists():
        run_sft(_config(workdir, "sft"))
    out = tmp_path / "epochs"
    run_rl(_config(workdir, "rl", f"trainer.output_dir={out}", "trainer.total_steps=1", "algo.ppo_epochs=2",
                   "algo.mini_batch_size=2", "algo.micro_batch_size=3"))  # fmt: skip
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["updates"] == 2 * 2  # 2 epochs x (4 prompts / 2 per mini-batch)

    missing = [name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name) is None]
    if missing:
        with pytest.raises(ConfigError, match=f"trainer.report_to={missing[0]} needs the package"):
            run_sft(_config(workdir, "sft", f"trainer.output_dir={tmp_path / 'r'}", f"trainer.report_to={missing[0]}"))


def test_stage_folders_and_rollout_sampling(workdir, tmp_path):
    """An RL run refuses an SFT run's folder; rollouts ignore the model's own top_k / repetition_penalty."""
    from thinkless.train.config import ConfigError
    from thinkless.train.model import load_model, load_tokenizer
    from thinkless.train.rl import run_rl
    from thinkless.train.rollout import generate, stop_token_ids
    from thinkless.train.sft import run_sft

    if not (workdir / "sft").exists():
        run_sft(_config(workdir, "sft"))
    with pytest.raises(ConfigError, match=r"holds a sft run \(checkpoint-6\); give rl its own output_dir"):
        run_rl(_config(workdir, "rl", f"trainer.output_dir={workdir / 'sft'}"))

    config = _config(workdir, "rl", "rollout.n=6", "rollout.max_new_tokens=8", "rollout.temperature=1.0")
    tokenizer = load_tokenizer(str(workdir / "base"))
    model = load_model(str(workdir / "base"), tokenizer, config, torch.device("cpu"), trainable=False)
    model.generation_config.top_k = 1  # would make every sample the greedy one
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert stop_token_ids(model, tokenizer) == sorted(model.generation_config.eos_token_id)
    torch.manual_seed(0)
    ro = generate(model, tokenizer, ["<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"], config.rollout)
    assert len({tuple(row.tolist()) for row in ro.input_ids}) > 1  # sampled, not greedy
    P = ro.input_ids.shape[1] - 8
    for row, mask in zip(ro.input_ids[:, P:], ro.response_mask[:, P:], strict=True):
        stops = torch.isin(row, torch.tensor(stop_token_ids(model, tokenizer)))
        first = int(stops.nonzero()[0]) if stops.any() else len(row) - 1
        assert mask[: first + 1].all() and not mask[first + 1 :].any()  # up to and including the first stop


def test_sft_data_that_leaves_nothing_to_learn(workdir, tmp_path):
    from thinkless.train.data import DataError
    from thinkless.train.sft import run_sft

    with pytest.raises(DataError, match=r"no SFT example has a response token within data.max_length=8"):
        run_sft(_config(workdir, "sft", f"trainer.output_dir={tmp_path / 'x'}", "data.max_length=8"))
    (tmp_path / "only_assistant.jsonl").write_text(
        json.dumps({"messages": [{"role": "assistant", "content": "<short>1"}]})
    )
    with pytest.raises(DataError, match=r"row 0: 'messages' must end with the assistant's turn, after at least one"):
        run_sft(_config(workdir, "sft", f"data.train_files=[{tmp_path / 'only_assistant.jsonl'}]"))
    with pytest.raises(DataError, match=r"data.train_files is empty"):
        run_sft(_config(workdir, "sft", "data.train_files=[]"))


def test_rollouts_use_the_kv_cache_under_gradient_checkpointing(workdir):
    """Gradient checkpointing turns the config's use_cache off for training; generation must still feed one new token
    per step (with the cache) instead of the whole sequence again."""
    from thinkless.train.model import load_model, load_tokenizer
    from thinkless.train.rollout import generate

    config = _config(workdir, "rl", "model.gradient_checkpointing=true", "rollout.n=2", "rollout.max_new_tokens=6")
    tokenizer = load_tokenizer(str(workdir / "base"))
    model = load_model(str(workdir / "base"), tokenizer, config, torch.device("cpu"))
    assert model.config.use_cache is False and model.is_gradient_checkpointing
    widths = []
    handle = model.register_forward_pre_hook(lambda m, args, kw: widths.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)  # fmt: skip
    try:
        ro = generate(model, tokenizer, ["<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"], config.rollout)
    finally:
        handle.remove()
    assert model.training  # generate puts the mode back
    assert len(widths) >= 2 and widths[0] > 1 and set(widths[1:]) == {1}, widths
    assert ro.input_ids.shape[0] == 2


def test_resume_applies_a_changed_learning_rate(workdir, tmp_path, capsys):
    """The config is the run's truth: a resumed run trains at its algo.lr (and says so), not at the rate that the
    checkpoint's optimizer and scheduler state bring back."""
    from thinkless.train.sft import run_sft

    out = tmp_path / "lr"
    base = [f"trainer.output_dir={out}", "trainer.save_every=2", "algo.warmup_steps=1"]
    run_sft(_config(workdir, "sft", *base, "trainer.total_steps=2", "algo.lr=1e-3"))
    run_sft(_config(workdir, "sft", *base, "trainer.total_steps=4", "algo.lr=4e-4"))
    assert "algo.lr=0.0004 replaces the checkpoint's 0.001" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Warmup over 1 update, then constant: the logged rate after each update is the base rate.
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 4e-4, 4e-4])


def test_resume_reads_the_checkpoint_once(workdir, tmp_path, monkeypatch):
    """Resuming checks the checkpoint's files against their manifest (a CRC over every byte: gigabytes for a real
    model) once, and reads its trainer state (the optimizer's moments) once."""
    from thinkless.train import checkpoint, run
    from thinkless.train.sft import run_sft

    out = tmp_path / "once"
    base = [f"trainer.output_dir={out}", "trainer.save_every=2"]
    run_sft(_config(workdir, "sft", *base, "trainer.total_steps=2"))
    verified, loaded = [], []
    real_verify, real_load = checkpoint.verify_checkpoint, run.load_state
    monkeypatch.setattr(checkpoint, "verify_checkpoint", lambda folder: verified.append(folder) or real_verify(folder))
    monkeypatch.setattr(run, "load_state", lambda folder: loaded.append(folder) or real_load(folder))
    resumed = run.start_run(_config(workdir, "sft", *base, "trainer.total_steps=4"), "sft")
    assert resumed.step == 2 and verified == [out / "checkpoint-2"] and loaded == [out / "checkpoint-2"]
    with pytest.raises(ConfigError, match="holds a sft run"):  # the stage check still reads the same state
        run.start_run(_config(workdir, "rl", *base), "rl")


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_rollout_logprobs_are_those_of_the_sampling_distribution(workdir, top_p, monkeypatch):
    """The HF engine records each sampled token's log-prob under the distribution it was drawn from. With top_p = 1
    that is the trainer's own softmax at the temperature (recomputed here by a full forward); with top_p < 1 the
    nucleus is renormalised: the recorded log-prob exceeds the full softmax's by -log(nucleus mass) >= 0."""
    from thinkless.train.logprobs import sequence_logprobs
    from thinkless.train.model import load_model, load_tokenizer
    from thinkless.train.rollout import generate

    config = _config(workdir, "rl", "rollout.n=3", "rollout.max_new_tokens=10", "rollout.temperature=0.7",
                     f"rollout.top_p={top_p}")  # fmt: skip
    tokenizer = load_tokenizer(str(workdir / "base"))
    model = load_model(str(workdir / "base"), tokenizer, config, torch.device("cpu"), trainable=False)
    # Warpers a model's generation_config may ask for (transformers adds them after the caller's processors, where
    # they would reshape what is sampled behind the recorder's back): never built.
    import transformers.generation.logits_process as lp

    model.generation_config.min_p, model.generation_config.typical_p = 0.3, 0.5
    for name in ("MinPLogitsWarper", "TypicalLogitsWarper"):
        monkeypatch.setattr(getattr(lp, name), "__init__", lambda self, *a, **k: pytest.fail("a late warper"))
    torch.manual_seed(1)
    ro = generate(model, tokenizer, ["<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"] * 2, config.rollout)
    full = sequence_logprobs(model, ro, 0.7, config.algo)
    response = ro.response_mask[:, 1:]
    assert ro.rollout_logp.shape == full.shape and (ro.rollout_logp[~response] == 0).all()
    gap = (ro.rollout_logp - full)[response]
    if top_p == 1.0:
        assert gap.abs().max() < 1e-4
    else:
        assert gap.min() > -1e-4 and gap.max() > 0.01  # renormalised over the nucleus, on some tokens visibly


def test_importance_weights_fold_into_per_token_advantages():
    """TIS weights w = min(exp(old - rollout), cap) on response tokens; a per-token advantage A*w gives the loss of
    the paper's clipped surrogate with each token's term multiplied by w (written out here in float64)."""
    from test_packing import rollouts, tiny_model

    from thinkless.kernels.reference import first_response_token_mask
    from thinkless.train.logprobs import importance_weights, sequence_logprobs
    from thinkless.train.policy_loss import policy_loss

    ro = rollouts([3, 5, 1, 4], [6, 2, 4, 7], seed=3)
    model = tiny_model("sdpa")
    config = load_config(None, ["algo.alpha=0.3", "algo.clip_low=0.1", "algo.clip_high=0.25"])
    gen = torch.Generator().manual_seed(4)
    response = ro.response_mask[:, 1:]
    old = sequence_logprobs(model, ro, 1.0, config.algo).double() + 0.2 * torch.randn(response.shape, generator=gen,
                                                                                       dtype=torch.float64)  # fmt: skip
    rollout_logp = (old + 0.5 * torch.randn(response.shape, generator=gen, dtype=torch.float64)) * response
    weights, stats = importance_weights(old, rollout_logp, response, cap=1.5)
    ratio = (old - rollout_logp).exp()
    assert torch.equal(weights[response], ratio[response].clamp(max=1.5)) and (weights[~response] == 1).all()
    assert stats["is_truncated_frac"] == pytest.approx(float((ratio[response] > 1.5).double().mean()))
    assert 0 < stats["is_truncated_frac"] < 1

    A = torch.randn(4, generator=gen, dtype=torch.float64)
    loss, metrics = policy_loss(model, ro, [0, 1, 2, 3], old, None, A[:, None] * weights, config)
    logp = metrics["logp"].detach().double()
    r = (logp - old).exp()
    a = config.algo
    term = weights * torch.maximum(-A[:, None] * r, -A[:, None] * r.clamp(1 - a.clip_low, 1 + a.clip_high))
    control = first_response_token_mask(response)
    expected = a.alpha * term[control].mean() + term[response & ~control].mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-9)
    packed = load_config(None, ["algo.alpha=0.3", "algo.clip_low=0.1", "algo.clip_high=0.25", "algo.padding_free=true"])
    loss_packed, _ = policy_loss(model, ro, [0, 1, 2, 3], old, None, A[:, None] * weights, packed)
    assert float(loss_packed.detach()) == pytest.approx(float(expected), rel=1e-9)  # the packed layout too


def test_rl_with_importance_sampling_correction(workdir):
    """algo.is_correction end to end: the metrics report the weights; the HF engine's log-probs match the trainer's,
    so the weights are ~1 and nothing is truncated."""
    from thinkless.train.rl import run_rl

    if not (workdir / "sft").exists():
        from thinkless.train.sft import run_sft

        run_sft(_config(workdir, "sft"))
    out = workdir / "tis"
    tis = ["trainer.total_steps=1", "algo.is_correction=true", "trainer.device=cpu"]  # fp32: the two agree to 1e-4
    run_rl(_config(workdir, "rl", f"trainer.output_dir={out}", *tis))
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["rollout_logp_diff"] < 1e-4
    assert row["is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and row["is_truncated_frac"] == 0.0


def test_metrics_of_a_run_without_a_checkpoint_start_afresh(tmp_path):
    """A run that logged (its step-0 validation, a step) and died before its first checkpoint starts again from
    nothing: no row of the dead run stays, so step 0 is not written twice."""
    log = MetricsLog(tmp_path, 0)
    log.log(0, {"val/x/accuracy": 0.5})
    log.log(1, {"loss": 1.0})
    MetricsLog(tmp_path, 0).log(0, {"val/x/accuracy": 0.5})
    assert _steps(tmp_path) == [0]
    MetricsLog(tmp_path, 1)  # a checkpoint at step 1 keeps the rows up to it
    assert _steps(tmp_path) == [0]
