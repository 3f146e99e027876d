"""The native CPU kernels (thinkless._C) against the torch code they replace, in one process.

    python bench/native_cpu.py

Each line: the best of several runs of the `cpp` backend and of the `torch` backend on the same inputs.
"""

from __future__ import annotations

import time

import torch

from thinkless.kernels import degrpo_loss, group_advantages
from thinkless.kernels._backend import native_extension
from thinkless.kernels.fused_linear_loop import exp_shifted_


def best_of(fn, rounds: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def loss_step(backend, logp, old, adv, mask, ref):
    def run():
        x = logp.detach().requires_grad_(True)
        loss, _ = degrpo_loss(x, old, adv, mask, ref_logp=ref, kl_coef=1e-3, backend=backend)
        loss.backward()

    return run


def row_work_torch(zs, targets, g):
    """The torch row work of the fused linear loss on one chunk stored [V, n], as its torch path does it:
    logsumexp, target logit, entropy, then dlogits = g (onehot - softmax) in place."""
    z = zs.t()
    m = zs.amax(0)
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    ssum, sz = exp_shifted_(zs.sub_(m), True)
    log_s = ssum.log()
    lse, entropy = m + log_s, log_s - sz / ssum
    zs.mul_(-g / ssum)
    z[torch.arange(len(targets)), targets] += g
    return lse, z_target - lse, entropy


def row_work_native(zs, targets, g):
    z = zs.t()
    lse, logp, entropy = torch.ops.thinkless.row_stats(z, targets, 1.0, True)
    torch.ops.thinkless.row_grad_(z, targets, lse, g, 1.0, None, None)
    return lse, logp, entropy


def main() -> int:
    if native_extension() is None:
        raise SystemExit("thinkless._C is not built; install with `pip install --no-build-isolation .`")
    gen = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'kernel':46} {'cpp ms':>8} {'torch ms':>9} {'speed-up':>9}")

    rewards, ids = torch.rand(8192, generator=gen), torch.arange(8192) // 8
    for std in (False, True):
        cpp = best_of(lambda std=std: group_advantages(rewards, ids, normalize_std=std, backend="cpp"))
        ref = best_of(lambda std=std: group_advantages(rewards, ids, normalize_std=std, backend="torch"))
        print(f"{f'group_advantages N=8192 G=8 std={std}':46} {cpp * 1e3:8.2f} {ref * 1e3:9.2f} {ref / cpp:8.1f}x")

    B, T = 64, 4096
    logp = -torch.rand(B, T, generator=gen) * 3
    old, ref = logp + 0.1 * torch.randn(B, T, generator=gen), logp + 0.1 * torch.randn(B, T, generator=gen)
    adv, mask = torch.randn(B, generator=gen), torch.rand(B, T, generator=gen) > 0.2
    cpp = best_of(loss_step("cpp", logp, old, adv, mask, ref))
    tor = best_of(loss_step("torch", logp, old, adv, mask, ref))
    print(f"{f'degrpo_loss fwd+bwd B={B} T={T} (k3 KL)':46} {cpp * 1e3:8.2f} {tor * 1e3:9.2f} {tor / cpp:8.1f}x")

    n, V = 384, 32000
    src = torch.randn(V, n, generator=gen)
    targets, g = torch.randint(0, V, (n,), generator=gen), torch.randn(n, generator=gen)
    buf = torch.empty_like(src)
    cpp = best_of(lambda: (buf.copy_(src), row_work_native(buf, targets, g)))
    tor = best_of(lambda: (buf.copy_(src), row_work_torch(buf, targets, g)))
    copy = best_of(lambda: buf.copy_(src))
    cpp, tor = cpp - copy, tor - copy
    print(f"{f'row work, fused linear, one chunk n={n} V={V}':46} {cpp * 1e3:8.2f} {tor * 1e3:9.2f} {tor / cpp:8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
