"""A user mistake gives a ValueError that names the argument, on every backend."""

import pytest
import torch
from conftest import backend_params

from thinkless.kernels import degrpo_loss, group_advantages


def _loss_args(device, B=3, T=5):
    logp = -torch.rand(B, T, device=device)
    return dict(
        logp=logp,
        old_logp=logp + 0.1,
        advantages=torch.randn(B, device=device),
        response_mask=torch.ones(B, T, dtype=torch.bool, device=device),
    )


LOSS_CASES = {
    "int logp": (dict(logp=torch.zeros(3, 5, dtype=torch.long)), "logp"),
    "int old_logp": (dict(old_logp=torch.zeros(3, 5, dtype=torch.int32)), "old_logp"),
    "1-D logp": (dict(logp=torch.zeros(5)), "logp"),
    "old_logp shape": (dict(old_logp=torch.zeros(3, 4)), "old_logp"),
    "advantages shape": (dict(advantages=torch.zeros(4)), "advantages"),
    "int advantages": (dict(advantages=torch.zeros(3, dtype=torch.long)), "advantages"),
    "mask shape": (dict(response_mask=torch.ones(3, 6, dtype=torch.bool)), "response_mask"),
    "mask not a tensor": (dict(response_mask=[[1] * 5] * 3), "response_mask"),
    "ref shape": (dict(ref_logp=torch.zeros(2, 5)), "ref_logp"),
    "int ref": (dict(ref_logp=torch.zeros(3, 5, dtype=torch.long)), "ref_logp"),
    "control shape": (dict(control_mask=torch.ones(3, 4, dtype=torch.bool)), "control_mask"),
    "kl without ref": (dict(kl_coef=0.1), "ref_logp"),
    "kl_type": (dict(kl_type="k4"), "kl_type"),
    "negative alpha": (dict(alpha=-1.0), "alpha"),
    "nan clip": (dict(clip_high=float("nan")), "clip_high"),
    "string clip": (dict(clip_low="0.2"), "clip_low"),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", LOSS_CASES.keys())
def test_degrpo_loss_bad_input(device, backend, case):
    override, name = LOSS_CASES[case]
    args = _loss_args(device)
    args.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in override.items()})
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        degrpo_loss(**args, backend=backend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_degrpo_loss_mixed_devices():
    args = _loss_args("cuda")
    args["old_logp"] = args["old_logp"].cpu()
    with pytest.raises(ValueError, match=r"\bold_logp\b.*cpu"):
        degrpo_loss(**args)


def test_degrpo_loss_mixed_devices_meta():
    """Device mismatch, checked with the meta device so that it runs without a GPU."""
    args = _loss_args("cpu")
    args["advantages"] = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match=r"\badvantages\b is on meta"):
        degrpo_loss(**args)


ADV_CASES = {
    "nan reward": (torch.tensor([1.0, float("nan"), 0.5]), torch.tensor([0, 0, 1]), "rewards"),
    "inf reward": (torch.tensor([1.0, 0.5, float("inf")]), torch.tensor([0, 0, 1]), "rewards"),
    "int rewards": (torch.tensor([1, 0, 1]), torch.tensor([0, 0, 1]), "rewards"),
    "float ids": (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0]), "group_ids"),
    "bool ids": (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([True, False, True]), "group_ids"),
    "length": (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0]), "group_ids"),
    "2-D rewards": (torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long), "rewards"),
    "string ids": (torch.tensor([1.0, 0.0]), ["a", "b"], "group_ids"),
    "float list ids": (torch.tensor([1.0, 0.0]), [0.5, 1.0], "group_ids"),
    "device": (torch.tensor([1.0, 0.0]), torch.zeros(2, dtype=torch.long, device="meta"), "group_ids"),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", ADV_CASES.keys())
def test_group_advantages_bad_input(device, backend, case):
    rewards, ids, name = ADV_CASES[case]
    rewards = rewards.to(device)
    if isinstance(ids, torch.Tensor) and ids.device.type != "meta":
        ids = ids.to(device)
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        group_advantages(rewards, ids, backend=backend)


def test_eps_must_be_positive_with_normalize_std():
    with pytest.raises(ValueError, match=r"\beps\b"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), eps=-1.0)
    # An all-equal group has std 0: dividing by std + 0 is undefined, so it is refused up front.
    with pytest.raises(ValueError, match=r"\beps\b.*> 0"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), normalize_std=True, eps=0.0)
