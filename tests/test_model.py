"""Loading the policy: a tiny Qwen2 and a tokenizer made in the test, control tokens added, hidden states path."""

import sys

import pytest
import tiny
import torch

from thinkless.train.config import load_config
from thinkless.train.model import (
    CONTROL_TOKENS,
    ModelError,
    control_token_ids,
    hidden_states,
    lm_head,
    load_model,
    load_tokenizer,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tok = tiny.make_tokenizer(folder)  # no control tokens: loading must add them
    return tiny.make_model(folder, tok)


def test_control_tokens_are_added_as_single_tokens(checkpoint):
    tokenizer = load_tokenizer(str(checkpoint))
    ids = control_token_ids(tokenizer)
    assert len(set(ids.values())) == 3
    for token in CONTROL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [ids[token]]
    text = "<think>so</think> \\boxed{2}"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False), skip_special_tokens=True) == text
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None

    model = load_model(str(checkpoint), tokenizer, load_config(), torch.device("cpu"))
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    assert next(model.parameters()).dtype == torch.float32  # fp32 on CPU
    assert model.training


def test_hidden_states_feed_the_lm_head(checkpoint):
    tokenizer = load_tokenizer(str(checkpoint))
    model = load_model(str(checkpoint), tokenizer, load_config(), torch.device("cpu"), trainable=False)
    batch = tokenizer(["1+1=", "a longer prompt here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        h = hidden_states(model, batch["input_ids"], batch["attention_mask"])
        logits = model(**batch).logits
    weight, bias = lm_head(model)
    assert bias is None
    torch.testing.assert_close(h @ weight.T, logits, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())


def test_missing_model_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"model.path='.*nowhere': no such folder"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="model.path is not set"):
        load_tokenizer("")
    with pytest.raises(ModelError, match="model.dtype must be auto or one of"):
        resolve_dtype("fp8", torch.device("cpu"))


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_liger_patches_swap_the_layers_of_qwen2_and_llama(kind, monkeypatch):
    """The instance patches applied on CUDA (RoPE is a module-level patch: left out here, it would reach the other
    CPU tests of this process)."""
    pytest.importorskip("liger_kernel")
    import transformers
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    from thinkless.train.model import apply_liger

    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[kind]  # fmt: skip
    config = cls[0](vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)  # fmt: skip
    model = cls[1](config)
    # Liger also swaps the classes in transformers' modeling module (for models built later): undo that after the
    # test, or the other CPU tests of this process would build Liger's Triton layers.
    module = sys.modules[cls[1].__module__]
    for name, value in list(vars(module).items()):
        monkeypatch.setattr(module, name, value)
    assert apply_liger(model, rope=False)
    # Liger binds its forwards to the existing modules (the weights stay where they are).
    layers = model.model.layers
    for norm in (model.model.norm, layers[0].input_layernorm, layers[1].post_attention_layernorm):
        assert norm.forward.__func__ is LigerRMSNorm.forward
    assert all(layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward for layer in model.model.layers)
