"""Checkpoints: `<output_dir>/checkpoint-<step>/` holds the HF model and tokenizer and `trainer_state.pt`.

A checkpoint is written to `checkpoint-<step>.tmp/` and renamed when complete, so a crash never leaves half of one
under the real name. Only the last `keep_last` are kept. A run resumes from the highest complete step.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (named checkpoint-<step>, with a trainer state), by step."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for path in out.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | Path, step: int, model, tokenizer, state: dict, keep_last: int, state_dict: dict | None = None
) -> Path:
    """Write checkpoint-<step>/ atomically (tmp folder, then rename) and delete all but the last `keep_last`.
    `state_dict`: the full weights of a sharded model (FSDP2), gathered by the caller."""
    out = Path(output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    _plain_architecture(model, tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoints(out)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint: str | Path) -> dict:
    # The state holds optimizer tensors, RNG states and plain Python values: written by us, so weights_only=False.
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def _plain_architecture(model, folder: Path) -> None:
    """FSDP2 renames a model's class (FSDPQwen2ForCausalLM); config.json keeps the class `from_pretrained` knows."""
    import json

    name = next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures") != [name]:
        config["architectures"] = [name]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
