"""A llama.cpp GGUF file as a Hugging Face model folder: `model.path=model.gguf` starts from a llama.cpp checkpoint.

`transformers` reads a GGUF file (`from_pretrained(folder, gguf_file=...)`, with the `gguf` package) and dequantises
its tensors to float32, but refuses to `save_pretrained` the result, and every stage here (and vLLM) wants a folder.
So the model is rebuilt from its config without the GGUF's `quantization_config`, its state dict loaded, and the
model and tokenizer saved once into a cache folder keyed by the file's path, size and modification time:

    <cache>/<stem>-<hash>/    config.json, model.safetensors, tokenizer files, gguf.json (where it came from)

The cache is `$THINKLESS_CACHE` or `~/.cache/thinkless`, under `gguf/`. Each process writes into a temporary folder
of its own and renames it when whole, so an interrupted conversion is redone, never half-used, and ranks converting
at once do not collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


class GGUFError(ValueError):
    """A GGUF file that cannot be converted: the CLI prints it as one line."""


def cache_root() -> Path:
    return Path(os.environ.get("THINKLESS_CACHE", Path.home() / ".cache" / "thinkless")).expanduser() / "gguf"


def is_gguf(path: str) -> bool:
    return str(path).lower().endswith(".gguf")


def _key(gguf: Path) -> str:
    stat = gguf.stat()
    text = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{gguf.stem}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def convert_gguf(path: str | Path, cache: str | Path | None = None) -> Path:
    """The Hugging Face folder of a GGUF file: converted on first use, then read from the cache."""
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise GGUFError(f"model.path={str(path)!r}: no such GGUF file")
    out = Path(cache).expanduser() if cache is not None else cache_root()
    folder = out / _key(gguf)
    if (folder / "gguf.json").is_file():
        return folder
    try:
        import gguf as _  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise GGUFError(f"model.path={str(path)!r} is a GGUF file: reading it needs `pip install gguf`") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise GGUFError(f"model.path={str(path)!r}: transformers cannot read this GGUF file: {err}") from None
    # The dequantised model keeps the GGUF's quantization_config, which makes save_pretrained refuse it: rebuild it
    # from a plain config and move the weights over.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    # Every process converts into a folder of its own and renames it into place; under torchrun all ranks may
    # convert at once, and the first rename wins (the others drop their copy and use it).
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f"{folder.name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "gguf.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "size": gguf.stat().st_size}))
        if folder.exists() and not (folder / "gguf.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a folder nobody finished: never a complete one
        os.rename(tmp, folder)
    except OSError:
        if not (folder / "gguf.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
