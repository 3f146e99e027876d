"""Compile every Triton kernel ahead of time for real GPUs, on a machine that has none.

The Triton interpreter runs the kernels in numpy and accepts code that the GPU compiler rejects, so the tests
also build each kernel for sm_80 (A100) and sm_90a (H100/H200) with `triton.compile`, then read the cubin's
registers, stack and local memory (spills) with the `cuobjdump` that ships inside the triton wheel.

    python -m thinkless.kernels._compile_check          # prints one JSON line per kernel variant and arch

Run it without TRITON_INTERPRET=1: under the interpreter `triton.jit` gives no compilable function.
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ARCHS = (80, 90)


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int


def _variants() -> list[Variant]:
    import triton.language as tl

    from thinkless.kernels import _config

    # import_module, not `from thinkless.kernels import ...`: the package re-exports functions of the same names.
    advantages = importlib.import_module("thinkless.kernels.advantages")
    degrpo = importlib.import_module("thinkless.kernels.degrpo_triton")

    out = [
        Variant(
            f"group_advantages[{dtype},normalize_std={std}]",
            advantages._group_advantages_kernel,
            {
                "rewards_ptr": f"*{dtype}",
                "order_ptr": "*i64",
                "starts_ptr": "*i64",
                "counts_ptr": "*i64",
                "out_ptr": "*fp32",
                "eps": "fp32",
                "NORMALIZE_STD": "constexpr",
                "BLOCK": "constexpr",
            },
            {"NORMALIZE_STD": std, "BLOCK": _config.GROUP_ADVANTAGES.block},
            _config.GROUP_ADVANTAGES.num_warps,
        )
        for dtype in ("fp32", "fp64")
        for std in (False, True)
    ]
    out.append(
        Variant(
            "first_response",
            degrpo._first_response_kernel,
            {"mask_ptr": "*u8", "first_ptr": "*i32", "T": "i32", "stride_mask": "i32", "BLOCK": "constexpr"},
            {"BLOCK": _config.FIRST_RESPONSE.block},
            _config.FIRST_RESPONSE.num_warps,
        )
    )
    # Every feature switch of the loss kernels, in fp32, bf16 and fp64 log-probs.
    row_strides = ["stride_logp", "stride_old", "stride_adv_b", "stride_adv_t", "stride_resp", "stride_ref"]
    strides = {name: "i32" for name in [*row_strides, "stride_ctrl"]}
    strides["stride_tw"] = "i32"
    options = {name: "fp32" for name in ("lower_hi", "lower_lo", "upper_hi", "upper_lo", "kl_clamp_hi", "kl_clamp_lo")}
    for dtype in ("fp32", "bf16", "fp64"):
        compute = tl.float64 if dtype == "fp64" else tl.float32
        # kl_type 0: no reference log-probs
        for kl_type, has_control, has_weights in itertools.product((0, 1, 2, 3), (False, True), (False, True)):
            tokens = {
                "logp_ptr": f"*{dtype}",
                "old_ptr": f"*{dtype}",
                "adv_ptr": "*fp32",
                "resp_ptr": "*u8",
                "ref_ptr": f"*{dtype}",
                "ctrl_ptr": "*u8",
                "first_ptr": "*i32",
                "tw_ptr": "*fp64" if dtype == "fp64" else "*fp32",
            }
            flags = {"HAS_CONTROL_MASK": has_control, "HAS_TOKEN_WEIGHTS": has_weights, "KL_TYPE": max(kl_type, 1)}
            tag = f"{dtype},kl={kl_type},control_mask={has_control},token_weights={has_weights}"
            fwd = {**tokens, "stats_ptr": "*fp64", "T": "i32", "n_blocks": "i32", **strides, **options}
            fwd_flags = {"HAS_REF": kl_type > 0, **flags, "NUM_STATS": degrpo.NUM_STATS, "COMPUTE": compute}
            fwd_flags["BLOCK"] = _config.DEGRPO_LOSS.block
            out.append(
                Variant(
                    f"degrpo_fwd[{tag}]",
                    degrpo._degrpo_fwd_kernel,
                    {**fwd, **{k: "constexpr" for k in fwd_flags}},
                    fwd_flags,
                    _config.DEGRPO_LOSS.num_warps,
                )
            )
            weights = "*fp64" if dtype == "fp64" else "*fp32"
            bwd = {"dlogp_ptr": f"*{dtype}", **tokens, "weights_ptr": weights, "T": "i32"}
            bwd.update({"stride_dlogp": "i32", **strides, **options})
            bwd_flags = {"HAS_KL": kl_type > 0, **flags, "COMPUTE": compute, "BLOCK": _config.DEGRPO_LOSS.block}
            out.append(
                Variant(
                    f"degrpo_bwd[{tag}]",
                    degrpo._degrpo_bwd_kernel,
                    {**bwd, **{k: "constexpr" for k in bwd_flags}},
                    bwd_flags,
                    _config.DEGRPO_LOSS.num_warps,
                )
            )
    # Fused linear loss row kernels: logits in fp32, bf16 or fp64 (their compute dtype fp32, fp32, fp64).
    rows = importlib.import_module("thinkless.kernels.fused_linear_rows")
    temperature = {"inv_temp_hi": "fp32", "inv_temp_lo": "fp32"}  # 1 / temperature as two fp32 halves
    for dtype in ("fp32", "bf16", "fp64"):
        compute, acc = (tl.float64, "fp64") if dtype == "fp64" else (tl.float32, "fp32")
        for entropy in (False, True):
            stats = {"logits_ptr": f"*{dtype}", "target_ptr": "*i64", "lse_ptr": f"*{acc}", "logp_ptr": f"*{acc}"}
            stats.update({"entropy_ptr": f"*{acc}", "V": "i32", "stride_row": "i64", **temperature})
            flags = {"HAS_ENTROPY": entropy, "COMPUTE": compute, "BLOCK_V": _config.ROW_STATS.block}
            out.append(
                Variant(
                    f"row_stats[{dtype},entropy={entropy}]",
                    rows._row_stats_kernel,
                    {**stats, **{k: "constexpr" for k in flags}},
                    flags,
                    _config.ROW_STATS.num_warps,
                )
            )
        grad = {"logits_ptr": f"*{dtype}", "target_ptr": "*i64", "lse_ptr": f"*{acc}", "grad_ptr": f"*{acc}"}
        grad.update({"entropy_ptr": f"*{acc}", "entropy_grad_ptr": f"*{acc}"})
        grad.update({"V": "i32", "stride_row": "i64", **temperature})
        for entropy_grad in (False, True):
            flags = {"HAS_ENTROPY_GRAD": entropy_grad, "COMPUTE": compute, "BLOCK_V": _config.ROW_GRAD.block}
            out.append(
                Variant(
                    f"row_grad[{dtype},entropy_grad={entropy_grad}]",
                    rows._row_grad_kernel,
                    {**grad, **{k: "constexpr" for k in flags}},
                    flags,
                    _config.ROW_GRAD.num_warps,
                )
            )
    return out


def _all_kernels() -> set[str]:
    """Every `*_kernel` Triton function defined in thinkless.kernels, so that a new one cannot go unchecked."""
    import pkgutil

    from triton.runtime.jit import JITFunction

    import thinkless.kernels as package

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel") and obj.__module__ == module.__name__:
                found.add(f"{module.__name__}.{name}")
    return found


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key.lower(): int(value) for key, value in usage.items()}


def compile_all(archs=ARCHS) -> list[dict]:
    """Compile every variant for every arch; one dict per build with registers, spills and shared memory."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    variants = _variants()
    covered = {f"{v.kernel.__module__}.{v.kernel.__name__}" for v in variants}
    results = [
        {"kernel": name, "arch": "-", "ok": False, "error": "no variant in _compile_check._variants()"}
        for name in sorted(_all_kernels() - covered)
    ]
    for v in variants:
        for arch in archs:
            row = {"kernel": v.name, "arch": f"sm_{arch}{'a' if arch == 90 else ''}"}
            try:
                src = ASTSource(v.kernel, v.signature, v.constexprs)
                k = compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": v.num_warps})
                row.update(_resource_usage(k.asm["cubin"]), shared_bytes=k.metadata.shared, ok=True)
                row["ptx_target"] = re.search(r"\.target\s+(\S+)", k.asm["ptx"]).group(1)
            except Exception as err:  # reported, and failed on, by the caller
                row.update(ok=False, error=f"{type(err).__name__}: {err}")
            results.append(row)
    return results


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter gives no compilable kernels", file=sys.stderr)
        return 2
    results = compile_all()
    for row in results:
        print(json.dumps(row))
    return 0 if all(r["ok"] and r.get("local", 0) == 0 and r.get("stack", 0) == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
