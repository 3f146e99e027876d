"""The distill stage: tiny teachers whose answers are known in advance, real MATH problems, the rows that must come
out (verified by the RL reward's code), resuming after a kill, the contamination guard, and sft on the output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

from thinkless.cli import main
from thinkless.train import distill as distill_mod
from thinkless.train.config import INSTRUCTION, ConfigError, load_config
from thinkless.train.data import DataError, user_turn
from thinkless.train.distill import gather_problems
from thinkless.train.distill_store import sft_rows, shard_digest
from thinkless.train.distill_teacher import read_think_file, short_response, teacher_prompt, think_response, verdict
from thinkless.train.rewards import score

WRONG = "12345"
# Problem i of the 8: what each teacher was taught to answer. Short: right on 0-4, wrong on 5-7. Think: on 0-1 a
# right \boxed{} but no </think> (cut off in its thinking: rejected), right on 2-5, wrong on 6-7.
#   both modes: 2, 3, 4   short only: 0, 1   think only: 5   neither: 6, 7
SHORT_RIGHT, THINK_RIGHT, THINK_UNCLOSED = range(5), range(2, 6), range(2)


def _short_text(answer: str) -> str:
    return f"The answer is $\\boxed{{{answer}}}$."


def _think_text(i: int, answer: str) -> str:  # the continuation of the template's "<think>\n"
    if i in THINK_UNCLOSED:
        return f"Let me check. So it is $\\boxed{{{answer}}}$."
    return f"Let me check.\n</think>\n\nThe answer is $\\boxed{{{answer if i in THINK_RIGHT else WRONG}}}$."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Eight real MATH problems (+ a whitespace duplicate of the first, + three MATH-500 problems) and two taught
    tiny teachers: a short one (ChatML) and a think one whose template opens <think> as R1's does."""
    base = tmp_path_factory.mktemp("distill")
    rows = [r for r in json.loads((tiny.DATA / "math_train.json").read_text())[:12] if r.get("answer")][:8]
    math500 = json.loads((tiny.DATA / "math500.json").read_text())[:3]
    dup = dict(rows[0], problem="  " + rows[0]["problem"].replace(" ", "  ") + "\n")
    problems = base / "problems.json"
    problems.write_text(json.dumps([*rows[:4], dup, *math500, *rows[4:]]))
    teachers = {}
    for side, template in (("short", tiny.CHATML), ("think", tiny.CHATML_THINK)):
        folder = base / side
        tok = tiny.make_tokenizer(folder, chat_template=template)
        tiny.make_model(folder, tok, hidden=64, seed=3)
        answers = [
            _short_text(r["answer"] if i in SHORT_RIGHT else WRONG) if side == "short" else _think_text(i, r["answer"])
            for i, r in enumerate(rows)
        ]
        prompts = [teacher_prompt(tok, r["problem"], load_config().data)[0] for r in rows]
        assert tiny.teach(folder, list(zip(prompts, answers, strict=True)), steps=200) < 0.02
        teachers[side] = folder
    return {"base": base, "rows": rows, "problems": problems, "teachers": teachers}


def _args(setup, out: Path, *extra: str) -> list[str]:
    t = setup["teachers"]
    return [
        "distill", f"data.train_files=[{setup['problems']}]", f"data.val_files=[{tiny.DATA / 'math500.json'}]",
        f"distill.think_model={t['think']}", f"distill.short_model={t['short']}", "distill.think_max_tokens=64",
        "distill.short_max_tokens=32", "distill.think_temperature=0.3", "distill.short_temperature=0.3",
        "distill.shard_size=3", "trainer.batch_size=2", "data.max_prompt_tokens=900", f"trainer.output_dir={out}",
        *extra,
    ]  # fmt: skip


def _expected_rows(setup) -> list[dict]:
    out = []
    for i, r in enumerate(setup["rows"]):
        if i in THINK_RIGHT:
            out.append({"problem": r["problem"], "response": "<think>\n" + _think_text(i, r["answer"])})
        if i in SHORT_RIGHT:
            out.append({"problem": r["problem"], "response": "<short>\n" + _short_text(r["answer"])})
    return out


def _digests(setup) -> list[str]:
    """The shard names of the run in `_args` (its 8 problems, 3 per shard)."""
    problems, _ = gather_problems(load_config(overrides=_args(setup, Path("unused"))[1:]))
    return [shard_digest(problems[i : i + 3]) for i in range(0, len(problems), 3)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(setup):
    """One uninterrupted run: the reference for everything below."""
    out = setup["base"] / "uninterrupted"
    assert main(_args(setup, out)) == 0
    return out


def test_distill_keeps_exactly_the_verified_answers(setup, finished):
    assert _rows(finished / "hybrid.jsonl") == _expected_rows(setup)
    report = json.loads((finished / "report.json").read_text())
    assert report["problems"]["duplicates_merged"] == 1
    assert report["problems"]["contaminated"] == {str(tiny.DATA / "math500.json"): 3}
    assert report["problems"]["used"] == 8
    assert report["problems_with"] == {"both": 3, "think_only": 1, "short_only": 2, "neither": 2}
    assert report["kept_rows"] == {"think": 4, "short": 5, "total": 9}
    think, short = report["models"]["think"], report["models"]["short"]
    assert (think["correct"], think["wrong"], think["format_error"], think["samples"]) == (4, 2, 2, 8)
    assert (short["correct"], short["wrong"], short["accuracy"]) == (5, 3, 5 / 8)
    assert report["tokens"]["think"]["counted"] == 4 and report["tokens"]["short"]["counted"] == 5
    assert (finished / "lengths.png").stat().st_size > 1000 and "| <think> |" in (finished / "report.md").read_text()
    shards = sorted(p.name for p in (finished / "data").iterdir())
    assert shards == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert sum((_rows(finished / "data" / s) for s in shards), []) == _rows(finished / "hybrid.jsonl")


def test_a_think_answer_without_its_closing_tag_is_rejected(setup, finished):
    """Problems 0 and 1: the think teacher boxed the right answer but never closed its thinking."""
    shard = json.loads((finished / "think" / f"{_digests(setup)[0]}.json").read_text())
    for i in THINK_UNCLOSED:
        [(response, judged)] = shard["problems"][i]["samples"]
        assert "</think>" not in response and setup["rows"][i]["answer"] in response
        assert judged == "format_error"
    rewards = load_config().rewards
    assert verdict("<think>\nSo $\\boxed{4}$.", "4", True, rewards) == "format_error"
    assert verdict("<think>\nhm\n</think>\n$\\boxed{4}$", "4", True, rewards) == "correct"
    assert verdict("<think>\nhm\n</think>\n$\\boxed{4}$", "4", False, rewards) == "truncated"
    assert verdict("<short>\n$\\boxed{5}$", "4", True, rewards) == "wrong"
    assert verdict("<short>\n<think>\nhm</think> $\\boxed{4}$", "4", True, rewards) == "thinking"
    assert verdict("<short>\nno box", "4", True, rewards) == "format_error"


def test_verification_is_the_rl_reward(monkeypatch):
    """verdict goes through rewards.score (the RL reward's function), mode read from the response's first token."""
    calls = []

    def spy(response, reference, mode, table):
        calls.append((response, reference, mode))
        return score(response, reference, mode, table)

    from thinkless.train import distill_teacher

    monkeypatch.setattr(distill_teacher, "score", spy)
    rewards = load_config().rewards
    cases = [("<think>\na\n</think>\n\\boxed{1/2}", "\\frac{1}{2}"), ("<short>\n\\boxed{0.5}", "1/2"),
             ("<think>\n\\boxed{3}", "3"), ("<short>\nno box", "3")]  # fmt: skip
    for response, answer in cases:
        mode = "think" if response.startswith("<think>") else "short"
        assert (verdict(response, answer, True, rewards) == "correct") == score(response, answer, mode, rewards).correct
    assert [c[2] for c in calls] == ["think", "short", "think", "short"]


def test_a_killed_run_resumes_to_the_same_rows(setup, finished, tmp_path):
    """The process is SIGKILLed in the middle of writing its fourth file (think shard 2 written to its temporary
    name, not yet renamed); the rerun generates only what was missing and ends with the same files, byte for byte."""
    out = tmp_path / "killed"
    wrapper = (
        "import os, signal, sys\n"
        "import thinkless.train.distill as d\n"
        "writes, real = [0], d.os.replace\n"
        "def replace(src, dst):\n"
        "    writes[0] += 1\n"
        "    if writes[0] == 4:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "d.os.replace = replace\n"
        "from thinkless.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper, *_args(setup, out)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    digests = _digests(setup)
    written = sorted(p.name for p in (out / "think").iterdir() if not p.name.startswith("."))
    assert written == sorted(["settings.json", f"{digests[0]}.json", f"{digests[1]}.json"])
    assert any(p.name.startswith(f".{digests[2]}.json.") for p in (out / "think").iterdir())  # killed mid-write
    assert not (out / "hybrid.jsonl").exists()
    sampled = []
    real = distill_mod.Teacher.sample
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill_mod.Teacher, "sample", lambda self, *a: sampled.append(self.side) or real(self, *a))
        assert main(_args(setup, out)) == 0
    assert sampled == ["think", "short", "short", "short"]  # think shards 0 and 1 were not generated again
    shards = [f"{side}/{name}.json" for side in ("think", "short") for name in [*digests, "settings"]]
    for name in ["hybrid.jsonl", "report.json", *shards]:
        assert (out / name).read_bytes() == (finished / name).read_bytes(), name
    assert len({json.dumps(r) for r in _rows(out / "hybrid.jsonl")}) == len(_rows(out / "hybrid.jsonl"))


def test_sft_trains_on_the_hybrid_file_unchanged(setup, finished, tmp_path):
    out = tmp_path / "sft"
    args = ["sft", f"model.path={setup['teachers']['short']}", f"data.train_files=[{finished / 'hybrid.jsonl'}]",
            "trainer.total_steps=2", "trainer.batch_size=4", f"trainer.output_dir={out}", "algo.lr=1e-4"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["tokens"] > 0 for r in rows)
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file()


def test_more_processes_write_the_same_rows(setup, finished, tmp_path, monkeypatch):
    """Two processes (RANK 1, then RANK 0 of WORLD_SIZE 2) split the shards; the one finishing last writes the
    file, the same as one process's."""
    out = tmp_path / "two"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(_args(setup, out)) == 0
    written = sorted(p.name for p in (out / "short").iterdir())
    assert not (out / "hybrid.jsonl").exists() and written == sorted([f"{_digests(setup)[1]}.json", "settings.json"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(_args(setup, out)) == 0
    assert (out / "hybrid.jsonl").read_bytes() == (finished / "hybrid.jsonl").read_bytes()


def test_require_both_and_keep_settings_rebuild_without_generating(setup, finished, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(finished, out)
    monkeypatch.setattr(distill_mod, "Teacher", None)  # any generation would fail
    assert main(_args(setup, out, "distill.require_both=true", "distill.format=parquet")) == 0
    both = [r for r in _expected_rows(setup) if any(r["problem"] == setup["rows"][i]["problem"] for i in (2, 3, 4))]
    import datasets

    table = datasets.load_dataset("parquet", data_files=str(out / "hybrid.parquet"), split="train").to_list()
    assert table == both and not (out / "hybrid.jsonl").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["dropped_by_require_both"] == 3 and report["kept_rows"]["total"] == 6


def test_changed_settings_stop_the_run_with_the_file_named(setup, finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(finished, out)
    assert main(_args(setup, out, "distill.short_temperature=0.7")) == 2
    err = capsys.readouterr().err
    assert "short/settings.json: this folder's short answers were made with temperature=0.3, this run has 0.7" in err
    assert "trainer.output_dir" in err and "Traceback" not in err
    assert "short_temperature: 0.3" in (out / "config.yaml").read_text()  # the refused run recorded nothing


def test_contamination_guard_drops_math500_problems(tmp_path):
    """Real MATH train problems mixed with MATH-500 ones (one with its whitespace changed): the MATH-500 ones are
    dropped and counted, per validation file, before anything is generated."""
    train = json.loads((tiny.DATA / "math_train.json").read_text())[:40]
    math500 = json.loads((tiny.DATA / "math500.json").read_text())
    overlap = [math500[i] for i in (0, 7, 99, 499)]
    reworded = dict(overlap[1], problem=overlap[1]["problem"].replace(" ", "\n "))
    mixed = [*train[:20], overlap[0], reworded, *train[20:], overlap[2], overlap[3]]
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    (tmp_path / "aime.jsonl").write_text(json.dumps({"problem": "not in the mix", "answer": "1"}) + "\n")
    val = f"data.val_files=[{tiny.DATA / 'math500.json'},{tmp_path / 'aime.jsonl'}]"
    config = load_config(overrides=[f"data.train_files=[{tmp_path / 'mixed.json'}]", val])
    problems, counts = gather_problems(config)
    assert counts["contaminated"] == {str(tiny.DATA / "math500.json"): 4, str(tmp_path / "aime.jsonl"): 0}
    keys = {" ".join(r["problem"].split()) for r in math500}
    assert not any(" ".join(p.problem.split()) in keys for p in problems)
    expected = [r for r in train if r.get("answer")]
    assert [p.problem for p in problems] == list(dict.fromkeys(r["problem"] for r in expected))
    assert counts["without_answer"] == sum(not r.get("answer") for r in train)


def test_responses_are_normalised_to_the_control_tokens():
    assert think_response("Hm.\n</think>\n\n\\boxed{2}", opened="<think>\n") == "<think>\nHm.\n</think>\n\n\\boxed{2}"
    assert think_response("<think>\nHm.</think>x") == "<think>\nHm.</think>x"
    assert think_response("Hm. no tags") == "<think>\nHm. no tags"
    bespoke = "<|begin_of_thought|>\n\nHm.\n\n<|end_of_thought|>\n\n"
    bespoke += "<|begin_of_solution|>\n\n\\boxed{2}\n\n<|end_of_solution|>"
    assert think_response(bespoke) == "<think>\n\nHm.\n\n</think>\n\n\n\n\\boxed{2}"
    assert short_response("  The answer is \\boxed{2}. ") == "<short>\nThe answer is \\boxed{2}."
    assert short_response("<think>\n\n</think>\n\n\\boxed{2}") == "<short>\n\\boxed{2}"  # Qwen3 without thinking
    assert short_response("<think>\nlong</think>\\boxed{2}") == "<short>\n<think>\nlong</think>\\boxed{2}"
    rewards = load_config().rewards
    assert verdict(short_response("<think>\nlong</think>\\boxed{2}"), "2", True, rewards) == "thinking"
    assert verdict(short_response("\\boxed{2} </think>"), "2", True, rewards) == "thinking"


def test_teacher_prompt_keeps_the_template_and_reports_an_opened_think(tmp_path):
    data = load_config().data
    tok = tiny.make_tokenizer(tmp_path / "r1", chat_template=tiny.CHATML_THINK)
    prompt, opened = teacher_prompt(tok, "What is 1+1?", data)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n") and opened == "<think>\n"
    content = user_turn("What is 1+1?", INSTRUCTION)[0]["content"]
    assert content in prompt
    tok = tiny.make_tokenizer(tmp_path / "chatml", chat_template=tiny.CHATML)
    assert teacher_prompt(tok, "What is 1+1?", data)[1] == ""


def test_think_file_layouts(tmp_path):
    config = load_config()
    rows = [
        {"problem": "P one", "response": "<think>\na\n</think>\n\\boxed{1}"},
        {"conversations": [{"from": "human", "value": "P  two"},
                           {"from": "gpt", "value": "<think>b</think>\\boxed{2}"}]},
        {"messages": [{"role": "user", "content": "P three"},
                      {"role": "assistant", "content": "<|begin_of_thought|>c<|end_of_thought|>\\boxed{3}"}]},
        {"question": "P one", "response": "<think>\nagain\n</think>\n\\boxed{1}"},
    ]  # fmt: skip
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    found, problems = read_think_file(str(path), config)
    assert problems == 3 and read_think_file(str(path), config, {"P two"}) == ({"P two": found["P two"]}, 3)
    assert found == {
        "P one": ["<think>\na\n</think>\n\\boxed{1}", "<think>\nagain\n</think>\n\\boxed{1}"],
        "P two": ["<think>b</think>\\boxed{2}"],
        "P three": ["<think>c</think>\\boxed{3}"],
    }
    path.write_text(json.dumps({"problem": "P", "text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"traces.jsonl: row 0: no text for distill.think_response_key"):
        read_think_file(str(path), config)


def test_think_file_generates_only_the_short_side(setup, tmp_path, monkeypatch):
    rows = setup["rows"]
    traces = [{"conversations": [{"from": "user", "value": r["problem"]},
                                 {"from": "assistant", "value": f"<think>\nok\n</think>\n\\boxed{{{r['answer']}}}"}]}
              for r in rows[:5]]  # fmt: skip
    traces.append({"problem": "a problem nobody asked", "response": "<think>x</think>\\boxed{1}"})
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(traces))
    sides = []
    real = distill_mod.Teacher.__init__
    spy = lambda self, side, *a: sides.append(side) or real(self, side, *a)  # noqa: E731
    monkeypatch.setattr(distill_mod.Teacher, "__init__", spy)
    out = tmp_path / "file"
    args = [a for a in _args(setup, out, f"distill.think_file={path}") if not a.startswith("distill.think_model=")]
    assert main(args) == 0
    assert sides == ["short"]
    report = json.loads((out / "report.json").read_text())
    assert report["problems"]["think_file"] == {"problems": 6, "matched": 5}
    assert report["models"]["think"]["correct"] == 5 and report["models"]["think"]["problems_without_samples"] == 3
    assert report["problems_with"] == {"both": 5, "think_only": 0, "short_only": 0, "neither": 3}


def test_the_vllm_engine_samples_the_same_rows(setup, finished, tmp_path, monkeypatch):
    """rollout.engine=vllm (the stand-in engine, tests/fake_vllm.py): one call per shard, a seed per request."""
    import fake_vllm

    vllm = fake_vllm.install(monkeypatch)
    out = tmp_path / "vllm"
    assert main(_args(setup, out, "rollout.engine=vllm")) == 0
    assert len(vllm.LLM.instances) == 2 and all(not i.kwargs["enable_sleep_mode"] for i in vllm.LLM.instances)
    assert [c for c in vllm.LLM.instances[0].calls if c == ("generate",)] == [("generate",)] * 3
    assert _rows(out / "hybrid.jsonl") == _expected_rows(setup)  # taught answers: the engine does not matter


def test_distill_setting_errors(setup, tmp_path, capsys):
    out = tmp_path / "bad"
    cases = [
        ([a for a in _args(setup, out) if not a.startswith("distill.short_model=")], "distill.short_model is not set"),
        ([*_args(setup, out), "distill.think_file=x.json"], "give one of distill.think_model"),
        ([*_args(setup, out), "distill.format=csv"], "distill.format must be one of jsonl, parquet"),
        ([*_args(setup, out), "distill.think_n=0"], "distill.think_n must be >= 1"),
    ]
    for args, message in cases:
        assert main(args) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match="distill.short_top_p must be in"):
        load_config(overrides=["distill.short_top_p=0"])
    assert not out.exists()


def test_sft_rows_keep_per_mode():
    from thinkless.train.data import Problem

    problems = [Problem("p", "1", "f:0"), Problem("q", "2", "f:1")]
    think = [[["t1", "correct"], ["t2", "wrong"], ["t3", "correct"]], []]
    short = [[["s1", "correct"], ["s2", "correct"]], [["s3", "wrong"]]]
    config = load_config(overrides=["distill.keep_per_mode=0"])
    rows, kept = sft_rows(problems, think, short, config.distill)
    assert [r["response"] for r in rows] == ["t1", "t3", "s1", "s2"]
    assert kept[1]["solved"] == {"think": False, "short": False}
    config = load_config()
    assert [r["response"] for r in sft_rows(problems, think, short, config.distill)[0]] == ["t1", "s1"]


def test_length_sample_stays_evenly_spread_and_bounded(tmp_path):
    """Token lengths of a million rows are a sample: with a cap of 4, the rows counted are every stride-th, the
    stride doubling as rows come, whatever the shard sizes."""
    from thinkless.train.distill_report import Tally

    (tmp_path / "m").mkdir()
    tok = tiny.make_tokenizer(tmp_path / "m")
    config = load_config(overrides=[f"distill.short_model={tmp_path / 'm'}"])
    rows = [{"problem": "p", "response": "<short>\n" + "1 " * i} for i in range(37)]
    for cut in ([37], [5, 13, 19], [1] * 37):
        tally, start = Tally(config, cap=4), 0
        for size in cut:
            empty = {"samples": [], "prompts_too_long": 0}
            tally.add(empty, empty, [], rows[start : start + size])
            start += size
        kept = [i for i, _ in tally.lengths["short"]]
        assert kept == list(range(0, 37, tally.stride["short"])) and 4 <= len(kept) < 8
        lengths = {i: n for i, (n, _) in tally.lengths["short"]}
        assert lengths[8] == len(tok("<short>\n" + "1 " * 8, add_special_tokens=False)["input_ids"]) + 1


def test_a_longer_problem_list_reuses_every_answer_already_made(setup, tmp_path, monkeypatch):
    """distill.limit=5, then the full 8: the shards now hold other problems, yet only problems 5-7 are sampled."""
    out = tmp_path / "grow"
    assert main(_args(setup, out, "distill.limit=5")) == 0
    sampled = []
    real = distill_mod.Teacher.sample
    monkeypatch.setattr(distill_mod.Teacher, "sample",
                        lambda self, ps, *a: sampled.append((self.side, len(ps))) or real(self, ps, *a))  # fmt: skip
    assert main(_args(setup, out)) == 0
    assert sampled == [("think", 1), ("think", 2), ("short", 1), ("short", 2)]
    assert _rows(out / "hybrid.jsonl") == _expected_rows(setup)


def test_the_vllm_engine_never_shares_a_seed_between_samples(setup, tmp_path, monkeypatch):
    """vLLM seeds a request's n samples seed + 0 .. n-1: requests are seeded n apart."""
    import fake_vllm

    vllm = fake_vllm.install(monkeypatch)
    seen = []
    real = vllm.LLM.generate
    monkeypatch.setattr(vllm.LLM, "generate", lambda self, prompts, params, **kw: seen.append(params)
                        or real(self, prompts, params, **kw))  # fmt: skip
    out = tmp_path / "seeds"
    assert main(_args(setup, out, "rollout.engine=vllm", "distill.think_n=3", "distill.short_n=2")) == 0
    children = [p.seed + k for call in seen for p in call for k in range(p.n)]
    assert len(children) == 3 * 8 + 2 * 8 and len(set(children)) == len(children)


def test_prompts_longer_than_max_prompt_tokens_are_not_sampled(setup, tmp_path):
    """Each teacher's prompt is measured in its own tokens with its own template (the think one's is longer)."""
    from thinkless.train.distill_teacher import teacher_tokenizer

    lengths = {}
    for side, folder in setup["teachers"].items():
        tok = teacher_tokenizer(str(folder))
        lengths[side] = [len(tok(teacher_prompt(tok, r["problem"], load_config().data)[0])["input_ids"])
                         for r in setup["rows"]]  # fmt: skip
    limit = sorted(lengths["short"])[4]
    out = tmp_path / "long"
    code = main(_args(setup, out, f"data.max_prompt_tokens={limit}"))
    report = json.loads((out / "report.json").read_text())
    fits = {side: [n <= limit for n in values] for side, values in lengths.items()}
    for side in ("think", "short"):
        assert report["models"][side]["prompts_too_long"] == fits[side].count(False) > 0
        assert report["models"][side]["samples"] == fits[side].count(True)
    index = {r["problem"]: i for i, r in enumerate(setup["rows"])}
    expected = [r for r in _expected_rows(setup) if fits[r["response"][1:6]][index[r["problem"]]]]
    assert code == 0 and _rows(out / "hybrid.jsonl") == expected


def test_no_verified_answer_is_an_error_with_the_report_written(setup, tmp_path, capsys):
    """Problems 6 and 7: both teachers are wrong there."""
    problems = tmp_path / "hard.json"
    problems.write_text(json.dumps(setup["rows"][6:]))
    out = tmp_path / "none"
    args = [a if not a.startswith("data.train_files=") else f"data.train_files=[{problems}]" for a in _args(setup, out)]
    assert main(args) == 2
    assert "no answer was verified correct" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["problems_with"]["neither"] == 2


def test_template_args_and_known_instructions(tmp_path, capsys):
    from thinkless.train.distill_teacher import trace_problem_key

    template = tiny.CHATML.replace(
        "<|im_start|>assistant\n{% endif %}",
        "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
        "{% endif %}{% endif %}",
    )  # Qwen3's switch
    tok = tiny.make_tokenizer(tmp_path / "q3", chat_template=template)
    data = load_config().data
    prompt, opened = teacher_prompt(tok, "2+2?", data, {"enable_thinking": False})
    assert prompt.endswith("assistant\n<think>\n\n</think>\n\n") and opened == ""
    bad = ["distill", "distill.short_model=x", "distill.think_file=y.json", "distill.short_template_args=[thinking]"]
    assert main(bad) == 2
    assert "distill.short_template_args: 'thinking' must look like key=value" in capsys.readouterr().err
    assert (
        trace_problem_key("Return your final response within \\boxed{}. What is  1+1?", INSTRUCTION) == "What is 1+1?"
    )
    assert trace_problem_key(f"What is 1+1? {INSTRUCTION}", INSTRUCTION) == "What is 1+1?"


def test_damaged_shards_and_leftovers_are_made_again(setup, finished, tmp_path):
    """A shard cut short (after it was written) is generated again; one that ends well but does not load is moved
    aside with an error, then generated again; a killed process's temporary files are removed."""
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(finished, out)
    d = _digests(setup)
    cut = out / "short" / f"{d[1]}.json"
    cut.write_bytes(cut.read_bytes()[:100])
    (out / "think" / ".x.json.999999999.tmp").write_text("{")
    assert main(_args(setup, out)) == 0
    assert not (out / "think" / ".x.json.999999999.tmp").exists()
    assert cut.read_bytes() == (finished / "short" / f"{d[1]}.json").read_bytes()
    bad = out / "think" / f"{d[2]}.json"
    bad.write_text('{"problems": [], "prompts_too_long": 0}')  # whole JSON, the wrong problems
    assert main(_args(setup, out)) == 2
    assert (out / "think" / f"{d[2]}.json.bad").is_file() and not bad.exists()
    assert main(_args(setup, out)) == 0
    assert (out / "hybrid.jsonl").read_bytes() == (finished / "hybrid.jsonl").read_bytes()


def test_a_run_that_fails_before_writing_claims_nothing(setup, tmp_path, capsys):
    """A wrong think model (a folder with a tokenizer and no model) stops the run; the corrected run then starts."""
    broken = tmp_path / "tokenizer-only"
    tiny.make_tokenizer(broken, chat_template=tiny.CHATML_THINK)
    out = tmp_path / "claims"
    args = [a for a in _args(setup, out) if not a.startswith("distill.think_model=")]
    assert main([*args, f"distill.think_model={broken}"]) == 2
    assert "distill.think_model=" in capsys.readouterr().err
    assert main(_args(setup, out)) == 0
    assert _rows(out / "hybrid.jsonl") == _expected_rows(setup)


def test_rebuilding_needs_no_teacher_and_answers_are_not_repeated(setup, finished, tmp_path, capsys):
    import shutil

    out = tmp_path / "rebuild"
    shutil.copytree(finished, out)
    moved = tmp_path / "elsewhere"
    shutil.copytree(setup["teachers"]["think"], moved)
    args = [
        a if not a.startswith("distill.think_model=") else f"distill.think_model={moved}" for a in _args(setup, out)
    ]
    assert main([*args, "distill.keep_per_mode=0"]) == 2  # another model: refused, naming the key
    assert "made with model=" in capsys.readouterr().err
    (out / "short" / "settings.json").unlink()
    assert main([*_args(setup, out), "distill.keep_per_mode=0"]) == 2
    assert "holds answers but no settings.json" in capsys.readouterr().err
    shutil.copy(finished / "short" / "settings.json", out / "short" / "settings.json")
    assert main([*_args(setup, out), "distill.keep_per_mode=0", "model.dtype=bfloat16"]) == 0  # dtype: generation only
    rows = _rows(out / "hybrid.jsonl")
    assert len({json.dumps(r) for r in rows}) == len(rows)


def test_more_user_mistakes_are_one_line(setup, tmp_path, capsys):
    out = tmp_path / "mistakes"
    cases = [
        (['distill.short_template_args=[enable_thinking="no]'], "distill.short_template_args: 'enable_thinking=\"no'"),
        (["distill.think_max_tokens=2000"], "data.max_prompt_tokens + distill.think_max_tokens = 2900 is more than"),
        (["distill.short_model=/nonexistent/model"], "distill.short_model='/nonexistent/model': no such folder"),
        (["distill.short_model=/nonexistent/model.gguf"], "distill.short_model='/nonexistent/model.gguf': no such"),
        (["model.path=/nonexistent/student"], "model.path='/nonexistent/student': no such folder"),
    ]
    for extra, message in cases:
        assert main([*_args(setup, out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
    assert not (out / "think").exists() and not (out / "short").exists()


def test_the_guard_reads_benchmarks_in_their_own_layout_and_traces_match_across_instructions(setup, tmp_path):
    rows = [{"question": r["problem"], "answer": r["answer"]} for r in setup["rows"][:3]]
    rows.append({"question": json.loads((tiny.DATA / "math500.json").read_text())[5]["problem"], "answer": "1"})
    (tmp_path / "q.json").write_text(json.dumps(rows))
    config = load_config(overrides=[f"data.train_files=[{tmp_path / 'q.json'}]", "data.problem_key=question",
                                    f"data.val_files=[{tiny.DATA / 'math500.json'}]"])  # fmt: skip
    problems, counts = gather_problems(config)
    assert len(problems) == 3 and counts["contaminated"] == {str(tiny.DATA / "math500.json"): 1}
    # traces in two files (a glob), their problems behind OpenThoughts-114k's instruction, the problems file's too
    bespoke = "Return your final response within \\boxed{}. "
    for i, part in enumerate((setup["rows"][:2], setup["rows"][2:4])):
        traces = [{"problem": bespoke + r["problem"], "response": f"<think>ok</think>\\boxed{{{r['answer']}}}"}
                  for r in part]  # fmt: skip
        (tmp_path / f"traces-{i}.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    (tmp_path / "p.json").write_text(json.dumps([dict(r, problem=bespoke + r["problem"]) for r in setup["rows"][:4]]))
    out = tmp_path / "glob"
    args = [a for a in _args(setup, out) if not a.startswith(("distill.think_model=", "data.train_files="))]
    assert (
        main([*args, f"distill.think_file={tmp_path / 'traces-*.jsonl'}", f"data.train_files=[{tmp_path / 'p.json'}]"])
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["problems"]["think_file"] == {"problems": 4, "matched": 4} and report["kept_rows"]["think"] == 4
