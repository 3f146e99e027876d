"""GPU benchmark of the fused linear DeGRPO loss: throughput against the card's own GEMMs, Liger, eager torch.

    python bench/fused_linear_gpu.py                          # bf16, N=16384 tokens, H=1536, V=151936, on cuda
    python bench/fused_linear_gpu.py --json out.json          # also write the numbers
    python bench/fused_linear_gpu.py --device cpu --tokens 256 --seq 64 --hidden 64 --vocab 1000 --dtype fp32  # smoke

Figures, all from this one run on this one card:
  gemm_tflops   the card's measured throughput for the three GEMMs of the loss at these shapes (h W^T, dz W,
                dz^T h, bf16 in, outputs preallocated): the ceiling;
  tflops        6 N H V / (forward + backward time) of each implementation, and its fraction of gemm_tflops;
  vs_liger      Liger's time divided by this implementation's;
  extra_gib     peak allocated memory during forward + backward, beyond the inputs and the dH / dW it returns.
Targets (issue 3): thinkless >= 70 % of gemm_tflops, >= 2x faster than Liger, <= 1 GiB extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time

import torch
from _cases import build_all
from _common import DTYPES, linear_inputs, sync


def best_time(fn, device, rounds: int) -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def implementations(args, device) -> dict:
    """name -> a closure running one forward + backward (fresh leaves), returning the gradients. The code of each
    is in _cases.py (eager_torch is its "torch"); Liger's is left out when liger-kernel is not installed."""
    shape = dict(N=args.tokens, H=args.hidden, V=args.vocab, seq=args.seq, dtype=args.dtype)
    cases = {"thinkless": "thinkless", "eager_torch": "torch"}
    if importlib.util.find_spec("liger_kernel") is not None:
        cases["liger"] = "liger"
    else:
        print("liger-kernel is not installed: no Liger column")
    impls = build_all("fused_linear_degrpo_loss", cases.values(), shape, device)

    def full(impl):
        return lambda: impl.backward(impl.forward())

    return {name: full(impls[case]) for name, case in cases.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (Liger chunks by sequence)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], help="implementations to leave out, e.g. eager_torch")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    h, w, *_ = linear_inputs(args.tokens, args.hidden, args.vocab, args.seq, device=device, dtype=dtype)
    N, H, V = args.tokens, args.hidden, args.vocab
    flops = 6 * N * H * V

    h2 = h.reshape(N, H)
    outputs = [torch.empty(N, V, device=device, dtype=dtype), torch.empty_like(h2), torch.empty_like(w)]

    def gemms(z, dH, dW):
        torch.mm(h2, w.t(), out=z)
        torch.mm(z, w, out=dH)
        torch.mm(z.t(), h2, out=dW)

    gemm_s = best_time(lambda: gemms(*outputs), device, args.rounds)
    outputs.clear()  # free the logits before the implementations run
    gemm_tflops = flops / gemm_s / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, {args.dtype}, N={N} H={H} V={V}, torch {torch.__version__}")
    print(f"three GEMMs: {gemm_s * 1e3:.1f} ms = {gemm_tflops:.1f} TFLOP/s (the ceiling)")
    results = {"device": name, "shape": vars(args), "gemm_seconds": gemm_s, "gemm_tflops": gemm_tflops, "impl": {}}
    grads_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    for impl, fn in implementations(args, device).items():
        if impl in args.skip:
            continue
        seconds = best_time(fn, device, args.rounds)
        row = {"seconds": seconds, "tflops": flops / seconds / 1e12, "of_gemm": gemm_s / seconds}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            grads = fn()
            sync(device)
            row["extra_gib"] = (torch.cuda.max_memory_allocated(device) - before - grads_bytes) / 2**30
            del grads
        results["impl"][impl] = row
    liger = results["impl"].get("liger", {}).get("seconds")
    print(f"{'implementation':14} {'ms':>9} {'TFLOP/s':>8} {'of GEMM':>8} {'vs Liger':>9} {'extra GiB':>10}")
    for impl, row in results["impl"].items():
        row["vs_liger"] = liger / row["seconds"] if liger else None
        extra = f"{row['extra_gib']:10.2f}" if "extra_gib" in row else f"{'-':>10}"
        vs = f"{row['vs_liger']:8.2f}x" if row["vs_liger"] else f"{'-':>9}"
        print(f"{impl:14} {row['seconds'] * 1e3:9.1f} {row['tflops']:8.1f} {row['of_gemm']:7.0%} {vs} {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
