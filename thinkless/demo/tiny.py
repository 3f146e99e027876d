"""The demo's model, built in code: a character tokenizer for the task and a randomly initialised 2-layer Qwen2.

Both are saved with `save_pretrained`, so every stage loads them exactly as it would load a user's model.
"""

from __future__ import annotations

from pathlib import Path

from thinkless.demo.task import ALPHABET, BOXED
from thinkless.modes import SHORT, THINK, THINK_END

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# The chat turn is the problem itself: a tiny model should not spend its capacity on a chat header.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def build_tokenizer(folder: str | Path):
    """One token per character of the task, plus `\\boxed{` and the control tokens, saved to `folder`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *ALPHABET])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    # Non-special, as `thinkless.train.model.load_tokenizer` adds them: decoding keeps them in the text.
    fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in (BOXED, SHORT, THINK, THINK_END)])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def build_model(folder: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0):
    """A random Qwen2 with the demo's vocabulary, saved with its tokenizer to `folder` (returns the folder)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(folder)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return Path(folder)
