"""One DeGRPO step of the real trainer on a real-shape model (random weights), split into rollout, log-probs and
update, with its peak GPU memory, with and without each trainer feature.

    python bench/rl_step.py --out /tmp/rl_step                      # Qwen2.5-0.5B shape, every variant
    python bench/rl_step.py --size 1.5b --variants base,liger_off   # some of them, another shape

Each variant is a fresh `thinkless-train rl` process (python -m thinkless.cli) on the same random model and
prompts, `--steps` steps; the table reports the last step (the first one compiles the Triton kernels and warms the
allocator). Random weights almost never sample EOS, so every response is `--new-tokens` long and each variant
trains on the same number of tokens. The numbers come from the run's own metrics.jsonl: `rollout_seconds`
(generation, rewards, advantages), `logprob_seconds` (old-policy and reference log-probs), `update_seconds` (the
PPO pass: forward, fused loss, backward, optimizer), `peak_memory_gib` (torch.cuda.max_memory_allocated over the
step). A markdown table is printed and written to <out>/rl_step.md, the rows to <out>/rl_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Hidden, layers, heads, kv heads, MLP width of the Qwen2.5 models; the vocabulary is Qwen's 151936.
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=True),  # a smoke test of this script on a CPU
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, tie_word_embeddings=True),
}  # fmt: skip
VOCAB = 151936

# Each variant turns one feature on or off against `base` (the trainer's defaults on CUDA: Liger patches on,
# padded micro-batches, no gradient checkpointing, no reference model).
VARIANTS = {
    "base": [],
    "compiled_rollout": ["rollout.compile=true"],  # static KV cache + compiled decode step
    "cuda_graphs": ["rollout.compile=true", "rollout.cuda_graphs=true"],  # ... replayed as a CUDA graph
    "liger_off": ["model.liger=false"],
    "grad_ckpt": ["model.gradient_checkpointing=true"],
    "padding_free": ["algo.padding_free=true"],
    "kl_ref": ["algo.kl_coef=0.001"],
}
KEYS = (
    "rollout_seconds",
    "sample_seconds",
    "logprob_seconds",
    "update_seconds",
    "step_seconds",
    "peak_memory_gib",
    "tokens_per_s",
)
# The rollout's speed: the tokens it sampled (mean response tokens x samples) over the generation's seconds
# (`sample_seconds`; the rollout phase also scores them with math-verify, seconds on random text); the figure issue
# 20 asks to triple at 8 x 8 x 256 on the 0.5B shape.


def build_model(folder: Path, size: str) -> None:
    """The demo's character tokenizer (prompts need no real vocabulary) and a random Qwen2 of the real shape."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from thinkless.demo.tiny import build_tokenizer

    tokenizer = build_tokenizer(folder)
    config = Qwen2Config(
        vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=1e6, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **SIZES[size],
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)


def write_prompts(path: Path, n: int) -> None:
    import random

    from thinkless.demo.task import sample

    rng = random.Random(0)
    problems = [sample(5, rng) for _ in range(n)]
    path.write_text(json.dumps([{"problem": p.text, "answer": p.answer} for p in problems]))


def run_variant(name: str, args, model: Path, data: Path) -> dict:
    out = args.out / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # a finished run left there would be "resumed": no step, stale metrics
    command = [
        sys.executable, "-m", "thinkless.cli", "rl", f"model.path={model}", f"data.train_files=[{data}]",
        f"trainer.output_dir={out}", f"trainer.total_steps={args.steps}", f"trainer.batch_size={args.prompts}",
        f"rollout.n={args.n}", f"rollout.max_new_tokens={args.new_tokens}", "rollout.temperature=1.0",
        f"algo.micro_batch_size={args.micro_batch}", f"algo.micro_batch_tokens={args.micro_batch_tokens}",
        f"trainer.save_every={10**6}", *VARIANTS[name],
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (args.out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return {"variant": name, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    sampled = last["mean_tokens"] * args.prompts * args.n
    return {"variant": name, "overrides": VARIANTS[name], "process_seconds": wall, "step": last["step"],
            "tokens": int(last["tokens_per_s"] * last["step_seconds"]), **{k: last.get(k) for k in KEYS},
            "rollout_tokens_per_s": sampled / last.get("sample_seconds", last["rollout_seconds"])}  # fmt: skip


def table(rows: list[dict], args) -> str:
    head = (
        f"Qwen2.5-{args.size} shape (random weights, V={VOCAB}), {args.prompts} prompts x {args.n} samples x "
        f"{args.new_tokens} new tokens, micro-batch {args.micro_batch} sequences ({args.micro_batch_tokens} tokens "
        f"when padding-free); step {args.steps} of {args.steps}\n\n"
        "| variant | rollout s | rollout tokens/s | log-probs s | update s | step s | peak GiB | tokens/s |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:200]} | | | | | | |")
            continue
        peak = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
        lines.append(
            f"| {r['variant']} | {r['rollout_seconds']:.2f} | {r['rollout_tokens_per_s']:.0f}"
            f" | {r['logprob_seconds']:.2f} | {r['update_seconds']:.2f} | {r['step_seconds']:.2f} | {peak}"
            f" | {r['tokens_per_s']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("rl_step_out"))
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--micro-batch-tokens", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=0, help="skip the variants left after this many seconds")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, data = args.out / f"model-{args.size}", args.out / "prompts.json"  # a folder per shape
    if not (model / "config.json").exists():
        build_model(model, args.size)
    write_prompts(data, args.prompts)
    rows = []
    for name in names:
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            rows.append({"variant": name, "error": "skipped: out of time budget"})
            continue
        rows.append(run_variant(name, args, model, data))
        print(json.dumps(rows[-1]), flush=True)
    text = table(rows, args)
    (args.out / "rl_step.md").write_text(text)
    (args.out / "rl_step.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
