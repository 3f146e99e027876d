"""Metrics: one JSON line per step in `<output_dir>/metrics.jsonl`, optionally TensorBoard or Weights & Biases.

On resume the file is cut back to the checkpoint's step, so that every step appears exactly once.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from thinkless.train.config import ConfigError
from thinkless.train.files import write_text


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


def _step(line: str) -> float:
    """The step of a metrics line; a line a crash cut short (or a blank one) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    def __init__(self, output_dir: str | Path, resume_step: int = 0, report_to: str = "none"):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep the steps up to the checkpoint we resume from (none without one)
            lines = self.path.read_text().splitlines() if resume_step > 0 else []
            kept = [line for line in lines if _step(line) <= resume_step]
            write_text(self.path, "".join(line + "\n" for line in kept))
        self.writer = None  # report_to is one of none, tensorboard, wandb (config.validate checks it)
        try:
            if report_to == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            elif report_to == "wandb":
                import wandb

                # One W&B run per output folder, so that a resumed run continues its charts.
                run_id = hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
                self.writer = wandb.init(project="thinkless", dir=str(output_dir), id=run_id, resume="allow")
        except ImportError:
            raise ConfigError(f"trainer.report_to={report_to} needs the package: pip install {report_to}") from None

    def log(self, step: int, metrics: dict) -> dict:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None and hasattr(self.writer, "add_scalar"):
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, step)
        elif self.writer is not None:
            self.writer.log(row, step=step)
        return row

    def close(self) -> None:
        if self.writer is not None and hasattr(self.writer, "close"):
            self.writer.close()
        elif self.writer is not None:
            self.writer.finish()


class NullLog:
    """The metrics of a rank other than 0: values are formed (for the progress bar) but nothing is written."""

    def log(self, step: int, metrics: dict) -> dict:
        return {"step": step, **{k: _plain(v) for k, v in metrics.items()}}

    def close(self) -> None:
        pass
