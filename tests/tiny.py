"""A tokenizer trained in the test and a tiny random Qwen2: the trainer's tests need no model hub."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


def _shared_data() -> Path:
    """The real math problems: THINKLESS_DATA, else ../shared/data from the project root (see its README), else the
    same beside the repository this one was cloned from (a throwaway clone made elsewhere, as CI checks do)."""
    if os.environ.get("THINKLESS_DATA"):
        return Path(os.environ["THINKLESS_DATA"])
    root = Path(__file__).resolve().parents[1]
    candidates = [root.parent / "shared" / "data"]
    origin = subprocess.run(
        ["git", "-C", str(root), "config", "--get", "remote.origin.url"], capture_output=True, text=True
    ).stdout.strip()
    if origin and "://" not in origin:
        candidates.append(Path(origin).resolve().parent / "shared" / "data")
    found = next((c for c in candidates if (c / "math_train.json").is_file()), None)
    if found is None:
        raise FileNotFoundError(f"no shared math data in {[str(c) for c in candidates]}; set THINKLESS_DATA")
    return found


DATA = _shared_data()

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


def make_model(folder: Path, tokenizer, *, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A randomly initialised 2-layer Qwen2 with the tokenizer's vocabulary, saved to `folder`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def teach(folder: Path, pairs: list[tuple[str, str]], *, steps: int = 300, lr: float = 3e-3, seed: int = 0):
    """Train the model in `folder` to answer each prompt (a chat-formatted string) with its response (then EOS),
    in place: a teacher whose answers are known in advance, for the distill stage's tests."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = []
    for prompt, response in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + r, [-100] * len(p) + r))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return float(loss.detach())
