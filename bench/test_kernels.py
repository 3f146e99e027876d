"""pytest-benchmark suite: the thinkless kernels against eager torch and Liger-Kernel, per shape and mode.

    pytest bench/ --benchmark-json=out.json           # about 4 minutes on a 2-core CPU; CUDA shapes need a GPU
    python bench/report.py out.json                   # the markdown table of bench/RESULTS.md

One test per kernel, device, shape and mode. pytest-benchmark times thinkless; before each of its rounds, the
untimed setup runs one timed round of every baseline (eager torch, Liger-Kernel where it has a counterpart, the
GEMM floor for the lm_head kernels). Ours and the baselines thus alternate round by round, and a slow spell of a
shared machine hits them all: the ratios are side by side, from the same process and the same minutes.

Modes: `forward` (inputs that require grad, as in a training step), `backward` (loss.backward() after an untimed
forward) and `full` (both); kernels without autograd (group advantages, token log-probs) have only `forward`. The
fused losses of thinkless and Liger compute every gradient in their forward; their `backward` only scales them.

extra_info: `device`, `shape`, `backend` (ours); per implementation, `min_s` and `median_s` (its rounds), `peak_mem_mib`
(growth at the peak of one call, outputs included; see _peak_memory.py), `gb_per_s` for the memory-bound kernels,
`x_gemm_floor` for the lm_head kernels (time / the GEMMs of the mode: h W^T forward, dz W and dz^T h backward); and
`time_vs_<baseline>` = our minimum time / the baseline's. Ratios use minima: the least disturbed round of each.
"""

from __future__ import annotations

import importlib.util
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _cases import MODES, build_all, mode_fns
from _common import DTYPES, device_name, sync
from report import figure, ratio

from thinkless.kernels import select_backend

HAS_CUDA = torch.cuda.is_available()
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
OURS = "thinkless"
FLOOR = "gemm_floor"

CPU_LINEAR = [dict(N=n, H=512, V=32000, seq=256, dtype="fp32") for n in (1024, 2048)]
# Qwen2.5-1.5B and -7B hidden sizes, Qwen's vocabulary, 4k to 32k tokens of 1024-token responses.
GPU_LINEAR = [dict(N=n, H=h, V=151936, seq=1024, dtype="bf16") for h in (1536, 3584) for n in (4096, 16384, 32768)]


def _degrpo_bytes(shape: dict, mode: str) -> int:
    """Least traffic: read logp, old and reference log-probs, the mask and the advantages once; write the gradient
    once when there is a backward."""
    tokens, item = shape["B"] * shape["T"], DTYPES[shape["dtype"]].itemsize
    return tokens * (3 * item + 1) + 4 * shape["B"] + (0 if mode == "forward" else tokens * item)


@dataclass(frozen=True)
class Suite:
    baselines: dict[str, tuple[str, ...]]  # device -> the implementations timed beside ours
    shapes: dict[str, list[dict]]  # device -> shapes
    rounds: dict[str, int]  # device -> timed rounds
    warmup: int
    modes: tuple[str, ...] = MODES
    bytes_moved: Callable[[dict, str], int] | None = None  # for GB/s, on the memory-bound kernels


LINEAR_BASELINES = ("torch", "liger", FLOOR)
SUITES = {
    "group_advantages": Suite(
        baselines={"cpu": ("torch",), "cuda": ("torch",)},
        shapes={
            # Group ids prompt by prompt, as the trainer has them; shuffled, the path for any other order.
            "cpu": [dict(N=8192, G=8, std=False), dict(N=8192, G=8, std=True), dict(N=8192, G=8, shuffled=True)],
            "cuda": [dict(N=8192, G=8, std=False), dict(N=8192, G=8, std=True), dict(N=1 << 20, G=8, std=True)],
        },
        rounds={"cpu": 200, "cuda": 200},
        warmup=10,
        modes=("forward",),
        bytes_moved=lambda s, _: s["N"] * (4 + 8 + 4),  # float32 rewards, int64 ids in; float32 advantages out
    ),
    "degrpo_loss": Suite(
        baselines={"cpu": ("torch",), "cuda": ("torch",)},
        shapes={
            "cpu": [dict(B=64, T=4096, dtype="fp32")],
            "cuda": [dict(B=64, T=4096, dtype="bf16"), dict(B=256, T=16384, dtype="bf16")],
        },
        rounds={"cpu": 30, "cuda": 50},
        warmup=3,
        bytes_moved=_degrpo_bytes,
    ),
    "token_logprobs": Suite(
        baselines={"cpu": LINEAR_BASELINES, "cuda": LINEAR_BASELINES},
        shapes={"cpu": CPU_LINEAR[1:], "cuda": GPU_LINEAR},
        rounds={"cpu": 5, "cuda": 10},
        warmup=1,
        modes=("forward",),
    ),
    "fused_linear_degrpo_loss": Suite(
        # liger_triton: Liger's Triton GRPO loss on the materialised logits, CUDA only.
        # thinkless_big_chunks: ours with 2 H rows per chunk (an experiment, see _cases.py), CUDA only.
        baselines={"cpu": LINEAR_BASELINES, "cuda": ("thinkless_big_chunks", "torch", "liger", "liger_triton", FLOOR)},
        shapes={"cpu": CPU_LINEAR, "cuda": GPU_LINEAR},
        rounds={"cpu": 5, "cuda": 10},
        warmup=1,
    ),
}


@dataclass
class Case:
    kernel: str
    device: str
    shape: dict
    mode: str

    @property
    def suite(self) -> Suite:
        return SUITES[self.kernel]

    @property
    def label(self) -> str:
        """N2048-H512-V32000-fp32: the shape's values; seq, a detail of the inputs, left out; flags by name."""
        parts = []
        for key, value in self.shape.items():
            if key == "seq" or value is False:
                continue
            parts.append(key if value is True else str(value) if key == "dtype" else f"{key}{value}")
        return "-".join(parts)

    @property
    def baselines(self) -> tuple[str, ...]:
        names = self.suite.baselines[self.device]
        return tuple(n for n in names if HAS_LIGER or not n.startswith("liger"))


def params(kernel: str) -> list:
    out = []
    for device, shapes in SUITES[kernel].shapes.items():
        skip = [pytest.mark.skip(reason="CUDA shapes need a GPU")] if device == "cuda" and not HAS_CUDA else []
        for shape in shapes:
            for mode in SUITES[kernel].modes:
                case = Case(kernel, device, shape, mode)
                out.append(pytest.param(case, id=f"{kernel}-{device}-{case.label}-{mode}", marks=skip))
    return out


def _timed(setup, target, device) -> float:
    args, kwargs = setup() if setup else ((), {})
    sync(torch.device(device))
    start = time.perf_counter()
    target(*args, **kwargs)  # the target waits for the device itself (mode_fns)
    return time.perf_counter() - start


def _drop_if_out_of_memory(fns: dict, case: Case) -> dict[str, str]:
    """One call of each baseline; those that do not fit the GPU (eager torch materialises the [N, V] logits
    several times over) leave the comparison instead of failing the test."""
    dropped = {}
    for name in [n for n in fns if n != OURS]:
        try:
            _timed(*fns[name], case.device)
        except torch.cuda.OutOfMemoryError:
            del fns[name]
            dropped[name] = "out of GPU memory"
            torch.cuda.empty_cache()
    return dropped


def run_case(benchmark, peak_memory, summary, case: Case) -> None:
    suite, device = case.suite, case.device
    impls = build_all(case.kernel, (OURS, *case.baselines), case.shape, device)
    fns = {name: mode_fns(impl, case.mode, device) for name, impl in impls.items()}
    dropped = _drop_if_out_of_memory(fns, case) if device == "cuda" else {}
    our_setup, our_target = fns.pop(OURS)
    times = {name: [] for name in (OURS, *fns)}  # ours first, for the reports
    calls = itertools.count()

    def setup():
        # One round of each baseline before each of our rounds; warm-up rounds are not recorded.
        record = next(calls) >= suite.warmup
        for name, (base_setup, base_target) in fns.items():
            seconds = _timed(base_setup, base_target, device)
            if record:
                times[name].append(seconds)
        return our_setup() if our_setup else None

    benchmark.group = f"{case.kernel} {device} {case.label} {case.mode}"
    info = benchmark.extra_info
    info.update(kernel=case.kernel, mode=case.mode, shape=case.shape, device=device_name(torch.device(device)))
    info.update(backend=select_backend(torch.device(device), None), dropped=dropped)
    benchmark.pedantic(our_target, setup=setup, rounds=suite.rounds[device], warmup_rounds=suite.warmup)
    if benchmark.stats is None:  # --benchmark-disable: one untimed call, nothing to report
        return
    times[OURS] = list(benchmark.stats.stats.data)
    memory = {name: peak_memory(case, name, impls[name]) for name in times if name != FLOOR}
    info.update(summarise(case, times, memory))
    ratios = ", ".join(f"{name} {ratio(info[f'time_vs_{name}'])}" for name in times if name != OURS)
    figures = "; ".join(f"{name} {figure(row)}" for name, row in info["impls"].items())
    summary.append(f"{benchmark.group}: ours / {ratios} ({figures})")


def summarise(case: Case, times: dict[str, list[float]], memory: dict[str, int]) -> dict:
    """The per-implementation figures and our ratios, from the rounds of this one test."""
    best = {name: min(ts) for name, ts in times.items()}
    out = {"impls": {}}
    for name, ts in times.items():
        row = {"min_s": best[name], "median_s": statistics.median(ts)}
        if name in memory:
            row["peak_mem_mib"] = round(memory[name] / 2**20, 2)
        if case.suite.bytes_moved is not None:
            row["gb_per_s"] = round(case.suite.bytes_moved(case.shape, case.mode) / best[name] / 1e9, 2)
        if FLOOR in best:
            row["x_gemm_floor"] = round(best[name] / best[FLOOR], 4)
        out["impls"][name] = row
    for name in times:
        if name != OURS:
            out[f"time_vs_{name}"] = round(best[OURS] / best[name], 4)
    return out


@pytest.mark.parametrize("case", [p for kernel in SUITES for p in params(kernel)])
def test_kernel(benchmark, peak_memory, summary, case):
    run_case(benchmark, peak_memory, summary, case)
