"""Where a bf16 lm_head's dW error comes from: the fused loss against eager torch bf16 and the bf16 rounding floor.

    python bench/diagnose_bf16_dw.py                         # on a GPU (V = 5003 and 151936)
    DIAG_DEVICE=cpu DIAG_V=503 python bench/diagnose_bf16_dw.py

The inputs of tests/test_cuda.py::test_fused_loss_bf16_no_worse_than_torch_bf16 (4 x 60 tokens, KL k3, a bias,
temperature 0.6, bf16 values), dW's relative error against float64 arithmetic on the same bf16 values, over all
vocabulary rows, the rows of target tokens and the others. Rows: the float64 truth rounded to bf16 (the floor),
eager torch in bf16, the fused loss (Triton row work on a bf16 logits buffer) at two chunk sizes, its torch row work
(which runs its GEMMs in fp32), and fp32 inputs. Run from the repository root (it imports the tests' inputs).
"""

import os
import sys

import torch

sys.path.insert(0, "tests")
import cases  # noqa: E402
from test_fused_linear import OPTIONS, _inputs, _run  # noqa: E402

from thinkless.kernels import fused_linear_degrpo_loss, reference  # noqa: E402

DEVICE = torch.device(os.environ.get("DIAG_DEVICE", "cuda"))


def main() -> None:
    opts = OPTIONS["kl_k3_bias_t0.6"]
    on = lambda d: tuple(x.to(DEVICE) if isinstance(x, torch.Tensor) else x for x in d)  # noqa: E731
    for V in [int(v) for v in os.environ.get("DIAG_V", "5003,151936").split(",")]:
        data = _inputs(4, 60, V, seed=V, kl=True, bias=True)
        data = tuple(x.to(torch.bfloat16).double() if i < 3 else x for i, x in enumerate(data))
        _, _, truth = _run(reference.fused_linear_degrpo_loss, *data, torch.float64, opts)
        rows = {"truth_rounded": truth[1].to(torch.bfloat16)}
        rows["torch_bf16"] = _run(reference.fused_linear_degrpo_loss, *on(data), torch.bfloat16, opts)[2][1].cpu()
        variants = {"ours_c50": dict(chunk_size=50), "ours_c240": dict(chunk_size=240),
                    "ours_torchrows_c50": dict(chunk_size=50, backend="torch")}  # fmt: skip
        for name, kw in variants.items():
            rows[name] = _run(fused_linear_degrpo_loss, *on(data), torch.bfloat16, opts, **kw)[2][1].cpu()
        rows["ours_fp32_inputs"] = _run(fused_linear_degrpo_loss, *on(data), torch.float32, opts, chunk_size=50)[2][1]
        targets = data[3].flatten()[data[6].flatten().bool()].unique()
        tm = torch.zeros(V, dtype=torch.bool)
        tm[targets] = True
        t = truth[1]
        for name, g in rows.items():
            g = g.cpu()
            print(f"V={V} {name:20s} all {cases.rel_err(g, t):.4f}  target rows {cases.rel_err(g[tm], t[tm]):.4f}  "
                  f"other rows {cases.rel_err(g[~tm], t[~tm]):.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
