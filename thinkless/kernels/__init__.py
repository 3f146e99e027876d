"""thinkless kernels: group advantages, the DeGRPO loss and its fused lm_head form; Triton, native C++ or torch.

Every public function checks its inputs, then dispatches on the device of its tensors: CUDA goes to Triton, CPU
to the compiled extension when it is built and to the torch reference otherwise. `THINKLESS_BACKEND` or the
`backend=` argument forces one. `reference` holds the readable PyTorch ground truth.
"""

import importlib as _importlib
import sys as _sys
import types as _types

# Where each public name lives. Loaded on first use (PEP 562): the settings' schema reads `DeGRPOParams` from
# `degrpo_weights` alone, and `thinkless-train --help` should not load Triton and every kernel for that.
_HOMES = {
    "reference": None,
    "BACKENDS": "_backend",
    "select_backend": "_backend",
    "group_advantages": "advantages",
    "degrpo_loss": "degrpo_loss",
    "DeGRPOParams": "degrpo_weights",
    "Normalizers": "degrpo_weights",
    "sequence_token_weights": "degrpo_weights",
    "fused_linear_cross_entropy": "fused_linear",
    "fused_linear_degrpo_loss": "fused_linear",
    "token_logprobs": "fused_linear",
}


def __getattr__(name: str):
    if name not in _HOMES:  # a submodule (thinkless.kernels.fused_linear), as when the package imported them all
        try:
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    home = _HOMES[name]
    value = _importlib.import_module(f"{__name__}.{home or name}")
    if home is not None:
        value = getattr(value, name)
    globals()[name] = value  # looked up once
    return value


class _Package(_types.ModuleType):
    """`degrpo_loss` names a submodule and the function it defines. Importing the submodule binds the module on
    the package (the import system's setattr), which would hide the function from then on: bind the function."""

    def __setattr__(self, name, value):
        if isinstance(value, _types.ModuleType) and _HOMES.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "BACKENDS",
    "DeGRPOParams",
    "Normalizers",
    "degrpo_loss",
    "fused_linear_cross_entropy",
    "fused_linear_degrpo_loss",
    "group_advantages",
    "reference",
    "select_backend",
    "sequence_token_weights",
    "token_logprobs",
]
