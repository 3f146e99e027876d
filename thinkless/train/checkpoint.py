"""Checkpoints: `<output_dir>/checkpoint-<step>/` holds the HF model and tokenizer and `trainer_state.pt`.

A checkpoint is written to `checkpoint-<step>.tmp/` and renamed when complete, so a crash never leaves half of one
under the real name. Its `manifest.json` records what it holds: every file's name, size and CRC-32 (zlib's, at
memory speed: a 15 GB checkpoint costs seconds, not the minutes of a cryptographic hash). Resuming verifies the
latest one against it and falls back to the previous good one, with a warning naming the bad one (a disk that
filled up, a copy cut short, a bit flipped in transfer). Only the last `keep_last` are kept. A save that fails
(disk full, no permission) removes its temporary folder, leaves the previous checkpoints as they were, and raises
`CheckpointError`. A save at a step below existing checkpoints (the run fell back from damaged ones) renames those
to `checkpoint-<step>.damaged`: never resumed from, never counted by `keep_last`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
import zlib
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written: the CLI prints it as one line (exit status 1)."""


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


def latest_checkpoint(output_dir: str | Path, verify: bool = True) -> Path | None:
    """The newest checkpoint whose files match its manifest (`verify`), warning about each newer one that does not;
    None when there is none."""
    found = checkpoints(output_dir)
    for k, (_, path) in enumerate(reversed(found)):
        problem = verify_checkpoint(path) if verify else None
        if problem is None:
            return path
        fallback = "the checkpoint before it" if k + 1 < len(found) else "model.path (no other checkpoint is left)"
        warnings.warn(f"{path} is damaged ({problem}); resuming from {fallback}", stacklevel=2)
    return None


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))


def verify_checkpoint(folder: str | Path) -> str | None:
    """None when every file the manifest lists is there with its size and checksum; else what is wrong. A
    checkpoint written before manifests existed passes when its trainer state loads."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        try:
            load_state(folder)
        except Exception as err:  # noqa: BLE001 (torch.load raises many types for a cut file)
            return f"no {MANIFEST}, and {STATE_FILE} does not load: {type(err).__name__}"
        return None
    try:
        files = json.loads(path.read_text())["files"]
        entries = [(str(name), int(entry["bytes"]), int(entry["crc32"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # cut, not JSON, or not its shape
        return f"{MANIFEST} unreadable: {type(err).__name__}"
    for name, size, crc in entries:
        file = folder / name
        try:
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
            if _crc32(file) != crc:
                return f"{name} does not match its checksum"
        except OSError as err:  # an I/O error of the disk: the checkpoint cannot be trusted either
            return f"{name} cannot be read ({type(err).__name__}: {err})"
    return None


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
    """Write checkpoint-<step>/ atomically (tmp folder, manifest, then rename) and delete all but the last
    `keep_last`. `state_dict`: the full weights of a sharded model (FSDP2), gathered by the caller. A failure
    removes the tmp folder and raises CheckpointError; the checkpoints already there are untouched."""
    out = Path(output_dir)
    final, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
    for stale in out.glob("checkpoint-*.tmp"):  # a save that died: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        _plain_architecture(model, tmp)
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE_FILE)
        write_manifest(tmp)
    except Exception as err:  # disk full, no permission (OSError, safetensors' SafetensorError), serialisation
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out, verify=False)
        kept = f"{previous.name} is intact" if previous is not None else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write {final}: {type(err).__name__}: {err}; {kept}") from None
    if final.exists():  # the same step saved again (a resumed run): the old copy goes only once the new is in place
        old = out / f"checkpoint-{step}.old.tmp"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for later, path in checkpoints(out):  # newer than this step: damaged ones the run fell back from
        if later > step:
            aside = out / f"checkpoint-{later}.damaged"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
    for _, old in checkpoints(out)[: -max(1, keep_last)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(checkpoint: str | Path) -> dict:
    # The state holds optimizer tensors, RNG states and plain Python values: written by us, so weights_only=False.
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def _plain_architecture(model, folder: Path) -> None:
    """FSDP2 renames a model's class (FSDPQwen2ForCausalLM); config.json keeps the class `from_pretrained` knows."""
    name = next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.get("architectures") != [name]:
        config["architectures"] = [name]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
