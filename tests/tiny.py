"""A tokenizer trained in the test and a tiny random Qwen2: the trainer's tests need no model hub."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# DeepSeek-R1-Distill's template opens a <think> block in the generation prompt; this one does the same.
CHATML_THINK = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\n<think>\n{% endif %}")


def make_tokenizer(folder: Path, *, chat_template: str = CHATML, with_control_tokens: bool = False):
    """A byte-level BPE tokenizer trained on MATH problems, saved to `folder` and loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = json.loads((DATA / "math_train.json").read_text())[:400]
    texts = [r["problem"] + " " + r["answer"] for r in rows]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    if with_control_tokens:
        fast.add_special_tokens({"additional_special_tokens": ["<short>", "<think>", "</think>"]})
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)
