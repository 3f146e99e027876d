"""degrpo_loss on every backend against the float64 reference; the reference against the original code."""

import cases
import original_thinkless
import pytest
import torch
from conftest import backend_params

from thinkless.kernels import degrpo_loss, reference

OPTIONS = {
    "degrpo": dict(),
    "degrpo_alpha1": dict(alpha=1.0),
    "grpo": dict(decoupled=False),
    "asym_clip": dict(clip_low=0.1, clip_high=0.28, alpha=0.3),
    "kl_k1": dict(kl_coef=0.05, kl_type="k1", alpha=0.5),
    "kl_k2": dict(kl_coef=0.1, kl_type="k2", decoupled=False),
    "kl_k3": dict(kl_coef=0.2, kl_type="k3"),
    "ref_no_kl": dict(kl_coef=0.0, kl_type="k3"),  # ref given: KL is reported, not added
    "control_mask": dict(alpha=0.7),
    "seq_mean": dict(loss_agg="seq_mean_token_mean", alpha=0.5),
    "seq_mean_grpo": dict(loss_agg="seq_mean_token_mean", decoupled=False),
    "sum_norm": dict(loss_agg="seq_mean_token_sum_norm", loss_agg_norm=64.0, alpha=0.5),
    "sum_norm_grpo_kl": dict(loss_agg="seq_mean_token_sum_norm", loss_agg_norm=64.0, decoupled=False, kl_coef=0.1,
                             kl_type="k3"),
    "kl_k3_clamp": dict(kl_coef=0.2, kl_type="k3", kl_clamp=0.02),
    "kl_k1_clamp": dict(kl_coef=0.2, kl_type="k1", kl_clamp=0.1, decoupled=False),
    "normalizers": dict(normalizers=dict(control_tokens=11, response_tokens=3000, sequences=13), alpha=0.3),
    "normalizers_seq_mean": dict(normalizers=dict(control_tokens=11, response_tokens=3000, sequences=13),
                                 loss_agg="seq_mean_token_mean", decoupled=False),
    "token_weights": dict(loss_agg="seq_mean_token_mean", alpha=0.5),  # random token weights: see _run
    "token_weights_token_mean": dict(decoupled=False, kl_coef=0.1, kl_type="k2"),
}  # fmt: skip


def _run(fn, logp, old, ref, adv, mask, opts, *, control_mask=None, token_weights=None, **kw):
    x = logp.detach().clone().requires_grad_(True)
    use_ref = ref if "kl_type" in opts else None
    if token_weights is not None:
        kw["token_weights"] = token_weights.to(device=logp.device, dtype=logp.dtype)
    loss, metrics = fn(x, old, adv, mask, ref_logp=use_ref, control_mask=control_mask, **opts, **kw)
    loss.backward()
    return loss.detach(), metrics, x.grad


def _magnitude(logp, old, ref, adv, mask, opts, loss) -> float:
    """|loss| + the loss with |advantages| + kl_coef * mean |logp - ref|: the size of the terms that were summed."""
    abs_loss, _, _ = _run(
        reference.degrpo_loss, logp.double(), old.double(), ref.double(), adv.double().abs(), mask, opts
    )
    d = (logp.double() - ref.double()).abs()[mask]
    kl = opts.get("kl_coef", 0.0) * d.mean().item() if d.numel() else 0.0
    return abs(loss.item()) + abs(abs_loss.item()) + kl


def _control_mask(mask: torch.Tensor) -> torch.Tensor:
    """A non-default control mask: the first two response tokens of every row."""
    return mask & (mask.long().cumsum(1) <= 2)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", cases.SHAPES, ids=lambda s: f"B{s[0]}T{s[1]}")
@pytest.mark.parametrize("option", OPTIONS.keys())
@pytest.mark.parametrize("per_token_adv", [False, True], ids=["adv_B", "adv_BT"])
def test_matches_reference(device, backend, shape, option, per_token_adv):
    opts = OPTIONS[option]
    logp, old, ref, adv, mask = cases.loss_inputs(*shape, per_token_adv=per_token_adv, clip=0.2)
    if option == "asym_clip":  # keep the float32/float64 comparison away from these clip edges too
        logp, old, ref, adv, mask = cases.loss_inputs(*shape, per_token_adv=per_token_adv, clip=0.1)
        old = torch.where(((logp - old).exp() - 1.28).abs() < 1e-3, old + 5e-3, old)
    control = _control_mask(mask) if option == "control_mask" else None
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(5)) if "token_weights" in option else None

    t_loss, t_metrics, t_grad = _run(
        reference.degrpo_loss, logp.double(), old.double(), ref.double(), adv.double(), mask, opts,
        control_mask=control, token_weights=weights,
    )  # fmt: skip
    on = lambda x: None if x is None else x.to(device)  # noqa: E731
    loss, metrics, grad = _run(
        degrpo_loss, on(logp), on(old), on(ref), on(adv), on(mask), opts, control_mask=on(control),
        token_weights=on(weights), backend=backend,
    )  # fmt: skip
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and loss.device.type == device.type
    # The loss sums token terms of both signs; next to a near-zero result the error of any float32 sum is large,
    # so the error is measured against the magnitude of the summed terms.
    assert abs(loss.cpu().double() - t_loss).item() < 1e-5 * _magnitude(logp, old, ref, adv, mask, opts, t_loss)
    assert cases.rel_err(grad.cpu(), t_grad) < 1e-5
    assert torch.all(grad.cpu()[~mask] == 0), "padding must get exactly zero gradient"
    assert set(metrics) == set(reference.STAT_NAMES)
    for name in reference.STAT_NAMES:
        assert metrics[name].requires_grad is False
        torch.testing.assert_close(metrics[name].cpu().double(), t_metrics[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("decoupled", [True, False])
def test_empty_masks_give_zero_not_nan(device, backend, decoupled):
    """A rank whose batch has no response tokens still gets a finite loss and a zero gradient to backward."""
    logp, old, ref, adv, _ = cases.loss_inputs(4, 17)
    logp = torch.nan_to_num(logp, neginf=-1.0).to(device).requires_grad_(True)
    empty = torch.zeros(4, 17, dtype=torch.bool, device=device)
    loss, metrics = degrpo_loss(
        logp, old.to(device), adv.to(device), empty, ref_logp=ref.to(device), kl_coef=0.1, decoupled=decoupled,
        backend=backend,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and all(torch.isfinite(v).all() for v in metrics.values())
    assert torch.equal(logp.grad.cpu(), torch.zeros(4, 17))
    # Only control tokens: the response mean is empty, the control mean is not.
    only_first = torch.zeros(4, 17, dtype=torch.bool, device=device)
    only_first[:, 3] = True
    loss, metrics = degrpo_loss(logp, old.to(device), adv.to(device), only_first, backend=backend)
    assert torch.isfinite(loss) and metrics["response_loss"].item() == 0.0 and metrics["control_tokens"].item() == 4


@pytest.mark.parametrize("backend", backend_params())
def test_low_precision_inputs(device, backend):
    """bf16 log-probs: the loss is computed in float32 and the gradient comes back in bf16."""
    logp, old, ref, adv, mask = cases.loss_inputs(5, 130)
    logp, old, ref = (x.to(torch.bfloat16) for x in (logp, old, ref))
    opts = OPTIONS["kl_k3"]
    t_loss, _, t_grad = _run(reference.degrpo_loss, logp.double(), old.double(), ref.double(), adv.double(), mask, opts)
    on = lambda x: x.to(device)  # noqa: E731
    loss, _, grad = _run(degrpo_loss, on(logp), on(old), on(ref), on(adv), on(mask), opts, backend=backend)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert cases.rel_err(loss.cpu(), t_loss) < 1e-5
    assert cases.rel_err(grad.cpu(), t_grad) < 1e-2  # bf16 rounding of the stored gradient


@pytest.mark.parametrize("backend", backend_params())
def test_int_and_float_masks_are_accepted(device, backend):
    logp, old, _, adv, mask = cases.loss_inputs(3, 17)
    expected, _ = degrpo_loss(logp.to(device), old.to(device), adv.to(device), mask.to(device), backend=backend)
    for as_type in (torch.int64, torch.float32, torch.uint8):
        got, _ = degrpo_loss(logp.to(device), old.to(device), adv.to(device), mask.to(device, as_type), backend=backend)
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("with_kl", [False, True])
def test_reference_matches_original_code(decoupled, with_kl):
    """Right-padded rows starting at column 0, the layout of the original code, where both definitions meet."""
    B, T = 6, 23
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    ref = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    kl = dict(ref_logp=ref, kl_coef=0.1, kl_type="k3") if with_kl else {}
    loss, _ = reference.degrpo_loss(
        logp, old, adv, mask, alpha=1e-3, clip_low=0.2, clip_high=0.2, decoupled=decoupled, **kl
    )
    expected = original_thinkless.policy_loss(
        logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 1e-3 if decoupled else None,
        ref_logp=ref.tolist() if with_kl else None, kl_coef=0.1,
    )  # fmt: skip
    assert abs(loss.item() - expected) <= 1e-6 * max(1.0, abs(expected))


def test_alpha_scales_only_the_control_token():
    """The decoupled loss is linear in alpha with slope equal to the control-token loss."""
    logp, old, _, adv, mask = cases.loss_inputs(7, 130)
    logp, old, adv = logp.double(), old.double(), adv.double()
    l0, m0 = reference.degrpo_loss(logp, old, adv, mask, alpha=0.0)
    l1, _ = reference.degrpo_loss(logp, old, adv, mask, alpha=1.0)
    torch.testing.assert_close(l0, m0["response_loss"])
    torch.testing.assert_close(l1 - l0, m0["control_loss"])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_at_small_log_ratios(device, backend, kl_type):
    """Real policies stay close to the reference (|logp - ref| ~ 1e-3), where k3 = exp(-d) + d - 1 cancels to
    d^2/2: the KL value and its gradient must keep their relative accuracy there."""
    logp, old, _, adv, mask = cases.loss_inputs(5, 130)
    ref = torch.where(mask, logp, -1.0) + torch.randn(5, 130) * 1e-3
    opts = dict(kl_coef=1.0, kl_type=kl_type, alpha=0.0)
    adv = adv * 0  # the KL term alone
    _, t_metrics, t_grad = _run(
        reference.degrpo_loss, logp.double(), old.double(), ref.double(), adv.double(), mask, opts
    )
    on = lambda x: x.to(device)  # noqa: E731
    _, metrics, grad = _run(degrpo_loss, on(logp), on(old), on(ref), on(adv), on(mask), opts, backend=backend)
    # k1 = d has both signs: its mean is judged against mean |d|, k2 and k3 are never negative.
    magnitude = reference.kl_penalty(logp.double(), ref.double(), kl_type).abs()[mask].mean()
    assert (metrics["kl"].cpu().double() - t_metrics["kl"]).abs() < 1e-5 * magnitude
    assert cases.rel_err(grad.cpu(), t_grad) < 1e-5


@pytest.mark.parametrize("backend", backend_params())
def test_strided_inputs(device, backend):
    """Log-probs sliced out of a longer buffer ([:, 1:], as after shifting logits) stay exact."""
    B, T = 5, 130
    full = cases.loss_inputs(B, T + 1, per_token_adv=True)
    opts = OPTIONS["kl_k3"]
    args = [x[:, 1:] for x in full]
    t_loss, _, t_grad = _run(reference.degrpo_loss, *(x.double() for x in args[:4]), args[4], opts)
    buffer = full[0].to(device, copy=True).requires_grad_(True)
    logp, old, ref, adv, mask = (x.to(device)[:, 1:] for x in (buffer, *full[1:]))
    assert logp.stride(0) == T + 1 and mask.stride(0) == T + 1
    loss, _ = degrpo_loss(logp, old, adv, mask, ref_logp=ref, **opts, backend=backend)
    loss.backward()
    assert abs(loss.detach().cpu().double() - t_loss).item() < 1e-5 * _magnitude(*args, opts, t_loss)
    assert cases.rel_err(buffer.grad[:, 1:].cpu(), t_grad) < 1e-5
    assert torch.all(buffer.grad[:, 0] == 0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("option", ["degrpo", "grpo", "kl_k1", "kl_k2", "kl_k3", "control_mask"])
def test_gradcheck_float64(device, backend, option):
    """float64 inputs are computed in float64 on every backend, so autograd's numerical check applies."""
    logp, old, ref, adv, mask = cases.loss_inputs(3, 7, per_token_adv=option == "kl_k2")
    logp = torch.where(mask, logp, -2.0).double().to(device).requires_grad_(True)
    old, ref, adv, mask = (x.to(device) for x in (old.double(), ref.double(), adv.double(), mask))
    opts = dict(OPTIONS[option])
    if "kl_type" in opts:
        opts["ref_logp"] = ref
    if option == "control_mask":
        opts["control_mask"] = _control_mask(mask)

    def loss(x):
        return degrpo_loss(x, old, adv, mask, **opts, backend=backend)[0]

    assert loss(logp).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, (logp,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
def test_nan_on_a_response_token_shows_in_the_loss(device, backend):
    """A NaN log-prob inside the response must poison the loss (so training notices), on every backend."""
    logp, old, _, adv, mask = cases.loss_inputs(3, 17)
    mask[0, :4] = True
    logp = torch.where(mask, logp, -1.0)
    logp[0, 2] = float("nan")
    loss, metrics = degrpo_loss(logp.to(device), old.to(device), adv.to(device), mask.to(device), backend=backend)
    assert torch.isnan(loss) and torch.isnan(metrics["ratio_mean"])


@pytest.mark.parametrize("backend", backend_params())
def test_only_logp_is_differentiated(device, backend):
    logp, old, _, adv, mask = cases.loss_inputs(3, 17)
    old, adv = old.to(device).requires_grad_(True), adv.to(device).requires_grad_(True)
    loss, _ = degrpo_loss(logp.to(device), old, adv, mask.to(device), backend=backend)
    assert not loss.requires_grad  # logp is the only input that carries a gradient


def _token_losses(logp, old, adv, clip=0.2):
    ratio = (logp - old).exp()
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("agg", reference.LOSS_AGGS)
@pytest.mark.parametrize("with_normalizers", [False, True])
def test_reference_loss_agg_formulas(decoupled, agg, with_normalizers):
    """reference.degrpo_loss against each aggregation written out as loops over sequences and tokens."""
    logp, old, ref, adv, mask = cases.loss_inputs(6, 23, seed=11)
    logp, old, adv = logp.double(), old.double(), adv.double()
    counts = dict(control_tokens=9.0, response_tokens=200.0, sequences=12.0) if with_normalizers else None
    alpha, norm = 0.4, 32.0
    rows = [(i, mask[i].nonzero()[:, 0].tolist()) for i in range(6)]
    rows = [(i, tokens) for i, tokens in rows if tokens]  # sequences with a response
    L = _token_losses(torch.where(mask, logp, 0.0), old, adv[:, None])
    n_control = counts["control_tokens"] if counts else len(rows)
    n_response = counts["response_tokens"] if counts else float(mask.sum())
    n_seq = counts["sequences"] if counts else len(rows)
    control_term = sum(L[i, tokens[0]].item() for i, tokens in rows) / n_control
    term = {i: tokens[1:] if decoupled else tokens for i, tokens in rows}
    if agg == "token_mean":
        divisor = n_response - n_control if decoupled else n_response
        response_term = sum(L[i, t].item() for i, tokens in term.items() for t in tokens) / divisor
    elif agg == "seq_mean_token_mean":
        response_term = sum(sum(L[i, t].item() for t in tokens) / len(tokens) for i, tokens in term.items() if tokens)
        response_term /= n_seq
    else:
        response_term = sum(L[i, t].item() for i, tokens in term.items() for t in tokens) / (n_seq * norm)
    want = alpha * control_term + response_term if decoupled else response_term
    loss, metrics = reference.degrpo_loss(
        logp, old, adv, mask, alpha=alpha, decoupled=decoupled, loss_agg=agg, loss_agg_norm=norm, normalizers=counts
    )
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert metrics["control_loss"].item() == pytest.approx(control_term, rel=1e-12)


def test_kl_clamp_is_the_authors_low_var_kl():
    """verl's low_var_kl (the authors' kl_penalty): kl = ref - logp; clamp(exp(kl) - kl - 1, -10, 10)."""
    logp = torch.tensor([-1.0, -30.0, -0.5, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.2, -2.0, -0.5, -25.0], dtype=torch.float64)
    kl = ref - logp.detach()
    authors = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    ours = reference.kl_penalty(logp, ref, "k3", clamp=10.0)
    torch.testing.assert_close(ours, authors, rtol=1e-12, atol=0)
    assert bool((ours == 10).any())  # the clamp is reached
    (grad,) = torch.autograd.grad(ours.sum(), logp)
    assert grad[1] == 0 and grad[0] != 0  # clamped tokens are constant


@pytest.mark.parametrize("backend", backend_params())
def test_normalizers_make_micro_batches_add_up(device, backend):
    """With the whole batch's normalisers, the losses and gradients of any split add up to the whole batch's."""
    from thinkless.kernels import Normalizers

    logp, old, ref, adv, mask = (x.to(device) for x in cases.loss_inputs(7, 40, seed=3))
    for agg, decoupled in [("token_mean", True), ("seq_mean_token_mean", False), ("seq_mean_token_sum_norm", True)]:
        opts = dict(loss_agg=agg, loss_agg_norm=50.0, decoupled=decoupled, kl_coef=0.1, alpha=0.5, backend=backend)
        x = logp.clone().requires_grad_(True)
        whole, _ = degrpo_loss(x, old, adv, mask, ref_logp=ref, **opts)
        (want,) = torch.autograd.grad(whole, x)
        counts = Normalizers.count(mask)
        x = logp.clone().requires_grad_(True)
        parts = sum(
            degrpo_loss(x[r], old[r], adv[r], mask[r], ref_logp=ref[r], normalizers=counts, **opts)[0]
            for r in ([0], [1, 2, 3], [4, 5, 6])
        )
        (grad,) = torch.autograd.grad(parts, x)
        assert parts.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-7), agg
        assert cases.rel_err(grad.cpu(), want.cpu()) < 1e-5, agg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(loss_agg="sum"), "loss_agg must be one of"),
        (dict(loss_agg="seq_mean_token_sum_norm"), "needs loss_agg_norm > 0"),
        (dict(normalizers=dict(control_tokens=1, response_tokens=2)), "normalizers must be a Normalizers"),
        (dict(normalizers=dict(control_tokens=-1, response_tokens=2, sequences=1)), "normalizers.control_tokens"),
        (dict(normalizers=dict(control_tokens=5, response_tokens=2, sequences=1)), "cannot exceed response_tokens"),
        (dict(kl_clamp=-1.0), "kl_clamp must be >= 0"),
        (dict(token_weights=torch.ones(2, 3)), "token_weights has shape"),
    ],
)
def test_bad_aggregation_options_are_named(kwargs, message):
    logp, old, ref, adv, mask = cases.loss_inputs(3, 5, seed=0)
    with pytest.raises(ValueError, match=message):
        degrpo_loss(logp, old, adv, mask, **kwargs)


@pytest.mark.parametrize("backend", backend_params())
def test_token_weights_off_the_term_are_never_read(backend):
    """A decoupled control token (and padding) may carry any token weight, NaN included: it is not in the term."""
    logp, old, ref, adv, mask = cases.loss_inputs(4, 9, seed=7)
    logp, old, adv = logp.double(), old.double(), adv.double()
    control = reference.first_response_token_mask(mask)
    weights = torch.rand(4, 9, dtype=torch.float64)
    poisoned = torch.where(control | ~mask, torch.full_like(weights, float("nan")), weights)
    results = []
    for w in (weights, poisoned):
        x = logp.clone().requires_grad_(True)
        loss, _ = degrpo_loss(x, old, adv, mask, token_weights=w, alpha=0.5, backend=backend)
        (grad,) = torch.autograd.grad(loss, x)
        results.append((loss, grad))
    assert torch.isfinite(results[1][0]) and torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend", backend_params())
def test_kl_clamp_boundary_in_float64(backend):
    """A float64 estimate just above the clamp is clamped (and constant), on every backend: the Triton kernels get
    the clamp in two fp32 halves, not rounded to fp32 (0.3 -> 0.30000001192...)."""
    k3_target = 0.3 + 5e-9  # between 0.3 and fp32(0.3)
    d = torch.tensor(1.0, dtype=torch.float64)
    for _ in range(60):  # solve exp(-d) + d - 1 = k3_target by Newton's method
        d = d - (torch.exp(-d) + d - 1 - k3_target) / (1 - torch.exp(-d))
    logp = torch.tensor([[-1.0]], dtype=torch.float64) + d
    ref = torch.tensor([[-1.0]], dtype=torch.float64)
    x = logp.clone().requires_grad_(True)
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, metrics = degrpo_loss(
        x, x.detach(), torch.zeros(1, dtype=torch.float64), mask, ref_logp=ref, kl_coef=1.0, kl_clamp=0.3,
        backend=backend,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, x)
    assert metrics["kl"].item() == pytest.approx(0.3, rel=1e-14, abs=0) and grad.item() == 0.0


def test_the_loss_options_are_declared_once():
    """`DeGRPOParams` declares every option of the loss: the public losses (and the reference) take each as a keyword
    with its default, the trainer's algo.* settings start from it, and `loss_options` hands each over by name."""
    import dataclasses
    import inspect

    from thinkless.kernels import DeGRPOParams, fused_linear_degrpo_loss
    from thinkless.train.config import AlgoConfig, load_config
    from thinkless.train.policy_loss import loss_options

    declared = {f.name: f.default for f in dataclasses.fields(DeGRPOParams)}
    assert {"alpha", "clip_low", "clip_high", "kl_coef", "kl_type", "decoupled", "loss_agg"} <= set(declared)
    for fn in (degrpo_loss, fused_linear_degrpo_loss, reference.degrpo_loss):
        parameters = inspect.signature(fn).parameters
        assert {name: parameters[name].default for name in declared} == declared, fn.__qualname__
    off = {"kl_clamp": 0.0, "loss_agg_norm": 0}  # the settings' "off" where the loss takes None
    assert {name: getattr(AlgoConfig(), name) for name in declared} == {**declared, **off}
    config = load_config(None, ["algo.alpha=0.25", "algo.kl_clamp=10", "algo.kl_type=k1", "algo.decoupled=false",
                                "algo.loss_agg=seq_mean_token_sum_norm", "rollout.max_new_tokens=64"])  # fmt: skip
    options = loss_options(config)
    assert set(options) == {*declared, "temperature", "entropy_coef"}
    params = DeGRPOParams.checked(has_ref=False, **{name: options[name] for name in declared})
    assert (params.alpha, params.kl_clamp, params.kl_type, params.decoupled) == (0.25, 10.0, "k1", False)
    assert (params.loss_agg, params.loss_agg_norm) == ("seq_mean_token_sum_norm", 64.0)


def test_checked_options_name_the_bad_one():
    from thinkless.kernels import DeGRPOParams

    with pytest.raises(ValueError, match="alpha must be >= 0.0, got -1"):
        DeGRPOParams.checked(has_ref=False, alpha=-1)
    with pytest.raises(ValueError, match="kl_type must be one of 'k1', 'k2', 'k3', got 'k4'"):
        DeGRPOParams.checked(has_ref=False, kl_type="k4")
    with pytest.raises(TypeError, match="unknown DeGRPO option.*: alpah"):
        DeGRPOParams.checked(has_ref=False, alpah=0.1)
    with pytest.raises(ValueError, match="ref_logp is required when kl_coef > 0"):
        DeGRPOParams.checked(has_ref=False, kl_coef=0.1)
    assert DeGRPOParams.checked(has_ref=True) == DeGRPOParams()
