"""The policy: a Hugging Face causal LM and its tokenizer, with the control tokens, on the right device and dtype.

- `model.path` is a local folder or a hub id (AutoModelForCausalLM / AutoTokenizer).
- `<short>`, `<think>` and `</think>` are added as single tokens when the tokenizer lacks them, and the embeddings
  are resized. They are plain added tokens, not special ones, so that decoding keeps them in the text.
- dtype: bf16 on GPU, fp32 on CPU (`model.dtype` overrides). Attention: flash_attention_2 when flash-attn is
  installed and CUDA is present, else SDPA. Liger-Kernel patches (RMSNorm, RoPE, SwiGLU) on CUDA when installed.
- The loss never asks the model for logits: `hidden_states` runs the decoder alone, and the lm_head weight goes to
  the fused kernels.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from thinkless.modes import ADDED_TOKENS

if TYPE_CHECKING:
    from thinkless.train.config import Config


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded: the CLI prints it as one line, without a traceback."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"trainer.device={name!r}, but torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in dtypes:
        raise ModelError(f"model.dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def attention_implementation(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def check_model_path(path: str, what: str = "model.path") -> None:
    if not path:
        raise ModelError(f"{what} is not set: give a local folder or a hub id, e.g. {what}=Qwen/Qwen2.5-1.5B")
    # A hub id is "name" or "org/name"; anything else (./x, /abs/path, a/b/c) is a local folder.
    local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)
    if local and not Path(path).expanduser().is_dir():
        raise ModelError(f"{what}={path!r}: no such folder")


def load_tokenizer(path: str):
    """The tokenizer, with the control tokens, a pad token and left padding (for batched generation)."""
    from transformers import AddedToken

    check_model_path(path, "model.path")
    tokenizer = checked_tokenizer(path, "model.path")
    missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    for token in ADDED_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ModelError(f"the tokenizer of {path!r} splits {token!r} into {len(ids)} tokens; it must be one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def checked_tokenizer(path: str, what: str):
    """AutoTokenizer of `path`, or a ModelError naming `what`. transformers builds an empty tokenizer from a model
    folder that has none (every text then encodes to nothing): that is refused, as is one that encodes nothing."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        names = ", ".join(TOKENIZER_FILES)
        raise ModelError(f"{what}={path!r}: cannot load a tokenizer: the folder has none ({names})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{what}={path!r}: cannot load a tokenizer: {first}") from None
    if not tokenizer("1 + 1 = 2", add_special_tokens=False)["input_ids"]:
        raise ModelError(f"{what}={path!r}: its tokenizer encodes text to nothing (an empty vocabulary?)")
    return tokenizer


def control_token_ids(tokenizer) -> dict[str, int]:
    return {token: tokenizer.convert_tokens_to_ids(token) for token in ADDED_TOKENS}


def text_decoder(tokenizer):
    """The text of generated token ids, by one rule for every model that generates (the policy's rollouts, the
    distillation teachers): the tokens the tokenizer flags special are left out (eos, pad, a chat template's markers:
    what `skip_special_tokens=True` leaves out), except the Thinkless tokens (`modes.ADDED_TOKENS`), which a
    tokenizer may flag special (an R1-style `<think>`) and which the reward reads (`</think>` opens a think answer's
    solution). Returns `decode(ids) -> str`; the token sets are built once, here (call it once per batch)."""
    thinkless = control_token_ids(tokenizer)  # (a teacher's tokenizer may lack some: no id, or the unknown token's)
    keep = {i for t, i in thinkless.items() if i is not None and tokenizer.convert_ids_to_tokens(i) == t}
    added = getattr(tokenizer, "added_tokens_decoder", None)
    special = (
        {i for i, token in added.items() if token.special} if added is not None else set(tokenizer.all_special_ids)
    )
    drop = special - keep

    def decode(ids: list[int]) -> str:
        return tokenizer.decode([t for t in ids if t not in drop], skip_special_tokens=False)

    return decode


def load_model(
    path: str, tokenizer, config: Config, device: torch.device, *, trainable: bool = True, what="model.path"
):
    """AutoModelForCausalLM from `path`, embeddings resized to the tokenizer, on `device`, per `config.model`."""
    from transformers import AutoModelForCausalLM

    check_model_path(path, what)
    dtype = resolve_dtype(config.model.dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=attention_implementation(config.model.attn_implementation, device)
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"{what}={path!r}: cannot load a causal LM: {err}") from None
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if device.type == "cuda" and config.model.liger and importlib.util.find_spec("liger_kernel") is not None:
        apply_liger(model)
    if trainable:
        model.train()
        if config.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    else:
        model.eval().requires_grad_(False)
    return model


def apply_liger(model, *, rope: bool = True) -> bool:
    """Liger-Kernel's layer patches (RMSNorm, RoPE, SwiGLU) on this model instance; False if Liger does not know
    its architecture. The losses are ours, so Liger's (fused linear) cross-entropy stays off. Qwen2 and Llama go
    through their own entry points; other architectures through Liger's dispatch by model type.

    Liger also rebinds names in transformers' modeling module, for every model of the process: the layer classes
    (this instance's layers are patched in place and need them no more) go back to transformers' own, and a
    function (RoPE, looked up by the attention at call time) dispatches: Liger's Triton kernel on CUDA tensors,
    transformers' own otherwise. A CPU model built later in the same process (a test, an eval on CPU) then runs."""
    import liger_kernel.transformers as liger

    module = sys.modules[type(model).__module__]
    before = dict(vars(module))
    patches = {"qwen2": liger.apply_liger_kernel_to_qwen2, "llama": liger.apply_liger_kernel_to_llama}
    kind = getattr(model.config, "model_type", "")
    options = dict(rope=rope, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    try:
        if kind in patches:
            patches[kind](model=model, **options)
        else:
            try:
                liger._apply_liger_kernel_to_instance(model=model, **options)
            except (ValueError, NotImplementedError, TypeError):  # an architecture Liger has no patch for
                return False
    finally:
        for name, value in list(vars(module).items()):
            old = before.get(name)
            if old is None or old is value:
                continue
            if isinstance(old, type):
                setattr(module, name, old)
            elif callable(value):
                setattr(module, name, _on_cuda(value, getattr(old, "_thinkless_default", old)))
    return True


def _on_cuda(fast, default):
    """`fast` when the first tensor argument is on CUDA, else `default` (the function it replaced)."""

    @functools.wraps(default)
    def dispatch(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        return (fast if first is not None and first.is_cuda else default)(*args, **kwargs)

    dispatch._thinkless_default = default  # a second patch wraps the original again, not this wrapper
    return dispatch


def hidden_states(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T, H] final hidden states (after the last norm), the input of the lm_head; no logits are formed.

    Padded rows: give `attention_mask`; positions count real tokens only, as `generate` counts them for
    left-padded prompts. Packed rows (`thinkless.train.packing`): no mask, and `position_ids` that restart at
    each sequence, from which `transformers` builds the block-diagonal mask (or flash-attn's varlen call)."""
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # The whole model runs (its lm_head on the last position only, `logits_to_keep=1`) and the decoder's output is
    # taken on the way: FSDP2 gathers the outer parameters (embeddings, norm, lm_head) in the root module's forward,
    # so calling the decoder alone would leave them sharded. Read the lm_head weight after this call.
    captured = []
    handle = model.get_decoder().register_forward_hook(lambda module, args, out: captured.append(out[0]))
    try:
        model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            logits_to_keep=1,
        )  # fmt: skip
    finally:
        handle.remove()
    return captured[-1]


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
