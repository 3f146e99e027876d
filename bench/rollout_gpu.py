"""The HF engine's rollout alone, in one process: plain `generate`, the static-cache compiled decoder
(`rollout.compile`) and its CUDA-graph replay (`rollout.cuda_graphs`), at several batch sizes; sampled tokens per
second and whether the three sample alike.

    python bench/rollout_gpu.py --out /tmp/rollout                       # 0.5B shape, 8 x {8,16,32} prompts
    python bench/rollout_gpu.py --size tiny --prompts 2,4 --tokens 16    # a CPU smoke run

The model is `bench/rl_step.py`'s random-weight Qwen2 of the real shape (bf16 on CUDA) and its character tokenizer;
the prompts are the demo's arithmetic problems. Random weights almost never sample EOS, so every response is
`--tokens` long and the figure is S x tokens over the seconds of `thinkless.train.rollout.generate` (what an RL step
calls; the prefill included, the untimed first call of each shape compiles). Per batch size the engines alternate
round by round; each engine's best round is reported.

Sampling semantics: the graph replays the compiled step's own kernels on the same random numbers, so with one seed
`cuda_graphs` must draw the compiled step's tokens and record its log-probs bit for bit (`same_tokens`,
`same_logp`: the exit status is 1 if not, or if the step was not captured: `graphed`). Against `generate`, which
draws from the same random numbers on CUDA but from logits summed in another order (bf16), `rows_as_generate` is
the share of samples whose every token is generate's: information, not a pass mark (a near-tie can flip a token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rl_step import SIZES, VOCAB, write_prompts  # noqa: E402

ENGINES = {"generate": {}, "compile": {"compile": True}, "cuda_graphs": {"compile": True, "cuda_graphs": True}}


def load(size: str, folder: Path):
    """The random model (on CUDA when there is one) and its tokenizer, built once and kept in `folder`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from thinkless.demo.tiny import build_tokenizer
    from thinkless.train.model import load_tokenizer

    if not (folder / "config.json").exists():
        tokenizer = build_tokenizer(folder)
        config = Qwen2Config(
            vocab_size=VOCAB, max_position_embeddings=32768, rope_theta=1e6, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **SIZES[size],
        )  # fmt: skip
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, load_tokenizer(str(folder))


def prompts(tokenizer, count: int, folder: Path) -> list[str]:
    from thinkless.train.data import chat_prompt, user_turn

    write_prompts(folder / "prompts.json", count)
    problems = json.loads((folder / "prompts.json").read_text())
    return [chat_prompt(tokenizer, user_turn(p["problem"], "", "none")) for p in problems]


def timed(model, tokenizer, batch: list[str], rollout, seed: int):
    from thinkless.train.rollout import generate

    torch.manual_seed(seed)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = generate(model, tokenizer, batch, rollout)
    sync()
    return time.perf_counter() - start, out


def bench_batch(model, tokenizer, batch: list[str], args, engines: list[str]) -> list[dict]:
    """Every engine at one batch size: an untimed call (compiles the shape), then `args.rounds` alternating rounds
    with the same seed each (so the rounds also check that each engine repeats itself)."""
    common = {"n": args.n, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": args.tokens}
    settings = lambda name: SimpleNamespace(**common, **{"compile": False, "cuda_graphs": False, **ENGINES[name]})  # noqa: E731
    times, outs = {name: [] for name in engines}, {}
    for name in engines:
        timed(model, tokenizer, batch, settings(name), seed=1)
    from thinkless.train import decode

    captured = {name: 0 for name in engines}
    for _ in range(args.rounds):
        for name in engines:
            before = dict(decode.CAPTURES)
            seconds, outs[name] = timed(model, tokenizer, batch, settings(name), seed=0)
            times[name].append(seconds)
            # This call's own capture, recorded and not failed (the counters count the whole process).
            captured[name] += (
                decode.CAPTURES["recorded"] - before["recorded"] - (decode.CAPTURES["failed"] - before["failed"])
            )
    exact = torch.cuda.is_available()  # on CPU the compiled decoder draws other random numbers than generate
    rows = []
    for name in engines:
        out = outs[name]
        sampled = int(out.response_mask.sum())
        best = min(times[name])
        row = {"engine": name, "samples": len(batch) * args.n, "tokens": args.tokens, "sampled": sampled,
               "best_s": best, "rounds_s": times[name], "tokens_per_s": sampled / best}  # fmt: skip
        if (
            exact
            and name != "generate"
            and "generate" in outs
            and out.input_ids.shape == outs["generate"].input_ids.shape
        ):
            row["rows_as_generate"] = (out.input_ids == outs["generate"].input_ids).all(1).float().mean().item()
        if name == "cuda_graphs" and "compile" in outs:
            row["same_tokens"] = bool(torch.equal(out.input_ids, outs["compile"].input_ids))
            row["same_logp"] = bool(torch.equal(out.rollout_logp, outs["compile"].rollout_logp))
            row["graphed"] = captured[name] == args.rounds if exact else None  # every timed round replayed a graph
        rows.append(row)
    return rows


def table(rows: list[dict], args) -> str:
    base = {r["samples"]: r["tokens_per_s"] for r in rows if r["engine"] == "generate"}
    lines = [
        f"Qwen2.5-{args.size} shape (random weights, V={VOCAB}), {args.tokens} new tokens, temperature 1",
        "",
        "| samples | engine | best s | tokens/s | x generate | rows as generate | graph = compiled | graphed |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base[r['samples']]:.2f}" if r["samples"] in base else "-"
        lines.append(
            f"| {r['samples']} | {r['engine']} | {r['best_s']:.2f} | {r['tokens_per_s']:.0f} | {ratio}"
            f" | {r.get('rows_as_generate', '-')} | {r.get('same_tokens', '-') and r.get('same_logp', '-')}"
            f" | {r.get('graphed', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("rollout_out"))
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    parser.add_argument("--prompts", default="8,16,32", help="prompts per batch, comma-separated")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--budget-s", type=float, default=0, help="skip the batch sizes left after this many seconds")
    args = parser.parse_args(argv)
    engines = [e for e in args.engines.split(",") if e]
    if [e for e in engines if e not in ENGINES]:
        parser.error(f"unknown engines in {engines}; known: {', '.join(ENGINES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer = load(args.size, args.out / f"model-{args.size}")
    rows = []
    for count in (int(p) for p in args.prompts.split(",")):
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"skipped {count} prompts: out of time budget", flush=True)
            continue
        for row in bench_batch(model, tokenizer, prompts(tokenizer, count, args.out), args, engines):
            rows.append(row)
            print(json.dumps(row), flush=True)
        # Written after each batch size: a time limit that ends the next one keeps these.
        settings = vars(args) | {"out": str(args.out), "device": _device_name()}
        (args.out / "rollout.json").write_text(json.dumps({"settings": settings, "rows": rows}))
    text = table(rows, args)
    (args.out / "rollout.md").write_text(text)
    print(text)
    marks = ("same_tokens", "same_logp", "graphed")
    return 0 if all(r.get(k, True) is not False for r in rows for k in marks) else 1


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
