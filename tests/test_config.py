"""Settings: defaults, YAML, dotted overrides, and errors that name the bad key."""

import re

import pytest
import yaml

from thinkless.train.config import INSTRUCTION, ConfigError, describe, load_config


def test_defaults_follow_the_paper():
    config = load_config()
    assert config.algo.alpha == 1e-3 and config.algo.decoupled and not config.algo.normalize_std
    assert config.rollout.temperature == 0.6
    assert (config.rewards.correct_short, config.rewards.correct_think, config.rewards.wrong) == (1.0, 0.5, -1.0)
    assert config.data.instruction == INSTRUCTION


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"rollout": {"n": 4, "temperature": 1.0}, "data": {"train_files": ["a.json"]}}))
    config = load_config(path, ["rollout.n=8", "algo.decoupled=false", "data.val_files=[x.json, y.parquet]",
                                "algo.alpha=1e-2", "trainer.output_dir=runs/one"])  # fmt: skip
    assert config.rollout.n == 8 and config.rollout.temperature == 1.0
    assert config.algo.decoupled is False and config.algo.alpha == 0.01
    assert config.data.train_files == ["a.json"] and config.data.val_files == ["x.json", "y.parquet"]
    assert load_config(None, ["data.train_files=a.json,b.json"]).data.train_files == ["a.json", "b.json"]
    config.save(tmp_path / "out" / "config.yaml")
    again = load_config(tmp_path / "out" / "config.yaml")
    assert again == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.nn=8"], r"unknown key 'rollout.nn'; the keys of 'rollout' are: n, temperature, top_p"),
        (["rolout.n=8"], r"unknown setting 'rolout.n'.*section one of model, data, rollout, algo, rewards, trainer"),
        (["rollout.n=eight"], r"rollout.n must be an integer, got 'eight'"),
        (["algo.decoupled=maybe"], r"algo.decoupled must be true or false"),
        (["algo.alpha=[1]"], r"algo.alpha must be a number"),
        (["rollout.n"], r"override 'rollout.n' must look like section.key=value"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  alpha: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        load_config(bad)


def test_describe_lists_every_key_with_its_default():
    text = describe()
    assert "rollout.n = 8  # samples per prompt" in text
    assert "algo.alpha = 0.001" in text and "trainer.output_dir = 'thinkless-runs/run'" in text


def test_text_settings_stay_text():
    overrides = ["data.instruction=Solve: think # carefully", "model.path=yes", "trainer.seed=0123"]
    overrides += ["model.ref_path=", "data.train_files=[a.json]", "trainer.output_dir=runs/a=b"]
    config = load_config(None, overrides)
    assert config.data.instruction == "Solve: think # carefully"
    assert config.model.path == "yes" and config.trainer.seed == 123 and config.model.ref_path == ""
    assert config.trainer.output_dir == "runs/a=b" and config.data.train_files == ["a.json"]
    # List items stay text too (YAML 1.1 reads [on, yes, 007, null] as [True, True, 7, None]); numbers still parse.
    config = load_config(None, ["data.filter_key=type", "data.filter_values=[on, yes, 007, null, 'a, b']",
                                "algo.betas=[0.9, 0.95]"])  # fmt: skip
    assert config.data.filter_values == ["on", "yes", "007", "null", "a, b"] and config.algo.betas == [0.9, 0.95]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.save_every=0", r"trainer.save_every must be >= 1, got 0"),
        ("trainer.batch_size=0", r"trainer.batch_size must be >= 1"),
        ("rollout.n=0", r"rollout.n must be >= 1"),
        ("algo.micro_batch_size=0", r"algo.micro_batch_size must be >= 1"),
        ("rollout.temperature=0", r"rollout.temperature must be > 0"),
        ("rollout.top_p=1.5", r"rollout.top_p must be in \(0, 1\]"),
        ("algo.kl_type=k5", r"algo.kl_type must be one of k1, k2, k3, got 'k5'"),
        ("trainer.device=tpu", r"trainer.device must be auto, cpu, cuda"),
        ("trainer.report_to=foo", r"trainer.report_to must be one of none, tensorboard, wandb"),
        ("rollout.engine=sglang", r"rollout.engine must be one of hf, vllm"),
        ("algo.is_cap=0", r"algo.is_cap must be > 0"),
        ("rollout.engine=vllm rollout.temperature=0.005", r"must be in \[0.01, 2\] with rollout.engine=vllm"),
        ("rollout.vllm_gpu_memory_utilization=0", r"rollout.vllm_gpu_memory_utilization must be in \(0, 1\]"),
        ("rollout.cuda_graphs=true", r"rollout.cuda_graphs needs rollout.engine=hf and rollout.compile=true"),
        ("rollout.cuda_graphs=true rollout.compile=true rollout.engine=vllm", r"rollout.cuda_graphs needs"),
        ("trainer.val_files=[aime.json]", r"trainer.val_files needs trainer.val_every"),
        ("trainer.val_every=10", r"trainer.val_every needs trainer.val_files"),
        ("algo.loss_agg=sum", r"algo.loss_agg must be one of token_mean, seq_mean_token_mean"),
        ("algo.betas=[0.9]", r"algo.betas must be two numbers in \[0, 1\)"),
        ("algo.betas=[0.9,x]", r"algo.betas\[1\] must be a number"),
        ("algo.kl_clamp=-1", r"algo.kl_clamp must be >= 0"),
        ("eval.scoring=lenient", r"eval.scoring must be one of rl, authors"),
        ("data.instruction_position=middle", r"data.instruction_position must be one of after, before, none"),
    ],
)
def test_out_of_range_settings_fail_at_once(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split())


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_lr_schedules_match_torch(kind):
    import torch

    from thinkless.train.run import lr_lambda, planned_updates

    config = load_config(None, [f"algo.lr_scheduler={kind}", "trainer.total_steps=10", "trainer.batch_size=8",
                                "algo.mini_batch_size=4", "algo.ppo_epochs=2"])  # fmt: skip
    total = planned_updates(config, "rl")
    assert total == 10 * 2 * 2 and planned_updates(config, "sft") == 10
    ours = lr_lambda(config.algo, total)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    if kind == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    elif kind == "linear":
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=total)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    for s in range(total):
        assert ours(s) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), s
        opt.step()
        sched.step()
    # A warmup rises linearly to the peak, then the decay starts from it.
    warm = lr_lambda(load_config(None, [f"algo.lr_scheduler={kind}", "algo.warmup_steps=4"]).algo, 20)
    assert [warm(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and warm(4) == 1.0
    with pytest.raises(ConfigError, match="algo.lr_scheduler"):
        load_config(None, ["algo.lr_scheduler=step"])


def test_every_declared_rule_is_enforced():
    """A key declares its range or choices beside its default (`_key`); a value just outside fails, naming the key,
    and the default itself passes."""
    import dataclasses

    from thinkless.train.config import SECTIONS

    checked = 0
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rule, key = f.metadata, f"{section}.{f.name}"
            bad = []
            if "low" in rule:
                bad.append(rule["low"] - 1)
            if "above" in rule:
                bad.append(rule["above"])
            if "unit" in rule:
                bad += [0, 1.5]
            if "choices" in rule:
                bad.append("no-such-choice")
            for value in bad:
                with pytest.raises(ConfigError, match=f"^{re.escape(key)} must be"):
                    load_config(None, [f"{key}={value}"])
                checked += 1
    assert checked > 50


@pytest.mark.parametrize(
    "override", ["algo.lr=nan", "algo.kl_coef=nan", "rollout.temperature=inf", "rewards.wrong=-inf"]
)
def test_non_finite_numbers_are_refused(override):
    """nan passes every comparison of a range rule (and inf most): a number must be finite."""
    with pytest.raises(ConfigError, match=f"^{re.escape(override.split('=')[0])} must be a finite number"):
        load_config(None, [override])
