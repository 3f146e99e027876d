"""fused_linear_degrpo_loss and token_logprobs against the materialised float64 reference, on every backend."""

import cases
import pytest
import torch
from conftest import TRITON_ON_CPU, backend_params

from thinkless.kernels import (
    degrpo_loss,
    fused_linear_cross_entropy,
    fused_linear_degrpo_loss,
    reference,
    token_logprobs,
)

H = 32


def _inputs(B, T, V, *, seed, kl=False, bias=False):
    """Hidden states and an lm_head whose logits spread over a few units, as a trained model's do; old and
    reference log-probs near the true ones (ratio ~ 1, some tokens clipped); a mask with empty, padded and holed
    rows; advantages of one sign, so that the loss is a sum without cancellation and its relative error means
    something."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.4
    b = torch.randn(V, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    targets = torch.randint(0, V, (B, T), generator=gen)
    true_logp, _ = reference.token_logprobs(hidden, weight, targets, bias=b, temperature=0.6)
    old = true_logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.15
    ref = true_logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3
    sign = -1.0 if kl else 1.0  # with a KL term (>= 0) the policy part is made positive too
    advantages = sign * (torch.rand(B, generator=gen, dtype=torch.float64) + 0.5)
    mask = cases.response_mask(B, T, gen)
    mask[0, 0] = True  # at least one response token
    return hidden, weight, b, targets, old.float(), advantages.float(), mask, ref.float()


def _run(fn, hidden, weight, bias, targets, old, adv, mask, ref, dtype, opts, **kw):
    leaf = lambda x: x.detach().to(dtype).clone().requires_grad_(True)  # noqa: E731
    h, w = leaf(hidden), leaf(weight)
    b = leaf(bias) if bias is not None else None
    loss, metrics = fn(h, w, targets, old, adv, mask, bias=b, ref_logp=ref, **opts, **kw)
    loss.backward()
    grads = [h.grad, w.grad] + ([b.grad] if b is not None else [])
    return loss.detach(), metrics, grads


OPTIONS = {
    "degrpo_t0.6": dict(temperature=0.6, alpha=1e-3),
    "kl_k3_bias_t0.6": dict(temperature=0.6, kl_coef=0.2, kl_type="k3", alpha=0.5, clip_low=0.1, clip_high=0.28),
    "grpo_t1": dict(temperature=1.0, decoupled=False, kl_coef=0.05, kl_type="k1"),
    "entropy_seq_mean_t0.6": dict(temperature=0.6, entropy_coef=0.05, loss_agg="seq_mean_token_mean", alpha=0.5),
    "entropy_sum_norm_clamp": dict(
        temperature=0.7,
        entropy_coef=0.01,
        loss_agg="seq_mean_token_sum_norm",
        loss_agg_norm=64.0,
        kl_coef=0.2,
        kl_type="k3",
        kl_clamp=0.01,
        decoupled=False,
        normalizers=dict(control_tokens=40, response_tokens=500, sequences=40),
    ),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("V", [257, 5003, 32000])
@pytest.mark.parametrize("T", [1, 130])
@pytest.mark.parametrize("option", OPTIONS.keys())
def test_fp32_matches_float64_reference(backend, V, T, option):
    if V == 32000 and option != "kl_k3_bias_t0.6" and backend == "triton":
        pytest.skip("the interpreter is slow at V=32000: one option set covers it on the Triton path")
    opts = OPTIONS[option]
    kl = "kl_type" in opts
    data = _inputs(3, T, V, seed=V + T, kl=kl, bias="bias" in option)
    ref_data = (*data[:7], data[7] if kl else None)
    truth_loss, truth_metrics, truth_grads = _run(reference.fused_linear_degrpo_loss, *ref_data, torch.float64, opts)
    loss, metrics, grads = _run(
        fused_linear_degrpo_loss, *ref_data, torch.float32, opts, backend=backend, chunk_size=37 if T > 1 else None
    )
    assert loss.dtype == torch.float32
    assert cases.rel_err(loss, truth_loss) < 1e-4
    assert len(grads) == len(truth_grads) == (3 if "bias" in option else 2)
    for name, grad, truth in zip(("hidden", "weight", "bias")[: len(grads)], grads, truth_grads, strict=True):
        assert grad.dtype == torch.float32
        assert cases.rel_err(grad, truth) < 1e-4, name
    mask = data[6]
    assert cases.rel_err(metrics["logp"][mask], truth_metrics["logp"][mask]) < 1e-5
    for key in ("control_loss", "response_loss", "kl", "ratio_mean", "entropy"):
        assert abs(metrics[key].item() - truth_metrics[key].item()) <= 1e-4 * (1 + abs(truth_metrics[key].item())), key
    for key in ("control_tokens", "response_tokens"):
        assert metrics[key].item() == truth_metrics[key].item()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("option", ["degrpo_t0.6", "kl_k3_bias_t0.6", "entropy_sum_norm_clamp"])
def test_on_policy_equals_a_separate_old_logprob_pass(backend, option):
    """old_logp=None (the trainer's on-policy shortcut) gives the loss, gradients and metrics of the path it
    replaces: the old log-probs from a separate token_logprobs pass over the same weights; both against the float64
    reference with the exact old log-probs (ratio 1)."""
    opts = OPTIONS[option]
    kl = "kl_type" in opts
    hidden, weight, bias, targets, _, adv, mask, ref = _inputs(3, 40, 257, seed=7, kl=kl, bias="bias" in option)
    ref = ref if kl else None
    temperature = opts["temperature"]
    exact_old, _ = reference.token_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
    truth = _run(reference.fused_linear_degrpo_loss, hidden, weight, bias, targets, exact_old, adv, mask, ref,
                 torch.float64, opts)  # fmt: skip
    f32 = lambda x: x.float() if x is not None else None  # noqa: E731
    separate_old = token_logprobs(f32(hidden), f32(weight), targets, bias=f32(bias), temperature=temperature)
    kw = dict(backend=backend, chunk_size=37)
    separate = _run(fused_linear_degrpo_loss, hidden, weight, bias, targets, separate_old, adv, mask, ref,
                    torch.float32, opts, **kw)  # fmt: skip
    on_policy = _run(fused_linear_degrpo_loss, hidden, weight, bias, targets, None, adv, mask, ref, torch.float32,
                     opts, **kw)  # fmt: skip
    assert on_policy[1]["clip_frac"].item() == 0.0  # ratio 1: nothing clipped
    for got in (on_policy, separate):
        assert cases.rel_err(got[0], truth[0]) < 1e-5
        for grad, want in zip(got[2], truth[2], strict=True):
            assert cases.rel_err(grad, want) < 1e-5
    # fp32 tolerance: the separate pass's log-probs come from other chunks, so its ratio is 1 only to ~1e-7
    assert cases.rel_err(on_policy[0], separate[0]) < 1e-5
    for grad, want in zip(on_policy[2], separate[2], strict=True):
        assert cases.rel_err(grad, want) < 1e-5
    for key in ("control_loss", "response_loss", "kl", "entropy", "ratio_mean"):
        assert abs(on_policy[1][key].item() - separate[1][key].item()) <= 1e-5 * (1 + abs(separate[1][key].item()))


def _torch_bf16_path(hidden, weight, bias, targets, old, adv, mask, ref, opts):
    """What a user gets from torch in bf16: the lm_head GEMM in bf16, the softmax in fp32, autograd back."""
    return _run(
        reference.fused_linear_degrpo_loss, hidden, weight, bias, targets, old, adv, mask, ref, torch.bfloat16, opts
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("V", [257, 5003])
def test_bf16_no_worse_than_torch_bf16(backend, V):
    opts = OPTIONS["kl_k3_bias_t0.6"]
    data = _inputs(4, 60, V, seed=V, kl=True, bias=True)
    # The truth is float64 arithmetic on the bf16 values both paths are given, so that only their arithmetic differs.
    data = tuple(x.to(torch.bfloat16).double() if i < 3 else x for i, x in enumerate(data))
    truth_loss, _, truth_grads = _run(reference.fused_linear_degrpo_loss, *data, torch.float64, opts)
    torch_loss, _, torch_grads = _torch_bf16_path(*data, opts)
    loss, metrics, grads = _run(fused_linear_degrpo_loss, *data, torch.bfloat16, opts, backend=backend, chunk_size=50)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    # A hair of slack: where both paths round the same bf16 logits, their errors are equal up to noise.
    slack = 1.02
    assert cases.rel_err(loss, truth_loss) <= slack * cases.rel_err(torch_loss, truth_loss) + 1e-6
    for name, grad, torch_grad, truth in zip(
        ("hidden", "weight", "bias"), grads, torch_grads, truth_grads, strict=True
    ):
        assert cases.rel_err(grad, truth) <= slack * cases.rel_err(torch_grad, truth), name


@pytest.mark.parametrize("backend", backend_params())
def test_float64_is_exact(backend):
    opts = OPTIONS["kl_k3_bias_t0.6"]
    data = _inputs(3, 20, 300, seed=3, kl=True, bias=True)
    truth_loss, _, truth_grads = _run(reference.fused_linear_degrpo_loss, *data, torch.float64, opts)
    loss, metrics, grads = _run(fused_linear_degrpo_loss, *data, torch.float64, opts, backend=backend, chunk_size=16)
    assert loss.dtype == torch.float64 and metrics["logp"].dtype == torch.float64
    assert cases.rel_err(loss, truth_loss) < 1e-12
    for grad, truth in zip(grads, truth_grads, strict=True):
        assert cases.rel_err(grad, truth) < 1e-12


@pytest.fixture
def compiled_scalars(monkeypatch):
    """Python floats reach a compiled Triton kernel as fp32 (an H200 showed it: a float64 loss off by 2e-7, then
    1.7e-9); the interpreter keeps them float64. Rounded here as the compiler does, a float64 pass through the
    interpreter sees the scalars a GPU sees."""
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    fp32 = lambda x: float(torch.tensor(x, dtype=torch.float32)) if type(x) is float else x  # noqa: E731

    launches = []

    def rounded(self, *args, grid, warmup, **kwargs):  # kwargs: the constexpr switches
        launches.extend(x for x in args if type(x) is float)
        return run(self, *map(fp32, args), grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", rounded)
    yield
    assert launches, "no Triton kernel took a Python float: the rounding did not apply"


@pytest.mark.skipif(not TRITON_ON_CPU, reason="the interpreter's scalars; test_cuda checks the compiled kernels")
def test_float64_is_exact_with_fp32_kernel_scalars(compiled_scalars):
    """Every float a Triton kernel takes (1/temperature, the clip range, the KL clamp) travels as two fp32 halves,
    so a float64 pass stays exact when the compiler narrows them (before the clip range did: 1.7e-9)."""
    test_float64_is_exact("triton")


@pytest.mark.parametrize("backend", backend_params())
def test_metrics_are_degrpo_loss_on_the_logprobs(backend):
    """The loss and metrics equal degrpo_loss on the returned log-probs; those equal token_logprobs everywhere."""
    opts = dict(temperature=0.6, kl_coef=0.1, kl_type="k2", alpha=0.3)
    hidden, weight, bias, targets, old, adv, mask, ref = _inputs(4, 25, 400, seed=11, kl=True, bias=True)
    h, w, b = hidden.float(), weight.float(), bias.float()
    loss, metrics = fused_linear_degrpo_loss(
        h, w, targets, old, adv, mask, bias=b, ref_logp=ref, backend=backend, **opts
    )
    logp, entropy = token_logprobs(h, w, targets, bias=b, temperature=0.6, return_entropy=True, backend=backend)
    torch.testing.assert_close(metrics["logp"], logp, rtol=1e-5, atol=1e-5)  # every position, masked or not
    torch.testing.assert_close(metrics["entropy"], entropy[mask].mean(), rtol=1e-5, atol=1e-6)
    opts.pop("temperature")
    direct_loss, direct = degrpo_loss(logp, old, adv, mask, ref_logp=ref, backend=backend, **opts)
    torch.testing.assert_close(loss, direct_loss, rtol=1e-5, atol=1e-7)
    for key, value in direct.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("shape", [(7,), (2, 9), (2, 3, 5)], ids=str)
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_token_logprobs(backend, shape, chunk_size):
    gen = torch.Generator().manual_seed(len(shape) * 10 + (chunk_size or 0))
    V = 1000
    hidden = torch.randn(*shape, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5
    targets = torch.randint(0, V, shape, generator=gen)
    truth, truth_entropy = reference.token_logprobs(hidden, weight, targets, temperature=0.7)
    logp = token_logprobs(
        hidden.float(), weight.float(), targets, temperature=0.7, chunk_size=chunk_size, backend=backend
    )
    assert logp.shape == shape and logp.dtype == torch.float32 and not logp.requires_grad
    assert cases.rel_err(logp, truth) < 1e-5
    logp2, entropy = token_logprobs(
        hidden.float(),
        weight.float(),
        targets,
        temperature=0.7,
        chunk_size=chunk_size,
        return_entropy=True,
        backend=backend,
    )
    torch.testing.assert_close(logp2, logp)
    assert cases.rel_err(entropy, truth_entropy) < 1e-5


def test_token_logprobs_ignores_autograd():
    hidden = torch.randn(2, 5, H, requires_grad=True)
    weight = torch.randn(50, H, requires_grad=True)
    logp = token_logprobs(hidden, weight, torch.randint(0, 50, (2, 5)))
    assert not logp.requires_grad


@pytest.mark.parametrize("backend", backend_params())
def test_gradient_scales_and_flows_through_the_model(backend):
    """2 * loss doubles the gradients; hidden made by an upstream layer gets its gradient through it; inputs
    that need no gradient get none."""
    data = _inputs(3, 16, 200, seed=5)
    hidden, weight, _, targets, old, adv, mask, _ = data
    x = hidden.float().clone().requires_grad_(True)
    layer = torch.nn.Linear(H, H).double().float()
    w = weight.float().requires_grad_(True)
    loss, _ = fused_linear_degrpo_loss(layer(x), w, targets, old, adv, mask, backend=backend)
    (2 * loss).backward()
    x_ref = hidden.double().clone().requires_grad_(True)
    w_ref = weight.detach().clone().requires_grad_(True)
    layer_ref = torch.nn.Linear(H, H).double()
    layer_ref.load_state_dict(layer.state_dict())
    loss_ref, _ = reference.fused_linear_degrpo_loss(layer_ref(x_ref), w_ref, targets, old, adv, mask)
    (2 * loss_ref).backward()
    assert cases.rel_err(x.grad, x_ref.grad) < 1e-4
    assert cases.rel_err(w.grad, w_ref.grad) < 1e-4
    assert cases.rel_err(layer.weight.grad, layer_ref.weight.grad) < 1e-4

    frozen_w = weight.float()  # no requires_grad: only hidden gets a gradient
    h = hidden.float().requires_grad_(True)
    loss, _ = fused_linear_degrpo_loss(h, frozen_w, targets, old, adv, mask, backend=backend)
    loss.backward()
    assert h.grad is not None and frozen_w.grad is None
    with torch.no_grad():
        loss, _ = fused_linear_degrpo_loss(h, w, targets, old, adv, mask, backend=backend)
    assert not loss.requires_grad


SCALED_DTYPES = [
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float64, torch.float64),
    (torch.float32, torch.float16),
]


@pytest.mark.parametrize(("g_dtype", "out_dtype"), SCALED_DTYPES)
@pytest.mark.parametrize("shape", [(7, 5), (0, 5), (9,)])
def test_scaled_is_one_rounding_of_the_fp32_product(g_dtype, out_dtype, shape, monkeypatch):
    """Backward's scaling of a stored gradient (`_scaled`), slice by slice (slices that do not divide the rows): the
    product in fp32 at least, rounded once into the output's dtype, for 2-D, empty and 1-D gradients (dW, dH, db)."""
    import thinkless.kernels.fused_linear as fl

    monkeypatch.setattr(fl, "SCALE_SLICE", 2 * (shape[1] if len(shape) > 1 else 1))
    g = (torch.randn(shape, dtype=torch.float64) * 3).to(g_dtype)
    wide = torch.promote_types(g_dtype, torch.float32)
    for grad_loss in (torch.tensor(1 / 3, dtype=wide), torch.tensor(1.0, dtype=wide)):  # the loss's dtype
        expected = (g.to(wide) * grad_loss.to(wide)).to(out_dtype)
        got = fl._scaled(g, grad_loss, out_dtype)
        assert got.dtype == out_dtype and got.shape == g.shape and torch.equal(got, expected)


@pytest.mark.parametrize("backend", backend_params())
def test_backward_allocates_no_fp32_copy_of_dw(backend, monkeypatch):
    """loss.backward(s) with s != 1 (on CUDA every backward: the incoming gradient is a device tensor) allocates no
    fp32 [V, H] (2 GiB at H=3584, V=151936) on the way to the bf16 gradient: its largest allocation is the bf16 dW.
    (Counted by the profiler per op, its own allocations only: an op's output is allocated inside it.)"""
    from torch.profiler import ProfilerActivity, profile

    import thinkless.kernels.fused_linear as fl

    V = 3000
    hidden, weight, _, targets, old, adv, mask, _ = _inputs(2, 8, V, seed=9)
    h, w = (x.to(torch.bfloat16).requires_grad_(True) for x in (hidden, weight))
    loss, _ = fused_linear_degrpo_loss(h, w, targets, old, adv, mask, temperature=0.6, backend=backend)
    monkeypatch.setattr(fl, "SCALE_SLICE", 41 * H)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward(torch.tensor(0.7))
    assert w.grad.dtype == torch.bfloat16 and w.grad.float().abs().sum() > 0  # the gradient is not all zeros
    assert max(e.self_cpu_memory_usage for e in prof.events()) == V * H * 2  # an fp32 copy would be V * H * 4


@pytest.mark.parametrize("backend", backend_params())
def test_chunk_size_does_not_change_the_result(backend):
    data = _inputs(2, 40, 300, seed=9)
    hidden, weight, _, targets, old, adv, mask, _ = data
    results = []
    for chunk in (1, 13, 80, None):
        loss, metrics, grads = _run(
            fused_linear_degrpo_loss, hidden, weight, None, targets, old, adv, mask, None, torch.float32, {},
            backend=backend, chunk_size=chunk,
        )  # fmt: skip
        results.append((loss, metrics["logp"], *grads))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params())
def test_targets_off_the_mask_may_be_anything(backend):
    """Padding often holds -100 or a pad id past the vocabulary; off the response mask it is ignored."""
    hidden, weight, _, targets, old, adv, mask, _ = _inputs(3, 12, 100, seed=2)
    bad = targets.masked_fill(~mask, -100)
    bad[~mask & (torch.arange(12) % 2 == 0)] = 100  # = V, one past the end
    h = hidden.float().requires_grad_(True)
    loss, metrics = fused_linear_degrpo_loss(h, weight.float(), bad, old, adv, mask, backend=backend)
    loss.backward()
    truth, _, (truth_grad, _) = _run(
        reference.fused_linear_degrpo_loss, hidden, weight, None, targets, old, adv, mask, None, torch.float64, {}
    )
    assert cases.rel_err(loss, truth) < 1e-4 and cases.rel_err(h.grad, truth_grad) < 1e-4
    assert (metrics["logp"][~mask] == 0).all()
    with pytest.raises(ValueError, match=r"target_ids\[0, 0\] = 100 on a response token is outside the vocabulary"):
        fused_linear_degrpo_loss(h, weight.float(), bad.masked_fill(mask, 100), old, adv, mask, backend=backend)


def _good():
    hidden, weight, _, targets, old, adv, mask, _ = _inputs(2, 6, 50, seed=1)
    return dict(
        hidden=hidden.float(),
        weight=weight.float(),
        target_ids=targets,
        old_logp=old,
        advantages=adv,
        response_mask=mask,
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(weight=torch.randn(50, H + 1)), r"last dimension of hidden must be H"),
        (dict(weight=torch.randn(50)), r"weight must be the lm_head weight, 2-D \[V, H\]"),
        (dict(hidden=torch.randn(12, H)), r"target_ids has shape \(2, 6\), expected \(12,\)"),
        (dict(target_ids=torch.zeros(2, 6)), r"target_ids must be an integer tensor"),
        (dict(old_logp=torch.zeros(2, 5)), r"old_logp has shape \(2, 5\), expected \(2, 6\)"),
        (dict(bias=torch.zeros(49)), r"bias has shape \(49,\), expected \(50,\)"),
        (dict(temperature=0.0), r"temperature must be > 0"),
        (dict(chunk_size=0), r"chunk_size must be a positive int"),
        (dict(kl_coef=0.1), r"ref_logp is required when kl_coef > 0"),
    ],
)
def test_bad_input_names_the_problem(change, message):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=message):
        fused_linear_degrpo_loss(**args)


def test_token_logprobs_bad_target_is_named():
    with pytest.raises(ValueError, match=r"target_ids\[1, 2\] = 50 is outside the vocabulary \[0, 50\)"):
        targets = torch.zeros(2, 3, dtype=torch.long)
        targets[1, 2] = 50
        token_logprobs(torch.randn(2, 3, H), torch.randn(50, H), targets)


@pytest.mark.parametrize("backend", backend_params())
def test_strided_token_inputs(backend):
    """old_logp / advantages / ref_logp as strided views (a [:, ::2] slice, a [..., 0] pick) with a full mask."""
    hidden, weight, _, targets, old, adv, mask, ref = _inputs(3, 10, 120, seed=4, kl=True)
    mask = torch.ones_like(mask)
    old_view = torch.stack((old, old + 1), dim=-1)[..., 0]
    ref_view = torch.repeat_interleave(ref, 2, dim=1)[:, ::2]
    adv_view = torch.randn(3, 20)[:, ::2]
    opts = dict(kl_coef=0.1, kl_type="k2")
    truth, _, truth_grads = _run(
        reference.fused_linear_degrpo_loss, hidden, weight, None, targets, old, adv_view.contiguous(), mask, ref,
        torch.float64, opts,
    )  # fmt: skip
    loss, _, grads = _run(
        fused_linear_degrpo_loss, hidden, weight, None, targets, old_view, adv_view, mask, ref_view, torch.float32,
        opts, backend=backend,
    )  # fmt: skip
    assert cases.rel_err(loss, truth) < 1e-4
    for grad, truth_grad in zip(grads, truth_grads, strict=True):
        assert cases.rel_err(grad, truth_grad) < 1e-4


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("gap", [20.0, 30.0])
def test_entropy_of_confident_rows(backend, gap):
    """A confident model (entropy ~ 1e-6): the entropy metric is as accurate as torch's own fp32 softmax gives."""
    hidden, weight, _, targets, old, adv, mask, _ = _inputs(2, 16, 400, seed=6)
    targets = torch.full_like(targets, 7)
    bias = torch.zeros(400, dtype=torch.float64)
    bias[7] = gap  # one token far above the rest in every row
    _, truth = reference.fused_linear_degrpo_loss(hidden, weight, targets, old, adv, mask, bias=bias)
    _, torch32 = reference.fused_linear_degrpo_loss(
        hidden.float(), weight.float(), targets, old, adv, mask, bias=bias.float()
    )
    h = hidden.float().requires_grad_(True)
    _, ours = fused_linear_degrpo_loss(h, weight.float(), targets, old, adv, mask, bias=bias.float(), backend=backend)
    truth = truth["entropy"].item()
    assert truth < (1e-2 if gap == 20.0 else 1e-5)  # confident indeed
    torch_err = abs(torch32["entropy"].item() - truth)
    assert abs(ours["entropy"].item() - truth) <= 2 * torch_err + 1e-3 * truth + 1e-12
    assert ours["entropy"].item() >= 0


@pytest.mark.parametrize("backend", backend_params())
def test_autocast_and_mixed_dtypes(backend):
    """Under bf16 autocast, fp32 inputs stay fp32-accurate; a bf16 hidden meets an fp32 lm_head in fp32."""
    data = _inputs(2, 12, 300, seed=8)
    truth, _, truth_grads = _run(reference.fused_linear_degrpo_loss, *data[:7], None, torch.float64, {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, grads = _run(fused_linear_degrpo_loss, *data[:7], None, torch.float32, {}, backend=backend)
    assert cases.rel_err(loss, truth) < 1e-4
    for grad, truth_grad in zip(grads, truth_grads, strict=True):
        assert cases.rel_err(grad, truth_grad) < 1e-4
    hidden, weight, _, targets, old, adv, mask = data[:7]
    h = hidden.bfloat16().requires_grad_(True)
    w = weight.float().requires_grad_(True)
    loss, _ = fused_linear_degrpo_loss(h, w, targets, old, adv, mask, backend=backend)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert cases.rel_err(h.grad, truth_grads[0]) < 1e-2


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("chunk_size", [5, 7, None])
def test_garbage_padding_rows_stay_out(backend, chunk_size):
    """NaN hidden states on padding rows change neither the loss nor any gradient, whatever the chunking."""
    hidden, weight, _, targets, old, adv, mask, _ = _inputs(3, 9, 80, seed=10)
    assert (~mask).any()
    poisoned = hidden.clone()
    poisoned[~mask] = float("nan")
    clean, _, clean_grads = _run(fused_linear_degrpo_loss, hidden, weight, None, targets, old, adv, mask, None,
                                 torch.float32, {}, backend=backend, chunk_size=chunk_size)  # fmt: skip
    loss, _, grads = _run(fused_linear_degrpo_loss, poisoned, weight, None, targets, old, adv, mask, None,
                          torch.float32, {}, backend=backend, chunk_size=chunk_size)  # fmt: skip
    torch.testing.assert_close(loss, clean)
    torch.testing.assert_close(grads[1], clean_grads[1])  # dW
    torch.testing.assert_close(grads[0][mask], clean_grads[0][mask])
    assert (grads[0][~mask] == 0).all()


def test_double_backward_is_refused():
    hidden, weight, _, targets, old, adv, mask, _ = _inputs(2, 5, 50, seed=12)
    h = hidden.float().requires_grad_(True)
    loss, _ = fused_linear_degrpo_loss(h, weight.float(), targets, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_matches_materialised(backend, dtype):
    """fused_linear_cross_entropy = token-mean -log_softmax(h W^T / tau)[target] over the mask, with gradients."""
    hidden, weight, bias, targets, _, _, mask, _ = _inputs(3, 30, 700, seed=13, bias=True)
    targets = targets.masked_fill(~mask, -100)  # the HF ignore index off the mask

    def run(fn, dt):
        h, w, b = (x.detach().to(dt).clone().requires_grad_(True) for x in (hidden, weight, bias))
        loss, metrics = fn(h, w, b)
        loss.backward()
        return loss.detach(), metrics, (h.grad, w.grad, b.grad)

    def materialised(h, w, b):
        logp, entropy = reference.token_logprobs(h, w, targets.clamp(min=0), bias=b, temperature=0.7)
        return -logp[mask].mean(), {"entropy": entropy[mask].mean()}

    def fused(h, w, b):
        return fused_linear_cross_entropy(h, w, targets, mask, bias=b, temperature=0.7, chunk_size=17, backend=backend)

    truth, truth_metrics, truth_grads = run(materialised, torch.float64)
    loss, metrics, grads = run(fused, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert cases.rel_err(loss, truth) < tol
    assert cases.rel_err(metrics["entropy"], truth_metrics["entropy"]) < tol
    for grad, truth_grad in zip(grads, truth_grads, strict=True):
        assert grad.dtype == dtype and cases.rel_err(grad, truth_grad) < 10 * tol
    assert metrics["tokens"].item() == mask.sum().item()


@pytest.mark.parametrize("x", [1 / 0.6, 1 / 0.7, 1.0, 1e-3, 1 / 3])
def test_temperature_reaches_a_float64_kernel_whole(x):
    """Triton hands a Python float to a compiled kernel as fp32; 1/temperature goes as two fp32 halves instead,
    added in the kernel's compute dtype (an H200 run lost 2e-7 of a float64 log-prob before this)."""
    from thinkless.kernels._triton_utils import split_scalar

    hi, lo = split_scalar(x)
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    assert f32(hi) == hi and f32(lo) == lo  # each passes through an fp32 argument unchanged
    assert abs((hi + lo) - x) <= 2**-48 * x  # added in fp64: x to 4e-15 (48 bits of the 53)
    assert f32(hi + lo) == f32(x)  # added in fp32: fp32(x), as before


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("decoupled", [True, False])
def test_entropy_gradient_gradcheck_float64(backend, decoupled):
    """The entropy bonus's gradient (Triton, C++ and torch row work) against finite differences, in float64.
    Small (H=4, V=7: each finite difference is a whole pass, and the Triton interpreter is slow)."""
    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64), torch.randn(7, 4, generator=gen).double()
    bias = torch.randn(7, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 7, (2, 3), generator=gen)
    mask = torch.tensor([[False, True, True], [True, True, False]])
    old = reference.token_logprobs(hidden, weight, targets, bias=bias, temperature=0.7)[0] + 0.1
    adv = torch.tensor([0.7, -0.4], dtype=torch.float64)
    opts = dict(temperature=0.7, entropy_coef=0.3, decoupled=decoupled, loss_agg="seq_mean_token_mean",
                kl_coef=0.1, ref_logp=old - 0.2, backend=backend, chunk_size=2)  # fmt: skip

    def loss(h, w, b):
        return fused_linear_degrpo_loss(h, w, targets, old, adv, mask, bias=b, **opts)[0]

    leaves = [x.detach().clone().requires_grad_(True) for x in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(loss, leaves)


@pytest.mark.parametrize("backend", backend_params())
def test_entropy_bonus_alone_matches_the_materialised_entropy(backend):
    """With zero advantages and no KL the loss is -coef x the token-mean entropy: its gradient is the entropy's."""
    hidden, weight, bias, targets, old, adv, mask, ref = _inputs(3, 9, 257, seed=6)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    _, entropy = reference.token_logprobs(h1, w1, targets, temperature=0.8)
    want = -0.5 * entropy[mask].mean()
    want.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    zero = torch.zeros_like(adv, dtype=torch.float64)
    loss, metrics = fused_linear_degrpo_loss(
        h2, w2, targets, old.double(), zero, mask, temperature=0.8, entropy_coef=0.5, backend=backend
    )
    loss.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
    assert metrics["entropy"].item() == pytest.approx(entropy[mask].mean().item(), rel=1e-10)
    assert cases.rel_err(h2.grad, h1.grad) < 1e-10 and cases.rel_err(w2.grad, w1.grad) < 1e-10
