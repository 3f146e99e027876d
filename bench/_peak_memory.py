"""Peak memory of one benchmark case, per mode: what a call adds at its peak to what was held before it.

CUDA: torch.cuda.max_memory_allocated in this process. CPU: the peak resident set of a fresh subprocess started
with `_common.MEMORY_ENV` (torch's CPU allocator has no peak counter, and tracemalloc does not see torch's
buffers). For `backward`, "before" is after the forward, so the graph the forward keeps is not counted twice.
Outputs are included (a loss's gradients, the log-probs).

    python bench/_peak_memory.py '{"kernel": "degrpo_loss", "impl": "thinkless", "device": "cpu",
                                  "shape": {"B": 64, "T": 4096, "dtype": "fp32"}, "modes": ["forward"]}'
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from _cases import Impl, build, mode_fns
from _common import memory_env, peak_rss_growth


def _prepared(impl: Impl, mode: str, device):
    """The measured call of `mode`, its untimed setup (a backward's forward) already run."""
    setup, target = mode_fns(impl, mode, device)
    args, kwargs = setup() if setup else ((), {})
    return lambda: target(*args, **kwargs)


def cuda_peak(impl: Impl, mode: str, device) -> int:
    device = torch.device(device)
    call = _prepared(impl, mode, device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    call()  # its outputs are freed on return, after the peak
    return torch.cuda.max_memory_allocated(device) - start


def cpu_peaks(case: dict) -> dict[str, int]:
    """Subprocess body: every mode of one case, after a warm-up run (MKL buffers, Liger's torch.compile)."""
    impl = build(case["kernel"], case["impl"], case["shape"], "cpu")
    _prepared(impl, case["modes"][-1], "cpu")()
    return {mode: peak_rss_growth(_prepared(impl, mode, "cpu"))[0] for mode in case["modes"]}


def measure_cpu(kernel: str, impl: str, shape: dict, modes) -> dict[str, int]:
    """Runs `cpu_peaks` in a fresh process; returns {mode: bytes}."""
    case = {"kernel": kernel, "impl": impl, "device": "cpu", "shape": shape, "modes": list(modes)}
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(case)], capture_output=True, text=True, env=memory_env()
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measuring the memory of {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(cpu_peaks(json.loads(sys.argv[1]))))
