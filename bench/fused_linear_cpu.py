"""CPU benchmark of the fused linear DeGRPO loss against its floor, Liger-Kernel and eager torch.

    python bench/fused_linear_cpu.py                    # fp32, N=2048 tokens, H=512, V=32000
    python bench/fused_linear_cpu.py --json out.json    # also write the numbers

Two figures per implementation, all measured in this one run:
  time   forward + backward, divided by the time of the three GEMMs every method must do at least once
         (logits = h W^T, dH = dlogits W, dW = dlogits^T h; outputs preallocated, so the floor is strict);
  memory peak resident memory during forward + backward, minus the resident memory before it, minus the dW and
         dH buffers that any method returns; divided by the size of the fp32 logits [N, V].

Each implementation runs in fresh subprocesses, so that no allocator state, cache or torch.compile worker of one
touches another. Its memory is read from the kernel's peak-RSS counter (reset through /proc/self/clear_refs), with
glibc's malloc returning every large block to the system; its time is the minimum over rounds that alternate it
with the GEMM floor, so that a slow spell of a shared machine hits both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common
import torch
from _cases import build as build_case
from _common import peak_rss_growth

IMPLEMENTATIONS = ("thinkless", "thinkless_torch", "liger", "eager_torch")
# thinkless: the default CPU backend (the native row kernels when thinkless._C is built); thinkless_torch: the
# same chunk loop with its row work in torch ops. The implementations themselves live in _cases.py.
CASE_NAMES = {"eager_torch": "torch"}


def build(name: str, args):
    """A closure running one forward + backward of `name` (fresh leaves, so each run allocates its gradients);
    it returns the gradients. `gemm_floor`: the three GEMMs, outputs preallocated."""
    shape = dict(N=args.tokens, H=args.hidden, V=args.vocab, seq=args.seq, dtype="fp32")
    impl = build_case("fused_linear_degrpo_loss", CASE_NAMES.get(name, name), shape, "cpu")
    return lambda: impl.backward(impl.forward())


def measure_memory(args) -> dict:
    """Subprocess body: peak resident memory growth of one forward + backward, beyond the gradients it returns."""
    run = build(args.measure, args)
    run()  # warm-up (MKL buffers, torch.compile of Liger); the gradients are dropped
    run()
    growth, grads = peak_rss_growth(run)
    return {"extra_bytes": growth - sum(g.numel() * g.element_size() for g in grads)}


def measure_time(args) -> dict:
    """Subprocess body: the best time of one implementation and of the GEMM floor, in alternating rounds."""
    runs = {"seconds": build(args.measure, args), "floor_seconds": build("gemm_floor", args)}
    for fn in runs.values():
        fn()
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def measure_all(args) -> dict[str, dict]:
    """Fresh processes per implementation, so that no allocator state, cache or torch.compile worker of one
    touches another. Memory runs with glibc's malloc returning every block over 4 KiB to the system at once (so
    the peak counter sees every allocation, see _common.MEMORY_ENV); timing runs with the default malloc, as users
    have it."""
    memory_env = _common.memory_env()
    out = {}
    for name in args.impl:
        out[name] = {}
        for what, env in (("memory", memory_env), ("time", None)):
            cmd = [sys.executable, __file__, "--measure", name, "--what", what, "--rounds", str(args.rounds)]
            cmd += ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
            cmd += ["--seq", str(args.seq)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"measuring the {what} of {name} failed:\n{proc.stderr[-3000:]}")
            out[name].update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (Liger chunks by sequence)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--what", choices=("memory", "time"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_memory(args) if args.what == "memory" else measure_time(args)))
        return 0
    results = measure_all(args)
    logits = args.tokens * args.vocab * 4
    threads = torch.get_num_threads()
    print(f"fp32 N={args.tokens} H={args.hidden} V={args.vocab}, {threads} threads, torch {torch.__version__}")
    print(f"{'implementation':14} {'time s':>8} {'floor s':>8} {'x floor':>8} {'extra MiB':>10} {'x logits':>9}")
    rows = {}
    for name, r in results.items():
        rows[name] = dict(
            r, time_vs_floor=r["seconds"] / r["floor_seconds"], memory_vs_logits=r["extra_bytes"] / logits
        )
        print(
            f"{name:14} {r['seconds']:8.3f} {r['floor_seconds']:8.3f} {rows[name]['time_vs_floor']:8.3f} "
            f"{r['extra_bytes'] / 2**20:10.1f} {rows[name]['memory_vs_logits']:9.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
