"""Loading the policy: a tiny Qwen2 and a tokenizer made in the test, control tokens added, hidden states path."""

import sys

import pytest
import tiny
import torch

from thinkless.modes import ADDED_TOKENS
from thinkless.train.config import load_config
from thinkless.train.model import (
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
    for token in ADDED_TOKENS:
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
def test_liger_patches_this_instance_and_leaves_cpu_models_working(kind, monkeypatch):
    """The instance patches applied on CUDA. Liger's module-level rebinding is undone (classes) or made to dispatch
    by device (RoPE), so that a CPU model built or run later in the process gives exactly what it gave before."""
    pytest.importorskip("liger_kernel")
    import transformers
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    from thinkless.train.model import _on_cuda, apply_liger

    cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[kind]  # fmt: skip
    config = cls[0](vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    model, bystander = cls[1](config), cls[1](config)
    module = sys.modules[cls[1].__module__]
    for name, value in list(vars(module).items()):  # whatever this test leaves behind is undone after it
        monkeypatch.setattr(module, name, value)
    originals = dict(vars(module))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = bystander(ids).logits
    for _ in range(2):  # a second patch (the reference model, the rollout copy) wraps the original again
        assert apply_liger(model)
    # Liger binds its forwards to the existing modules (the weights stay where they are).
    layers = model.model.layers
    for norm in (model.model.norm, layers[0].input_layernorm, layers[1].post_attention_layernorm):
        assert norm.forward.__func__ is LigerRMSNorm.forward
    assert all(layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward for layer in model.model.layers)
    # The module: transformers' classes back; RoPE a dispatcher over Liger's kernel and the original function.
    changed = {n for n, v in vars(module).items() if originals.get(n) is not v}
    assert changed == {"apply_rotary_pos_emb"}
    rope = module.apply_rotary_pos_emb
    assert rope._thinkless_default is originals["apply_rotary_pos_emb"]
    q, k, cos, sin = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 9, 8), torch.randn(1, 9, 8)
    for got, want in zip(rope(q, k, cos, sin), originals["apply_rotary_pos_emb"](q, k, cos, sin), strict=True):
        assert torch.equal(got, want)  # CPU tensors: transformers' function

    class OnCuda(torch.Tensor):  # reports CUDA: which function the dispatcher picks, without a GPU
        is_cuda = property(lambda self: True)

    picked = []
    dispatch = _on_cuda(lambda *a: picked.append("fast"), lambda *a: picked.append("default"))
    dispatch(q, k)
    dispatch(torch.Tensor._make_subclass(OnCuda, q), k)
    assert picked == ["default", "fast"]
    assert liger_rotary_pos_emb is not rope
    with torch.no_grad():
        assert torch.equal(bystander(ids).logits, expected)  # a CPU model untouched by the patch
        assert cls[1](config).model.norm.__class__ is originals[type(bystander.model.norm).__name__]


def test_a_missing_gguf_file_is_named(tmp_path):
    """model.path=<file>.gguf is converted (tests/test_real_components.py); a wrong path is one clear error."""
    from thinkless.train.model import ModelError
    from thinkless.train.run import resolve_model_path

    with pytest.raises(ModelError, match=r"model.path='.*nope.gguf': no such GGUF file"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("how", ["additional_special_tokens", "added_special"])
def test_one_decode_rule_keeps_the_thinkless_tokens_a_tokenizer_marks_special(tmp_path, how):
    """Rollouts and distillation teachers decode generated ids by one rule: special tokens out (eos, pad, template
    markers, other special added tokens), the Thinkless tokens in even when the tokenizer marks them special (the
    reward reads the answer after </think>)."""
    from transformers import AddedToken

    from thinkless.train.distill_teacher import decode_response
    from thinkless.train.model import text_decoder
    from thinkless.train.rewards import solution_text
    from thinkless.train.rollout import assemble

    tok = tiny.make_tokenizer(tmp_path / "tok", with_control_tokens=how == "additional_special_tokens")
    tok.add_tokens([AddedToken("<|tool|>", special=True, normalized=False)])
    if how == "added_special":
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<short>", "<think>", "</think>")])
    ids = tok.encode("<think>7 + 5 = 12</think> so \\boxed{12}<|tool|><|im_start|>", add_special_tokens=False)
    ids += [tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(ids, skip_special_tokens=True).count("think") == 0  # the rule it replaces lost them
    decode = text_decoder(tok)
    text = decode(ids)
    assert text == "<think>7 + 5 = 12</think> so \\boxed{12}"
    assert solution_text(text, "think") == " so \\boxed{12}"
    assert decode_response(decode, ids[:-1], [tok.eos_token_id]) == (text, True)
    # An ordinary token that a tokenizer names as its pad (not flagged special) stays in the text, as before.
    tok.pad_token = "!"
    bang = tok.convert_tokens_to_ids("!")
    assert text_decoder(tok)([*tok.encode("5", add_special_tokens=False), bang]) == "5!"
    generated = torch.tensor([ids])
    ro = assemble(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), generated,
                  torch.ones_like(generated, dtype=torch.bool), torch.zeros(generated.shape), tok, 1)  # fmt: skip
    assert ro.texts == [text] and ro.modes == ["think"]
