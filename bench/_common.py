"""Helpers shared by the benchmark scripts and the pytest-benchmark suite: inputs, devices, peak memory."""

from __future__ import annotations

import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# glibc's malloc keeps freed blocks below its (dynamic) mmap threshold for reuse, so a second run of a kernel would
# not raise the resident set at all. Started with these, a process maps every block over 4 KiB on its own and
# unmaps it at once on free: the kernel's peak-RSS counter then sees every allocation, to the page. Memory runs
# only; timings keep the default malloc, as users have it.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "4096", "MALLOC_TRIM_THRESHOLD_": "0"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the thread count torch uses (the two things a CPU timing depends on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def linear_inputs(tokens: int, hidden: int, vocab: int, seq: int, *, device="cpu", dtype=torch.float32, seed=0):
    """hidden [B, T, H], lm_head weight [V, H], targets, old log-probs, advantages [B] and a full response mask.

    Scaled so that the logits have a spread like a trained model's and the old log-probs sit near the new ones
    (ratios near 1, some clipped)."""
    gen = torch.Generator().manual_seed(seed)
    B, T = tokens // seq, seq
    h = (torch.randn(B, T, hidden, generator=gen) / hidden**0.5 * 4).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=gen) * 0.5).to(device, dtype)
    targets = torch.randint(0, vocab, (B, T), generator=gen).to(device)
    old = (-torch.rand(B, T, generator=gen) * 3 - 8).to(device)
    adv = torch.randn(B, generator=gen).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    return h, w, targets, old, adv, mask


def token_inputs(B: int, T: int, *, device="cpu", dtype=torch.float32, seed=0):
    """Per-token log-probs, old and reference log-probs near them, advantages [B], a mask with 20 % padding."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen) * 3
    old = logp + 0.1 * torch.randn(B, T, generator=gen)
    ref = logp + 0.1 * torch.randn(B, T, generator=gen)
    adv, mask = torch.randn(B, generator=gen), torch.rand(B, T, generator=gen) > 0.2
    logp, old, ref = (x.to(device, dtype) for x in (logp, old, ref))
    return logp, old, ref, adv.to(device), mask.to(device)


def reward_inputs(n: int, group: int, *, shuffled=False, device="cpu", seed=0):
    """float32 rewards [n] and int64 group ids, `group` samples per prompt: prompt by prompt, as the trainer's
    rollouts come (repeat_interleave), or in a random order."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) // group
    if shuffled:
        ids = ids[torch.randperm(n, generator=gen)]
    return torch.rand(n, generator=gen).to(device), ids.to(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_growth(fn) -> tuple[int, object]:
    """(bytes the resident set grew to at its peak while fn ran, fn's result). Linux only; start the process with
    MEMORY_ENV so that reused malloc blocks do not hide allocations."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set size
    before = _status_kib("VmRSS:")
    out = fn()
    return (_status_kib("VmHWM:") - before) * 1024, out


def memory_env() -> dict:
    return dict(os.environ, **MEMORY_ENV)
