"""The colocated vLLM engine (`rollout.engine=vllm`), driven through a CPU stand-in for vLLM's API (fake_vllm.py)."""

import json
import math
import sys

import fake_vllm
import pytest
import torch
from test_train import _config, workdir  # noqa: F401  (the module-scoped fixture: tiny model, data)

from thinkless.train.config import ConfigError


def _sft(workdir):  # noqa: F811
    if not (workdir / "sft").exists():
        from thinkless.train.sft import run_sft

        run_sft(_config(workdir, "sft"))
    return workdir / "sft"


def test_outputs_become_rollouts_in_the_trainers_layout():
    """Prompts left-padded, responses right-padded; a stop token kept (appended, log-prob unknown, when the engine
    left it out); each token's log-prob at the column of the trainer's log-prob of that token."""
    from types import SimpleNamespace

    from thinkless.train.vllm_rollout import rollouts_from_outputs

    ids = {"<short>": 7, "<think>": 8, "</think>": 9}
    tok = SimpleNamespace(pad_token_id=0, decode=lambda ids, **k: " ".join(map(str, ids)), all_special_ids=[],
                          convert_tokens_to_ids=ids.get,
                          convert_ids_to_tokens={i: t for t, i in ids.items()}.get)  # fmt: skip
    L = fake_vllm.Logprob
    outs = [
        fake_vllm.RequestOutput("0", [5, 6], [
            fake_vllm.CompletionOutput(1, "", [8, 3, 2], None, [{8: L(-0.5)}, {3: L(-1.5)}, {2: L(-0.1)}], "stop", 2),
            fake_vllm.CompletionOutput(0, "", [7, 4], None, [{7: L(-0.2)}, {4: L(-2.0)}], "length", None),
        ]),
        fake_vllm.RequestOutput("1", [5, 6, 6], [
            fake_vllm.CompletionOutput(0, "", [7], None, [{7: L(-0.3)}], "stop", 2),  # stop token left out
            fake_vllm.CompletionOutput(1, "", [3, 3, 3, 3], None, [{3: L(-1.0)}] * 4, "length", None),
        ]),
    ]  # fmt: skip
    ro = rollouts_from_outputs([[5, 6], [5, 6, 6]], outs, [2], tok, 2, torch.device("cpu"))
    assert ro.input_ids.tolist() == [
        [0, 5, 6, 7, 4, 0, 0],  # index 0 first
        [0, 5, 6, 8, 3, 2, 0],
        [5, 6, 6, 7, 2, 0, 0],  # the stop token appended
        [5, 6, 6, 3, 3, 3, 3],
    ]
    assert ro.response_mask[:, 3:].long().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert ro.attention_mask.tolist()[0] == [0, 1, 1, 1, 1, 0, 0]
    assert ro.prompt_index.tolist() == [0, 0, 1, 1] and ro.modes == ["short", "think", "short", None]
    assert ro.lengths.tolist() == [2, 3, 2, 4] and ro.prompt_width == 3
    logp = ro.rollout_logp  # column c: the token at c + 1
    assert logp.shape == (4, 6)
    assert logp[1, 2:5].tolist() == pytest.approx([-0.5, -1.5, -0.1]) and logp[1, :2].eq(0).all()
    assert logp[2, 2] == pytest.approx(-0.3) and math.isnan(logp[2, 3])  # unknown: the appended stop token
    assert logp[0, 4:].eq(0).all()  # padding


@pytest.mark.parametrize(("include_stop", "sleep"), [(True, True), (False, True), (True, False)])
def test_rl_with_the_vllm_engine(workdir, monkeypatch, include_stop, sleep, capsys):  # noqa: F811
    """Two RL steps through the engine: it samples from the policy's current weights (its log-probs equal the
    trainer's, which they could not after an update, or after a level-2 sleep, without the sync), sleeps while
    the policy trains, and is configured as the trainer needs. Weights go through the worker's reload_weights; a
    platform without sleep mode keeps the engine awake."""
    fake_vllm.install(monkeypatch)
    monkeypatch.setattr(fake_vllm.LLM, "include_stop_token", include_stop)
    monkeypatch.setattr(fake_vllm.LLM, "sleep_mode", sleep)
    from thinkless.train.rl import run_rl

    out = workdir / f"vllm-{include_stop}-{sleep}"
    settings = ["trainer.total_steps=2", "rollout.engine=vllm", "algo.is_correction=true", "rollout.max_new_tokens=8"]
    settings += [f"model.path={_sft(workdir)}", "trainer.device=cpu"]  # fp32 anywhere: the stand-in samples in fp32
    config = _config(workdir, "rl", f"trainer.output_dir={out}", *settings)
    run_rl(config)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["updates"] == 1 for r in rows)
    for r in rows:
        assert r["rollout_logp_diff"] < 1e-4 and r["is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    (llm,) = fake_vllm.LLM.instances
    kw = llm.kwargs
    assert kw["logprobs_mode"] == "processed_logprobs" and kw["skip_tokenizer_init"]
    assert kw["enable_sleep_mode"] is sleep
    assert kw["dtype"] == "float32" and kw["max_model_len"] == config.data.max_prompt_tokens + 8
    sync = ("reload_weights",)
    if not sleep:
        assert llm.calls == [sync, ("reset_prefix_cache",), ("generate",)] * 2
        assert "this platform has no vLLM sleep mode" in capsys.readouterr().out
        return
    step = [sync, ("reset_prefix_cache",), ("generate",), ("sleep", 2)]
    wake = [("wake_up", ("weights",)), sync, ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
    assert llm.calls == step + wake + step[2:]  # step 2 samples after a level-2 sleep: only synced weights work


def test_vllm_engine_setup_errors(workdir, monkeypatch):  # noqa: F811
    from thinkless.train.rl import run_rl

    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(ConfigError, match=r"needs the vllm package: pip install 'thinkless\[vllm\]'"):
        run_rl(_config(workdir, "rl", f"trainer.output_dir={workdir / 'v0'}", "rollout.engine=vllm",
                       f"model.path={_sft(workdir)}"))  # fmt: skip
    fake_vllm.install(monkeypatch)
    # The base model's vocabulary grows by the control tokens at load: vLLM would load the smaller one.
    with pytest.raises(ConfigError, match="run the warm-up \\(sft\\) first"):
        run_rl(_config(workdir, "rl", f"trainer.output_dir={workdir / 'v1'}", "rollout.engine=vllm",
                       f"model.path={workdir / 'base'}"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"rollout.vllm_gpu_memory_utilization must be in \(0, 1\]"):
        _config(workdir, "rl", "rollout.vllm_gpu_memory_utilization=1.5")
