"""Padding-free micro-batches: packed rows give the loss and gradients of padded ones."""

import pytest
import torch

from thinkless.train.config import load_config
from thinkless.train.logprobs import sequence_logprobs
from thinkless.train.packing import pack, token_budget_batches
from thinkless.train.policy_loss import policy_loss
from thinkless.train.rollout import Rollouts
from thinkless.train.sft import sft_loss

VOCAB = 97


def tiny_model(attn: str, seed: int = 0, dtype=torch.float64):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        attn_implementation=attn, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).to(dtype)


def rollouts(prompt_lens, response_lens, seed=0) -> Rollouts:
    """Left-padded prompts, then right-padded responses, as `generate` returns them."""
    g = torch.Generator().manual_seed(seed)
    P, R = max(prompt_lens), max(response_lens)
    S = len(prompt_lens)
    ids = torch.zeros(S, P + R, dtype=torch.long)
    attention = torch.zeros(S, P + R, dtype=torch.long)
    response = torch.zeros(S, P + R, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        ids[i, P - p : P + r] = torch.randint(2, VOCAB, (p + r,), generator=g)
        attention[i, P - p : P + r] = 1
        response[i, P : P + r] = True
    return Rollouts(ids, attention, response, torch.arange(S) // 2, [None] * S, [""] * S, response.sum(1))


def test_pack_keeps_each_sequence_in_order():
    ro = rollouts([3, 5, 1, 4], [6, 2, 4, 1])
    p = pack(ro.input_ids, ro.attention_mask, ro.response_mask, [2, 0, 3])
    expect_in, expect_tg, expect_pos, expect_ctrl, expect_mask = [], [], [], [], []
    for row in (2, 0, 3):
        tokens = ro.input_ids[row][ro.attention_mask[row].bool()].tolist()
        counted = ro.response_mask[row][ro.attention_mask[row].bool()].tolist()
        expect_in += tokens[:-1]
        expect_tg += tokens[1:]
        expect_pos += list(range(len(tokens) - 1))
        expect_mask += counted[1:]
        expect_ctrl += [j == counted.index(True) - 1 for j in range(len(tokens) - 1)]
    assert p.input_ids[0].tolist() == expect_in and p.target_ids[0].tolist() == expect_tg
    assert p.position_ids[0].tolist() == expect_pos and p.loss_mask[0].tolist() == expect_mask
    assert p.control_mask[0].tolist() == expect_ctrl
    shifted = torch.randn(4, ro.input_ids.shape[1] - 1)
    assert torch.equal(p.scatter(p.gather(shifted), shifted.shape)[p.rows, p.cols], shifted[p.rows, p.cols])


def test_token_budget_batches():
    lengths = [5, 3, 9, 2, 2, 20, 1]
    out = token_budget_batches(lengths, list(range(7)), 10)
    assert [r for b in out for r in b] == list(range(7))  # order kept, nothing lost
    assert out == [[0, 1], [2], [3, 4], [5], [6]]
    assert all(sum(lengths[r] for r in b) <= 10 or len(b) == 1 for b in out)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Eager attention in float64 turns left-padded rows into NaN inside transformers (its mask, not ours): fp32 there.
@pytest.mark.parametrize(("attn", "dtype", "tol"), [("sdpa", torch.float64, 1e-9), ("eager", torch.float32, 3e-5)])
@pytest.mark.parametrize("options", [[], ["algo.decoupled=false"], ["algo.kl_coef=0.1", "rollout.temperature=0.7"]])
def test_packed_rl_loss_and_gradients_equal_padded(attn, dtype, tol, options):
    ro = rollouts([3, 5, 1, 4, 2], [6, 2, 4, 1, 7], seed=1)
    model = tiny_model(attn, dtype=dtype)
    S, L = ro.input_ids.shape
    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(S, generator=g, dtype=dtype)
    results = {}
    for padding_free in (False, True):
        config = load_config(None, [f"algo.padding_free={padding_free}", "algo.micro_batch_size=8", *options])
        old = sequence_logprobs(model, ro, config.rollout.temperature, config.algo).to(dtype)
        old = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
        ref = old - 0.1 if config.algo.kl_coef else None
        model.zero_grad()
        loss, metrics = policy_loss(model, ro, [4, 0, 2, 1, 3], old, ref, advantages, config)
        loss.backward()
        results[padding_free] = (loss.detach(), grads(model), metrics)
    (l0, g0, m0), (l1, g1, m1) = results[False], results[True]
    assert rel(l1, l0) < tol
    for name in g0:
        assert rel(g1[name], g0[name]) < tol, name
    for key in ("control_loss", "response_loss", "control_tokens", "response_tokens"):
        assert float(m1[key]) == pytest.approx(float(m0[key]), rel=tol, abs=tol)
    assert int(m1["control_tokens"]) == S  # one control token per sequence


def test_packed_sequence_logprobs_equal_padded():
    ro = rollouts([4, 2, 6], [5, 8, 1], seed=4)
    model = tiny_model("sdpa")
    padded = sequence_logprobs(model, ro, 1.0, load_config(None, ["algo.micro_batch_size=2"]).algo)
    config = load_config(None, ["algo.padding_free=true", "algo.micro_batch_tokens=12"])
    packed = sequence_logprobs(model, ro, 1.0, config.algo)
    valid = ro.attention_mask[:, :-1].bool() & ro.attention_mask[:, 1:].bool()
    torch.testing.assert_close(packed[valid], padded[valid], rtol=1e-5, atol=1e-6)


def test_packed_sft_loss_equals_padded():
    from types import SimpleNamespace

    model = tiny_model("sdpa")
    g = torch.Generator().manual_seed(5)
    encoded = []
    for n_prompt, n_resp in ((3, 4), (7, 2), (1, 9)):
        ids = torch.randint(2, VOCAB, (n_prompt + n_resp,), generator=g).tolist()
        encoded.append((ids, [False] * n_prompt + [True] * n_resp))
    tok = SimpleNamespace(pad_token_id=0)
    out = {}
    for padding_free in (False, True):
        model.zero_grad()
        loss, metrics = sft_loss(model, tok, encoded, torch.device("cpu"), padding_free)
        loss.backward()
        out[padding_free] = (loss.detach(), grads(model), int(metrics["tokens"]))
    assert out[True][2] == out[False][2] == 4 + 2 + 9  # every response token follows a prompt token
    assert rel(out[True][0], out[False][0]) < 1e-10
    for name, grad in out[False][1].items():
        assert rel(out[True][1][name], grad) < 1e-9, name
