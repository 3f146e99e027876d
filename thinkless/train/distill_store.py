"""The distill stage's files: the judged samples of each side, kept by what they answer, and the rows made of them.

    <side>/settings.json      what the side's samples depend on (model, sampling, template, engine, seed, ...):
                              a run with other settings stops, naming the key, instead of mixing samples
    <side>/<digest>.json      one shard: its problems (by id) and each one's judged samples, [[response, verdict]]
                              (null: its prompt was longer than data.max_prompt_tokens); written whole, then renamed

A shard file is named by the digest of its problems (`shard_digest`), not by its position, so a finished shard is
never overwritten by another: when the problem list moves (a larger `distill.limit`, rows added to the file, a new
validation file), the samples of every problem already answered are found in the old shards (`SideStore.reusable`)
and only the others are generated.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from thinkless.train.config import ConfigError
from thinkless.train.data import Problem
from thinkless.train.distill_teacher import problem_key
from thinkless.train.files import write_text

SIDES = ("think", "short")


def problem_id(p: Problem) -> str:
    return hashlib.sha256(f"{problem_key(p.problem)}\0{p.answer.strip()}".encode()).hexdigest()[:20]


def shard_digest(problems: list[Problem]) -> str:
    return hashlib.sha256(" ".join(problem_id(p) for p in problems).encode()).hexdigest()[:16]


class SideStore:
    """One side's shards in `<output_dir>/<side>/`.

    `settings` are checked against the recorded ones: the keys in `identity` always (a rebuild of the rows from
    finished shards too), every key when this run generates (`generating`): the template's digest, dtype and device
    only matter to samples still to be drawn. They are recorded with the first shard written, so a run that fails
    before it (a wrong model path, out of memory) claims nothing."""

    def __init__(self, out: Path, side: str, settings: dict, identity: tuple[str, ...], generating: bool):
        self.dir, self.side, self.settings = out / side, side, settings
        self._reusable: dict[str, list | None] | None = None
        path = self.dir / "settings.json"
        shards = [p for p in self.dir.glob("*.json") if p.name != "settings.json"] if self.dir.is_dir() else []
        self.recorded = path.is_file() and bool(shards)
        if not path.is_file():
            if shards:
                raise ConfigError(f"{self.dir} holds answers but no settings.json: they cannot be checked against "
                                  f"this run's; use another trainer.output_dir, or delete {self.dir}")  # fmt: skip
            return
        if not shards:
            return  # recorded by a run that wrote nothing: unclaimed
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path} is not valid JSON: delete {self.dir} to generate its side again") from None
        keys = sorted(set(saved) | set(settings)) if generating else identity
        for key in keys:
            if saved.get(key) != settings.get(key):
                raise ConfigError(
                    f"{path}: this folder's {side} answers were made with {key}={saved.get(key)!r}, this run has "
                    f"{settings.get(key)!r}; use another trainer.output_dir, or delete {self.dir} to make them again"
                )

    def path(self, digest: str) -> Path:
        return self.dir / f"{digest}.json"

    def has(self, digest: str) -> bool:
        return SideStore.exists(self.dir.parent, self.side, digest)

    @staticmethod
    def exists(out: Path, side: str, digest: str) -> bool:
        """Written whole (every write is atomic: a file cut short was damaged afterwards, and is made again)."""
        path = out / side / f"{digest}.json"
        try:
            with path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                return f.read(1) == b"}"
        except OSError:
            return False

    def set_aside(self, digest: str) -> Path:
        """A shard that does not load goes to <digest>.json.bad: the next run generates it again."""
        bad = self.path(digest).with_suffix(".json.bad")
        os.replace(self.path(digest), bad)
        return bad

    def load(self, digest: str, problems: list[Problem]) -> dict | None:
        """The shard of these problems: {"samples": per problem, "prompts_too_long": n}; None if absent or unreadable
        (it is then generated again)."""
        path = self.path(digest)
        try:
            shard = json.loads(path.read_text())
            ids = [e["id"] for e in shard["problems"]]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"thinkless distill: {path} is unreadable ({type(err).__name__}); it is generated again")
            return None
        if ids != [problem_id(p) for p in problems]:
            print(f"thinkless distill: {path} holds other problems than its name says; it is generated again")
            return None
        return {"samples": [e["samples"] for e in shard["problems"]], "prompts_too_long": shard["prompts_too_long"]}

    def save(self, digest: str, problems: list[Problem], samples: list, too_long: int) -> None:
        if not self.recorded:
            write_text(self.dir / "settings.json", json.dumps(self.settings, indent=2))
            self.recorded = True
        entries = [{"id": problem_id(p), "samples": s} for p, s in zip(problems, samples, strict=True)]
        write_text(self.path(digest), json.dumps({"problems": entries, "prompts_too_long": too_long},
                                                 ensure_ascii=False))  # fmt: skip

    def reusable(self, current: set[str]) -> dict[str, list | None]:
        """problem id -> judged samples, from the shards of other problem lists (read once, when first needed:
        a fresh or merely interrupted run has none)."""
        if self._reusable is None:
            self._reusable = {}
            for path in sorted(self.dir.glob("*.json")):
                if path.stem in current or path.name == "settings.json":
                    continue
                try:
                    for e in json.loads(path.read_text())["problems"]:
                        self._reusable.setdefault(e["id"], e["samples"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # an unreadable old shard: its problems are generated again
        return self._reusable


def sft_rows(problems: list[Problem], think: list, short: list, distill) -> tuple[list[dict], list[dict]]:
    """The SFT rows of a shard (per problem: its think rows, then its short rows; the same correct answer sampled
    twice is one row) and per problem which modes it solved. A problem without samples on a side (None: its prompt
    was too long) solved nothing there."""
    rows, kept = [], []
    limit = distill.keep_per_mode or None
    for p, t, s in zip(problems, think, short, strict=True):
        good = {m: list(dict.fromkeys(r for r, v in (per or []) if v == "correct"))[:limit]
                for m, per in (("think", t), ("short", s))}  # fmt: skip
        solved = {m: bool(good[m]) for m in good}
        kept.append({"solved": solved})
        if distill.require_both and not all(solved.values()):
            continue
        rows += [{"problem": p.problem, "response": r} for side in SIDES for r in good[side]]
    return rows, kept


def write_rows(path: Path, rows: list[dict], fmt: str) -> None:
    writer = RowWriter(path, fmt)
    writer.write(rows)
    writer.close(keep=True)


class RowWriter:
    """SFT rows {"problem", "response"} as jsonl or parquet, written under a temporary name and renamed when whole
    (the hybrid file is written shard by shard: a million rows never sit in memory)."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = path, fmt
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([("problem", pa.string()), ("response", pa.string())])
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        else:
            self.file = self.tmp.open("w", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "parquet":
            import pyarrow as pa

            self.writer.write_table(pa.Table.from_pylist(rows, schema=self.schema))
        else:
            self.file.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def close(self, keep: bool) -> None:
        (self.writer if self.fmt == "parquet" else self.file).close()
        if keep:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def remove_stale_tmp(folders: list[Path]) -> None:
    """Temporary files (.<name>.<pid>.tmp) of processes that are gone: a killed run's, never to be renamed."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for tmp in folder.glob(".*.tmp"):
            pid = tmp.name.rsplit(".", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
