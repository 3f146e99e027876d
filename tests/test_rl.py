"""The named steps of one RL step (`thinkless.train.rl`), each called on its own, against figures computed here by
hand or by an independent route; the end-to-end runs are in test_train.py."""

import math
from types import SimpleNamespace

import pytest
import torch
from test_packing import rollouts, tiny_model

from thinkless.modes import LEGACY_NAMES, mode_statistics
from thinkless.train import rl
from thinkless.train.config import load_config
from thinkless.train.dist import Dist
from thinkless.train.logprobs import importance_correction, logp_diff, sequence_logprobs
from thinkless.train.policy_loss import LOSS_METRICS
from thinkless.train.rewards import Score


def _rollouts(groups: list[int], modes=None, lengths=None) -> SimpleNamespace:
    """Rollout-like rows: the prompt of each sample, its mode and response tokens."""
    n = len(groups)
    return SimpleNamespace(
        prompt_index=torch.tensor(groups), modes=modes or [None] * n,
        lengths=torch.tensor(lengths or [1] * n), texts=[""] * n,
    )  # fmt: skip


def test_mode_statistics_by_hand():
    stats = mode_statistics(["short", "think", "think", None], [True, False, True, False], [10, 100, 300, 7])
    assert stats == {
        "accuracy": 0.5, "think_ratio": 0.5, "mean_tokens": 417 / 4, "accuracy_short": 1.0, "accuracy_think": 0.5,
        "mean_tokens_short": 10.0, "mean_tokens_think": 200.0, "format_errors": 1,
    }  # fmt: skip
    none = mode_statistics(["think", "think"], [True, True], [5, 7])
    assert none["accuracy_short"] is None and none["mean_tokens_short"] is None  # no <short> sample: no figure
    assert mode_statistics([], [], [])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="2 modes, 1 correct, 2 tokens"):
        mode_statistics(["short", "think"], [True], [1, 2])


def test_group_filter_drops_groups_whose_rewards_all_agree():
    ro = _rollouts([0, 0, 0, 1, 1, 1, 2, 3, 3])
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, 0.5, 0.5, -1.0, -1.0])
    keep = rl.group_filter(ro, rewards, filter_groups=True)
    # group 0: all 1.0; group 2: one sample (no spread); group 3: all -1.0; group 1 varies
    assert keep.tolist() == [False, False, False, True, True, True, False, False, False]
    assert rl.group_filter(ro, rewards, filter_groups=False).all()


def test_prompt_mini_batches_cut_the_kept_prompts():
    ro = _rollouts([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    keep = torch.tensor([True, True, False, False, True, False, True, True, True, True])
    algo = SimpleNamespace(mini_batch_size=2)
    # Kept prompts 0, 2, 3, 4 (1 dropped whole); two prompts a mini-batch; the dropped sample of prompt 2 stays out.
    assert rl.prompt_mini_batches(ro, keep, algo) == [[0, 1, 4], [6, 7, 8, 9]]
    assert rl.prompt_mini_batches(ro, keep, SimpleNamespace(mini_batch_size=0)) == [[0, 1, 4, 6, 7, 8, 9]]
    assert rl.prompt_mini_batches(ro, torch.zeros(10, dtype=torch.bool), algo) == []  # all filtered: no update


def test_score_samples_uses_each_samples_own_problem():
    config = load_config(None, [])
    ro = _rollouts([0, 0, 1], modes=["short", "think", "short"])
    ro.texts = ["<short>\\boxed{4}", "<think>2+2</think>\\boxed{5}", "\\boxed{9}"]
    mine = [SimpleNamespace(answer="4"), SimpleNamespace(answer="9")]
    out, scores = rl.score_samples(ro, mine, config, Dist(), torch.device("cpu"))
    assert out is ro
    r = config.rewards
    assert [(s.mode, s.correct, s.reward) for s in scores] == [
        ("short", True, r.correct_short), ("think", False, r.wrong), ("short", True, r.correct_short),
    ]  # fmt: skip


def test_rollout_and_tag_metrics_against_hand_counts():
    modes = ["short", "short", "think", "think", "think", None]
    correct = [True, True, True, False, True, False]
    ro = _rollouts([0, 0, 1, 1, 2, 2], modes=modes, lengths=[4, 6, 50, 70, 90, 3])
    scores = [Score(m, c, 1.0 if c else -1.0, None) for m, c in zip(modes, correct, strict=True)]
    rewards = torch.tensor([s.reward for s in scores])
    m = rl.rollout_metrics(ro, scores, rewards)
    assert m["samples"] == 6 and m["reward_mean"] == pytest.approx(2 / 6)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["think_ratio"] == 0.5 and m["format_errors"] == 1
    assert m["accuracy_short"] == 1.0 and m["accuracy_think"] == pytest.approx(2 / 3)
    assert m["mean_tokens"] == pytest.approx(223 / 6) and m["mean_tokens_think"] == 70.0
    for old, new in LEGACY_NAMES.items():  # the names of thinkless 0.1, same figures
        assert m[old] == m[new]
    # group 0: both right, both short; group 1: one wrong; group 2: one right think, one format error
    assert (m["groups_all_correct"], m["groups_all_wrong"]) == (1, 0)
    assert (m["groups_all_correct_short"], m["groups_all_correct_think"], m["groups_mixed_modes"]) == (1, 0, 0)
    tags = rl.tag_metrics(ro, scores, ["easy", "hard", "hard"])
    assert tags["think_ratio/easy"] == 0.0 and tags["think_ratio/hard"] == 0.75
    assert tags["accuracy/hard"] == 0.5 and tags["mean_tokens/easy"] == 5.0
    assert tags["acc/hard"] == tags["accuracy/hard"] and tags["response_tokens/easy"] == 5.0


def test_a_mode_without_samples_has_no_figure_but_its_old_name_logs_zero():
    ro = _rollouts([0, 0], modes=["think", "think"], lengths=[5, 9])
    scores = [Score("think", True, 0.5, "1")] * 2
    m = rl.rollout_metrics(ro, scores, torch.tensor([0.5, 0.5]))
    assert m["accuracy_short"] is None and m["acc_short"] == 0.0 and m["response_tokens_short"] == 0.0


def _engine_rollouts():
    ro = rollouts([3, 2, 4, 1], [4, 3, 1, 2])
    g = torch.Generator().manual_seed(1)
    old = torch.randn(ro.input_ids.shape[0], ro.input_ids.shape[1] - 1, generator=g, dtype=torch.float64) - 2
    response = ro.response_mask[:, 1:]
    ro.rollout_logp = torch.where(response, old + 0.3 * torch.randn(old.shape, generator=g, dtype=old.dtype), 0.0)
    ro.rollout_logp[1, response[1].nonzero()[0, 0]] = torch.nan  # the engine gave no log-prob for one token
    return ro, old, response


def test_importance_correction_and_the_logp_gap():
    ro, old, response = _engine_rollouts()
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
    known = response & ~ro.rollout_logp.isnan()
    gaps = [abs(float(old[i, j] - ro.rollout_logp[i, j])) for i, j in known.nonzero().tolist()]
    assert logp_diff(old, ro) == (pytest.approx(sum(gaps)), len(gaps))
    same, stats = importance_correction(ro, advantages, old, SimpleNamespace(is_correction=False))
    assert same is advantages and stats == {"rollout_logp_diff": pytest.approx(sum(gaps) / len(gaps))}
    cap = 1.5
    weighted, stats = importance_correction(ro, advantages, old, SimpleNamespace(is_correction=True, is_cap=cap))
    for i, j in [(i, j) for i in range(4) for j in range(old.shape[1])]:
        w = min(math.exp(float(old[i, j] - ro.rollout_logp[i, j])), cap) if known[i, j] else 1.0
        assert float(weighted[i, j]) == pytest.approx(float(advantages[i]) * w, rel=1e-12)
    assert set(stats) == {"rollout_logp_diff", "is_weight_mean", "is_truncated_frac"}
    ro.rollout_logp = None  # an engine without log-probs: no correction, no figure
    same, stats = importance_correction(ro, advantages, old, SimpleNamespace(is_correction=True, is_cap=cap))
    assert same is advantages and stats == {}


def test_old_and_ref_logprobs_on_and_off_policy():
    config = load_config(None, ["rollout.temperature=0.7"])
    policy, reference = tiny_model("sdpa", seed=0), tiny_model("sdpa", seed=1)
    ro = rollouts([3, 2, 4, 1], [4, 3, 1, 2])
    run = SimpleNamespace(dist=Dist(), model=policy)
    old, ref = rl.old_and_ref_logprobs(run, config, ro, policy, reference, shortcut=False)
    assert torch.equal(old, sequence_logprobs(policy, ro, 0.7, config.algo))
    assert torch.equal(ref, sequence_logprobs(reference, ro, 0.7, config.algo))
    assert not torch.equal(old, ref)
    old, ref = rl.old_and_ref_logprobs(run, config, ro, policy, None, shortcut=True)
    assert old is None and ref is None  # on-policy: the training forward's own; no KL: no reference


def test_update_makes_one_step_per_mini_batch_and_epoch(monkeypatch):
    """ppo_epochs x mini-batches updates, each on its own rows, the loss metrics averaged over the updates."""
    config = load_config(None, ["algo.ppo_epochs=2", "algo.mini_batch_size=1"])
    ro = _rollouts([0, 0, 1, 1, 2, 2])
    keep = torch.tensor([True, True, True, True, False, False])
    calls, steps = [], []

    def backward(model, ro_, rows, *args, logp_out=None):
        calls.append(rows)
        return {key: float(len(calls)) for key in LOSS_METRICS}

    monkeypatch.setattr(rl, "mini_batch_backward", backward)
    optimizer = SimpleNamespace(zero_grad=lambda set_to_none: None)
    run = SimpleNamespace(
        model=None, dist=Dist(), optimizer=optimizer,
        update=lambda loss, step: (steps.append((loss, step)) or (0.1 * len(steps), len(steps) == 3)),
    )  # fmt: skip
    out = rl.update(run, config, ro, keep, None, None, torch.zeros(6), step=7)
    assert calls == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert steps == [(1.0, 7), (2.0, 7), (3.0, 7), (4.0, 7)]
    assert out["losses"] == dict.fromkeys(LOSS_METRICS, 2.5)
    assert (out["updates"], out["skipped_updates"], out["grad_norm"]) == (4, 1, pytest.approx(0.4))
    assert "rollout_logp_diff" not in out


def test_the_clock_splits_the_step_into_phases(monkeypatch):
    """Phases split the step; a split (the generation, `sample_seconds`) is a first part of its phase."""
    ticks = iter([10.0, 11.5, 12.0, 12.5, 16.0])
    monkeypatch.setattr(rl.time, "perf_counter", lambda: next(ticks))
    clock = rl._Clock(torch.device("cpu"))
    clock.split("sample")
    for phase in ("rollout", "logprob", "update"):
        clock.lap(phase)
    m = clock.metrics(tokens=300)
    assert m == {"tokens_per_s": 50.0, "step_seconds": 6.0, "sample_seconds": 1.5, "rollout_seconds": 2.0,
                 "logprob_seconds": 0.5, "update_seconds": 3.5}  # fmt: skip
