"""Evaluation: accuracy, think ratio and response length per file, overall and per mode, in the paper's protocol.

    thinkless-train eval model.path=runs/rl data.val_files=[math500.json,aime2024.json] trainer.output_dir=runs/rl \\
        rollout.n=1 rollout.temperature=0.6 rollout.top_p=0.95 eval.seeds=[0,1,2,3,4] data.instruction_position=before

The authors' protocol (their `run_eval.sh` and lm-eval configs): sampling at temperature 0.6, top-p 0.95, one sample
per problem, five passes with seeds 0-4, the mean over the passes reported. Here each seed is one pass over each
file with `rollout.n` samples per problem; the global RNGs are seeded with the seed at the start of every (seed, file)
pass, so the same settings on the same machine (and world size, and `trainer.batch_size`) give the same report.
No `eval.seeds`: one pass with `trainer.seed`, seeded once when the model loads (as before: the files share one
stream). `eval.limit=N` keeps the first N problems of each file (lm-eval's --limit). `model.path` may be a run
folder: its latest checkpoint is evaluated.

Tokens are the response's (up to and including its stop token); `eval.count_prompt_tokens=true` adds the prompt's
(the chat-templated conversation, as the authors count it). `eval.force_mode=short|think` appends the control token
to every prompt: the model answers in that mode, each sample's mode is the forced one, and it is scored as a response
that opens with that token (a think answer is then judged as one). The forced token counts as a response token, as
it would had the model picked it, so forced and free lengths compare; the prompt count leaves it out.

Files in `<output_dir>/eval/` (`<name>` is the file's stem; `<parent>_<stem>` when two files share a stem):

    <name>.json          the model choosing its mode
    short/<name>.json    eval.force_mode=short
    think/<name>.json    eval.force_mode=think
    oracle/<name>.json   as soon as short/ and think/ both hold <name> (same problems, seeds and rollout.n)
    table.md             every report above, in the paper's layout: accuracy, think %, tokens, mean ± std over seeds
    step-<step>/<name>.json   validation during RL (`validate`)

A report holds accuracy, think_ratio, mean_tokens (means over the seeds), n (samples, all seeds), the per-mode
figures accuracy_short/_think and mean_tokens_short/_think (pooled over all samples: a seed may sample no short
answer), format_errors (samples without a control token, as the RL metric), and seeds, samples_per_seed, std
(across seeds), per_seed (each seed's figures), and problems: per problem its source, reference answer, prompt
tokens, and each sample's mode, correctness and response tokens (seed-major: seed k's samples are k*n .. k*n+n-1).

The oracle router is the bound a learned router is judged against: for each problem and sample pair (the j-th
short sample with the j-th think sample), the cheap mode when its answer is right, else think when that one is right.
A problem neither mode solves counts as short (a router gains nothing by thinking there; its tokens are the short
answer's), so the oracle's think ratio is the share of answers that only thinking gets right. Its tokens count as
the eval that writes it counts them (`eval.count_prompt_tokens`: the reports keep prompt and response apart).

With several processes (torchrun) each rank samples its contiguous share of every file's problems on its own copy
of the model (`Run.sync_rollout_model`, as RL rollouts do: no collective inside generation), the records are
gathered in rank order, and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from thinkless.modes import HEADLINE, MODES, mode_statistics
from thinkless.train.checkpoint import rng_state, set_rng_state
from thinkless.train.data import fitting_prompts, load_problems
from thinkless.train.dist import Dist
from thinkless.train.files import write_text
from thinkless.train.model import load_tokenizer
from thinkless.train.rewards import eval_correct, score
from thinkless.train.rollout import generate
from thinkless.train.run import resolve_model_path, seed_everything, start_run

if TYPE_CHECKING:
    from thinkless.train.config import Config, RolloutConfig


RANK_STRIDE = 100_003  # rank r samples with seed + r * RANK_STRIDE: ranks draw different numbers, rank 0 the seed


def report_names(files: list[str]) -> list[str]:
    """One report name per file: its stem, or `<parent>_<stem>` when two files share a stem (two test.json)."""
    stems = [Path(f).stem for f in files]
    return [f"{Path(f).parent.name}_{s}" if stems.count(s) > 1 else s for f, s in zip(files, stems, strict=True)]


def _record(prompt_tokens: int, **info) -> dict:
    return {**info, "prompt_tokens": prompt_tokens, "modes": [], "correct": [], "tokens": []}


def _engine_generate(engine, model, tokenizer, prompts: list[str], rollout: RolloutConfig):
    """vLLM samples `engine.rollout.n` per prompt: the evaluation's n for this call."""
    saved, engine.rollout = engine.rollout, rollout
    try:
        return engine.generate(model, tokenizer, prompts)
    finally:
        engine.rollout = saved


def _sample(
    model, tokenizer, examples: list, config: Config, n: int, force_mode: str, engine=None, d: Dist | None = None,
    filler: str = "",
) -> list[dict]:  # fmt: skip
    """n samples of each example: per problem, its prompt tokens and each sample's mode, correctness and tokens.

    The vLLM engine syncs the sharded policy (a collective) in every `generate`, so under torchrun each rank makes
    as many calls as the busiest one: a rank with fewer (or no) problems samples `filler` and drops the result."""
    rollout = dataclasses.replace(config.rollout, n=n)
    token = MODES.get(force_mode, "")
    judge = config.eval.scoring
    out = []
    step = max(1, config.trainer.batch_size)
    calls = -(-len(examples) // step)
    if engine is not None and d is not None and d.world > 1:
        for _ in range(d.max(calls) - calls):
            _engine_generate(engine, model, tokenizer, [filler], dataclasses.replace(rollout, n=1))
    for i in range(0, len(examples), step):
        batch = examples[i : i + step]
        prompts = [e.prompt + token for e in batch]
        if engine is None:
            ro = generate(model, tokenizer, prompts, rollout)
        else:
            ro = _engine_generate(engine, model, tokenizer, prompts, rollout)
        records = [_record(len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"])) for e in batch]
        lengths = ro.lengths.tolist()
        for text, mode, p, length in zip(ro.texts, ro.modes, ro.prompt_index.tolist(), lengths, strict=True):
            if token:  # the prompt chose the mode: score the answer as one that opens with its token
                mode, text, length = force_mode, token + text, length + 1
            records[p]["modes"].append(mode)
            if judge == "authors":  # their evaluation scripts' rule (rewards.eval_correct)
                correct = mode is not None and eval_correct(text, batch[p].answer)
            else:
                correct = score(text, batch[p].answer, mode, config.rewards).correct
            records[p]["correct"].append(correct)
            records[p]["tokens"].append(int(length))
        out += records
    return out


def figures(samples: list[tuple[str | None, bool, float]]) -> dict:
    """The report's figures of (mode, correct, tokens) samples: n and `modes.mode_statistics`."""
    modes, correct, tokens = (list(x) for x in zip(*samples, strict=True)) if samples else ([], [], [])
    return {"n": len(samples), **mode_statistics(modes, correct, tokens)}


def summarize(file: str, problems: list[dict], seeds: list[int], n: int, force_mode: str, count_prompt: bool) -> dict:
    """The report of one file from its per-problem records (seed-major samples): means and std across seeds."""

    def samples(part: slice) -> list:
        extra = lambda p: p["prompt_tokens"] if count_prompt else 0  # noqa: E731
        return [
            (m, c, t + extra(p))
            for p in problems
            for m, c, t in zip(p["modes"][part], p["correct"][part], p["tokens"][part], strict=True)
        ]

    per_seed = [{"seed": s, **figures(samples(slice(k * n, (k + 1) * n)))} for k, s in enumerate(seeds)]
    report = {"file": file, **figures(samples(slice(None)))}
    for key in HEADLINE:  # equal samples per seed: the mean over seeds is the pooled figure
        report[key] = statistics.fmean(r[key] for r in per_seed)
    report.update(
        seeds=list(seeds), samples_per_seed=n, force_mode=force_mode, count_prompt_tokens=count_prompt,
        std={key: statistics.pstdev(r[key] for r in per_seed) for key in HEADLINE}, per_seed=per_seed,
        problems=problems,
    )  # fmt: skip
    return report


def evaluate_examples(
    model, tokenizer, file: str, examples: list, config: Config, *, seeds: list[int], n: int, force_mode: str = "",
    count_prompt: bool = False, d: Dist | None = None, engine=None, reseed: bool = True,
) -> dict:  # fmt: skip
    """One file's report: a pass per seed, each rank sampling its share of the problems, gathered in order.
    `reseed=False` (one process, one seed): sample from the RNG streams as they are."""
    d = d or Dist()
    mine = d.shard(list(range(len(examples))))
    problems = [_record(0, source=e.source, answer=e.answer) for e in examples]
    for seed in seeds:
        if reseed or d.world > 1:
            seed_everything(seed + RANK_STRIDE * d.rank)
        records = _sample(
            model, tokenizer, [examples[i] for i in mine], config, n, force_mode, engine, d,
            filler=examples[0].prompt if examples else "",
        )  # fmt: skip
        gathered = [r for part in d.gather(records) for r in part]
        for problem, record in zip(problems, gathered, strict=True):
            problem["prompt_tokens"] = record["prompt_tokens"]
            for key in ("modes", "correct", "tokens"):
                problem[key] += record[key]
    return summarize(file, problems, seeds, n, force_mode, count_prompt)


def evaluate_file(run, file: str, examples: list, config: Config) -> dict:
    """One file's report with the `eval.*` settings (seeds, force_mode, count_prompt_tokens) and `rollout.n`.
    No `eval.seeds`: one pass labelled `trainer.seed`, from the stream `start_run` seeded with it (as before seeds
    existed, so the demo's published numbers stand; the files then share one stream)."""
    e = config.eval
    return evaluate_examples(
        run.sync_rollout_model(), run.tokenizer, file, examples, config, seeds=e.seeds or [config.trainer.seed],
        n=config.rollout.n, force_mode=e.force_mode, count_prompt=e.count_prompt_tokens, d=run.dist,
        reseed=bool(e.seeds),
    )  # fmt: skip


def oracle(short: dict, think: dict, count_prompt: bool = False) -> dict:
    """The oracle router over a forced-short and a forced-think report of the same file (see the module's doc)."""
    if [p["answer"] for p in short["problems"]] != [p["answer"] for p in think["problems"]]:
        raise ValueError("the short and think reports hold different problems")
    if (short["seeds"], short["samples_per_seed"]) != (think["seeds"], think["samples_per_seed"]):
        raise ValueError("the short and think reports were sampled with different eval.seeds or rollout.n")
    problems = []
    for s, t in zip(short["problems"], think["problems"], strict=True):
        picked = _record(s["prompt_tokens"], source=s["source"], answer=s["answer"])
        for s_ok, s_tokens, t_ok, t_tokens in zip(s["correct"], s["tokens"], t["correct"], t["tokens"], strict=True):
            think_wins = t_ok and not s_ok  # the only case where thinking is worth its tokens
            picked["modes"].append("think" if think_wins else "short")
            picked["correct"].append(bool(s_ok or t_ok))
            picked["tokens"].append(t_tokens if think_wins else s_tokens)
        problems.append(picked)
    return summarize(short["file"], problems, short["seeds"], short["samples_per_seed"], "oracle", count_prompt)


def _cell(report: dict, key: str, scale: float, digits: int) -> str:
    mean = report[key] * scale
    if len(report.get("seeds", [])) < 2:  # one pass: no spread to show
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {report['std'][key] * scale:.{digits}f}"


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """(name, mode, report) rows as a markdown table in the paper's layout, mean ± std across seeds."""
    lines = ["| file | mode | accuracy | think % | tokens | n |", "| --- | --- | --- | --- | --- | --- |"]
    for name, mode, r in rows:
        cells = [_cell(r, "accuracy", 1, 3), _cell(r, "think_ratio", 100, 1), _cell(r, "mean_tokens", 1, 1)]
        lines.append(f"| {name} | {mode} | {' | '.join(cells)} | {r['n']} |")
    return "\n".join(lines) + "\n"


FOLDERS = {"model": "", "short": "short", "think": "think", "oracle": "oracle"}  # table label -> subfolder


def folder_reports(eval_dir: Path) -> list[tuple[str, str, dict]]:
    """Every report in an eval folder, by file then mode (the model's choice, short, think, oracle)."""
    rows = []
    for mode, sub in FOLDERS.items():
        for path in sorted((eval_dir / sub).glob("*.json")):
            try:
                report = json.loads(path.read_text())
            except (OSError, ValueError) as err:  # a report an older, interrupted eval cut short: skip it
                print(f"thinkless eval: {path} is not a readable report ({err}); left out of the table")
                continue
            if isinstance(report, dict) and all(k in report for k in (*HEADLINE, "n")):
                rows.append((path.stem, mode, report))
    order = list(FOLDERS)
    return sorted(rows, key=lambda r: (r[0], order.index(r[1])))


def run_eval(config: Config) -> list[dict]:
    tokenizer = load_tokenizer(resolve_model_path(config.model.path))
    # Every file is read and checked once, before the model generates anything.
    if not config.data.val_files:
        load_problems([], tokenizer, config, what="data.val_files")  # raises: the list is empty
    limit = config.eval.limit or None
    examples = {f: load_problems([f], tokenizer, config, what="data.val_files")[:limit] for f in config.data.val_files}
    run = start_run(config, "eval", train=False)
    out = Path(config.trainer.output_dir) / "eval"
    force = config.eval.force_mode
    reports, rows = [], []
    names = report_names(config.data.val_files)
    for file, name in zip(config.data.val_files, names, strict=True):
        report = evaluate_file(run, file, examples[file], config)
        if run.dist.is_main:
            write_text(out / force / f"{name}.json", json.dumps(report, indent=2))
            label = f"{name} ({force})" if force else name
            print(f"thinkless eval: {label}: accuracy {report['accuracy']:.3f}, think {report['think_ratio']:.2f}, "
                  f"tokens {report['mean_tokens']:.1f}, n {report['n']}")  # fmt: skip
        reports.append(report)
        rows.append((name, force or "model", report))
    if run.dist.is_main:
        rows += _oracles(out, names, config.eval.count_prompt_tokens)
        table = format_table(rows)
        write_text(out / "table.md", format_table(folder_reports(out)))
        print(f"\n{table}\n(every report in {out}: {out / 'table.md'})")
    return reports


def _oracles(out: Path, names: list[str], count_prompt: bool) -> list[tuple[str, str, dict]]:
    """The oracle router of each of these files whose short and think reports are both in the folder."""
    rows = []
    for name in names:
        short, think = out / "short" / f"{name}.json", out / "think" / f"{name}.json"
        if not (short.is_file() and think.is_file()):
            continue
        try:
            report = oracle(json.loads(short.read_text()), json.loads(think.read_text()), count_prompt)
        except (ValueError, KeyError) as err:  # an older or mismatched report: say so, the rest stands
            print(f"thinkless eval: no oracle router for {name}: {err}")
            (out / "oracle" / f"{name}.json").unlink(missing_ok=True)  # an older oracle no longer matches them
            continue
        write_text(out / "oracle" / f"{name}.json", json.dumps(report, indent=2))
        rows.append((name, "oracle", report))
    return rows


def validation_examples(config: Config, tokenizer) -> dict[str, list]:
    """The examples of `trainer.val_files`, read and checked (call it before training, so a bad row stops the run
    early). Prompts longer than `data.max_prompt_tokens` are dropped, with a count, as RL drops training prompts."""
    limit, out = config.data.max_prompt_tokens, {}
    for file in config.trainer.val_files:
        examples = load_problems([file], tokenizer, config, what="trainer.val_files")
        kept = fitting_prompts(examples, tokenizer, limit, f"validation file {file}")
        out[file] = kept
    return out


def validate(run, config: Config, step: int, *, examples: dict | None = None, engine=None) -> dict:
    """Validation during RL: each file of `trainer.val_files`, `trainer.val_n` samples per problem, the model
    choosing its mode; writes `<output_dir>/eval/step-<step>/<name>.json` (rank 0) and returns
    {"val/<name>/accuracy", "val/<name>/think_ratio", "val/<name>/mean_tokens"} (response tokens, as the RL metrics).

    Every rank must call it (it gathers). Sampling runs on `run.sync_rollout_model()` (the policy itself on one
    process, its plain copy under torchrun) or, given the RL loop's vLLM `engine`, through it. The global RNGs are
    seeded with `trainer.seed` for it (every validation samples with the same numbers, so steps differ by the model
    alone) and put back afterwards: the training stream goes on as if it had not run. The model's train/eval mode
    is put back too. `examples`: from `validation_examples` (read once); else the files are read here."""
    if not config.trainer.val_files:
        return {}
    d = run.dist
    examples = examples if examples is not None else validation_examples(config, run.tokenizer)
    saved = rng_state()
    model = run.sync_rollout_model() if engine is None else run.model
    if engine is None and d.world > 1 and model is run.model:
        raise ValueError("validate: with several ranks and no rollout copy of the model, pass the vLLM engine")
    was_training = model.training
    model.eval()  # no dropout while sampling
    metrics = {}
    try:
        names = report_names(config.trainer.val_files)
        for file, name in zip(config.trainer.val_files, names, strict=True):
            report = evaluate_examples(model, run.tokenizer, file, examples[file], config, seeds=[config.trainer.seed],
                                       n=config.trainer.val_n, d=d, engine=engine)  # fmt: skip
            if d.is_main:
                write_text(run.output_dir / "eval" / f"step-{step}" / f"{name}.json", json.dumps(report, indent=2))
            for key in HEADLINE:
                metrics[f"val/{name}/{key}"] = report[key]
    finally:
        model.train(was_training)
        set_rng_state(saved)
    return metrics
