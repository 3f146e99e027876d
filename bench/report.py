"""The markdown table of bench/RESULTS.md, from the JSON of one `pytest bench/` run.

    pytest bench/ --benchmark-json=out.json && python bench/report.py out.json

One row per kernel, device, shape and mode. Each implementation's cell: its best time, then its time over the
GEMM floor (lm_head kernels) or its achieved GB/s (memory-bound kernels); then our time over each baseline's, all
from the same test's interleaved rounds; then peak memory per implementation.
"""

from __future__ import annotations

import argparse
import json

NAMES = {
    "thinkless": "thinkless",
    "thinkless_big_chunks": "thinkless, 2H-row chunks",
    "torch": "eager torch",
    "liger": "Liger",
    "liger_triton": "Liger Triton loss",
}


def ratio(x: float) -> str:
    """Two decimals, or two significant digits below 0.01 (a backward that only scales stored gradients)."""
    return f"{x:.2f}" if x >= 0.01 else f"{x:.2g}"


def mib(m: float | None) -> str:
    return "–" if m is None else f"{m:.0f}" if m >= 10 else f"{m:.2g}"


def figure(row: dict) -> str:
    """`1.05 s, 1.09× floor` or `3.02 ms, 45.1 GB/s`."""
    seconds = row["min_s"]
    time_text = f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"
    if "x_gemm_floor" in row:
        return f"{time_text}, {ratio(row['x_gemm_floor'])}× floor"
    if "gb_per_s" in row:
        return f"{time_text}, {row['gb_per_s']:.1f} GB/s"
    return time_text


def rows(benchmarks: list[dict]):
    """(kernel, device, shape label, mode, extra_info) of every benchmark that ran, in run order."""
    for bench in benchmarks:
        info = bench["extra_info"]
        if "impls" in info:
            _, device, label, mode = bench["group"].split(" ")
            yield info["kernel"], device, label, mode, info


def table(benchmarks: list[dict]) -> str:
    found = list(rows(benchmarks))
    impls = [name for name in NAMES if any(name in info["impls"] for *_, info in found)]
    baselines = [name for name in impls if name != "thinkless"]
    head = ["kernel", "shape", "mode", *(NAMES[n] for n in impls), *(f"thinkless ÷ {NAMES[n]}" for n in baselines)]
    head.append("peak MiB, " + " / ".join(NAMES[n] for n in impls))
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for kernel, device, label, mode, info in found:
        cells = [f"`{kernel}`", f"{device} {label}", mode]
        cells += [figure(info["impls"][n]) if n in info["impls"] else "–" for n in impls]
        cells += [f"**{ratio(info[f'time_vs_{n}'])}**" if f"time_vs_{n}" in info else "–" for n in baselines]
        cells.append(" / ".join(mib(info["impls"].get(n, {}).get("peak_mem_mib")) for n in impls))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(data: dict) -> str:
    machine, packages = data["machine_info"], data["machine_info"].get("packages", {})
    versions = ", ".join(f"{name} {v}" for name, v in packages.items() if v)
    devices = "; ".join(machine[key] for key in ("cpu_device", "cuda_device") if key in machine)
    # The CPU backend is cpp only while thinkless._C is built: a run on the torch fallback says so here.
    backends = sorted({f"{info['backend']} on {device}" for _, device, _, _, info in rows(data["benchmarks"])})
    when = data["datetime"][:16].replace("T", " ")
    load = data.get("load_average_1_5_15_min", {})
    loads = ", ".join(f"{k} {v[0]:.2f}" for k, v in load.items() if v)
    text = f"Run finished {when} UTC on {devices}; {versions}; thinkless backend {', '.join(backends)}"
    return text + (f"; 1-minute load average at {loads}." if loads else ".")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="the file written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    print(header(data))
    print()
    print(table(data["benchmarks"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
