"""`thinkless-train eval` in the paper's protocol on a tiny random Qwen2 and real MATH-500 problems: seeds, the
table, forced modes, prompt tokens, the oracle router; and `validate`, the RL loop's periodic validation (also
under torchrun with 2 gloo ranks: this file is that worker when run as a script)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny
import torch

from thinkless.train.config import INSTRUCTION, load_config

MATH500 = tiny.DATA / "math500.json"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A 2-layer model of width 32 gains nothing from threads; on a shared 2-core CPU two threads contending with
    another process made these tests 10x slower (22 s against 2 s for the seeds test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = tiny.make_tokenizer(root / "base")
    tiny.make_model(root / "base", tok)
    return root / "base"


def _config(base, out, *extra):
    settings = [f"model.path={base}", f"data.val_files=[{MATH500}]", f"trainer.output_dir={out}", "rollout.n=1"]
    settings += ["rollout.max_new_tokens=16", "rollout.temperature=1.0", "trainer.batch_size=16", "trainer.device=cpu"]
    return load_config(None, [*settings, *extra])


def _eval(base, out, *extra):
    from thinkless.train.eval import run_eval

    (report,) = run_eval(_config(base, out, *extra))
    return report


def _samples(report, seed_index):
    n = report["samples_per_seed"]
    part = slice(seed_index * n, (seed_index + 1) * n)
    return [(p["modes"][part], p["tokens"][part]) for p in report["problems"]]


def test_seeds_table_and_reruns(base, tmp_path):
    """Five seeds, one sample per problem each: means and std across seeds, the paper's table; the same seeds give
    the same report, other seeds another."""
    seeds = ["eval.seeds=[0,1,2,3,4]", "eval.limit=16"]
    report = _eval(base, tmp_path / "a", *seeds)
    saved = json.loads((tmp_path / "a" / "eval" / "math500.json").read_text())
    assert saved == report
    for key in ("accuracy", "think_ratio", "mean_tokens", "n", "accuracy_short", "accuracy_think",
                "mean_tokens_short", "mean_tokens_think", "format_errors"):  # fmt: skip
        assert key in report, key
    assert report["seeds"] == [0, 1, 2, 3, 4] and report["n"] == 5 * 16 and len(report["problems"]) == 16
    assert [r["seed"] for r in report["per_seed"]] == [0, 1, 2, 3, 4] and all(r["n"] == 16 for r in report["per_seed"])
    for key in ("accuracy", "think_ratio", "mean_tokens"):
        values = [r[key] for r in report["per_seed"]]
        assert report[key] == pytest.approx(statistics.fmean(values))
        assert report["std"][key] == pytest.approx(statistics.pstdev(values))
    tokens = [t for p in report["problems"] for t in p["tokens"]]
    assert report["mean_tokens"] == pytest.approx(sum(tokens) / len(tokens))
    assert len({tuple(map(str, _samples(report, k))) for k in range(5)}) > 1  # each seed samples anew

    table = (tmp_path / "a" / "eval" / "table.md").read_text().splitlines()
    assert table[0] == "| file | mode | accuracy | think % | tokens | n |"
    row = next(line for line in table if line.startswith("| math500 | model |"))
    acc, think, length = (cell.strip() for cell in row.split("|")[3:6])
    assert acc == f"{report['accuracy']:.3f} ± {report['std']['accuracy']:.3f}"
    assert think == f"{100 * report['think_ratio']:.1f} ± {100 * report['std']['think_ratio']:.1f}"
    assert length == f"{report['mean_tokens']:.1f} ± {report['std']['mean_tokens']:.1f}"

    assert _eval(base, tmp_path / "b", *seeds) == report  # a rerun is identical
    # Each (seed, file) pass is seeded on its own: seed 4 samples what it sampled among the five; seed 9 differs.
    other = _eval(base, tmp_path / "c", "eval.seeds=[4,9]", "eval.limit=16")
    assert _samples(other, 0) == _samples(report, 4) and _samples(other, 1) != _samples(report, 4)


def test_forced_modes_and_the_oracle(base, tmp_path, monkeypatch):
    """force_mode appends the control token to every prompt; every sample then has that mode. Both modes measured
    in one folder give the oracle router's report and table rows."""
    import thinkless.train.eval as ev
    from thinkless.train.rollout import generate

    prompts = []

    def spy(model, tokenizer, batch, rollout):
        prompts.extend(batch)
        return generate(model, tokenizer, batch, rollout)

    monkeypatch.setattr(ev, "generate", spy)
    out = tmp_path / "run"
    reports = {}
    for mode, token in (("think", "<think>"), ("short", "<short>")):
        prompts.clear()
        reports[mode] = _eval(base, out, f"eval.force_mode={mode}", "eval.limit=8", "eval.seeds=[0,1]")
        assert len(prompts) == 2 * 8 and all(p.endswith("<|im_start|>assistant\n" + token) for p in prompts)
        assert all(m == mode for p in reports[mode]["problems"] for m in p["modes"])
        assert reports[mode]["think_ratio"] == (1.0 if mode == "think" else 0.0)
        other = "short" if mode == "think" else "think"
        assert reports[mode][f"accuracy_{other}"] is None and reports[mode]["format_errors"] == 0
        assert json.loads((out / "eval" / mode / "math500.json").read_text()) == reports[mode]
    oracle = json.loads((out / "eval" / "oracle" / "math500.json").read_text())
    assert oracle == ev.oracle(reports["short"], reports["think"])
    assert oracle["force_mode"] == "oracle" and oracle["n"] == 16
    table = (out / "eval" / "table.md").read_text()
    assert "| math500 | short |" in table and "| math500 | think |" in table and "| math500 | oracle |" in table


def test_forced_answers_are_scored_in_their_mode(monkeypatch):
    """A forced prompt's generation holds no control token (the prompt has it): the sample takes the forced mode, is
    scored as a response opening with its token, and counts that token."""
    import thinkless.train.eval as ev
    from thinkless.train.data import Example

    def fake(model, tokenizer, prompts, rollout):
        texts = ["</think> \\boxed{4}" if p.endswith("<think>") else "\\boxed{4}" for p in prompts]
        return SimpleNamespace(texts=texts, modes=[None] * len(prompts), prompt_index=torch.arange(len(prompts)),
                               lengths=torch.full((len(prompts),), 5))  # fmt: skip

    scored = []
    real_score = ev.score

    def spy(text, reference, mode, table):
        scored.append(text)
        return real_score(text, reference, mode, table)

    monkeypatch.setattr(ev, "generate", fake)
    monkeypatch.setattr(ev, "score", spy)
    tokenizer = lambda text, add_special_tokens: {"input_ids": text.split()}  # noqa: E731
    examples = [Example(prompt="what is 2+2?", answer="4")]
    config = load_config()
    free = ev._sample(None, tokenizer, examples, config, 1, "")
    assert free == [{"prompt_tokens": 3, "modes": [None], "correct": [False], "tokens": [5]}]  # no control token
    short = ev._sample(None, tokenizer, examples, config, 1, "short")
    assert short == [{"prompt_tokens": 3, "modes": ["short"], "correct": [True], "tokens": [6]}]
    think = ev._sample(None, tokenizer, examples, config, 1, "think")
    assert think == [{"prompt_tokens": 3, "modes": ["think"], "correct": [True], "tokens": [6]}]
    assert scored == ["\\boxed{4}", "<short>\\boxed{4}", "<think></think> \\boxed{4}"]


def test_count_prompt_tokens_adds_the_prompts(base, tmp_path):
    from thinkless.train.model import load_tokenizer

    plain = _eval(base, tmp_path / "a", "eval.limit=8", "eval.seeds=[3]")
    counted = _eval(base, tmp_path / "b", "eval.limit=8", "eval.seeds=[3]", "eval.count_prompt_tokens=true")
    tokenizer = load_tokenizer(str(base))
    rows = json.loads(MATH500.read_text())[:8]
    lengths = []
    for row in rows:  # the chat-templated user turn, tokenized by the tokenizer itself
        messages = [{"role": "user", "content": f"{row['problem'].strip()} {INSTRUCTION}"}]
        lengths.append(len(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]))
    assert [p["prompt_tokens"] for p in counted["problems"]] == lengths
    assert [p["tokens"] for p in counted["problems"]] == [p["tokens"] for p in plain["problems"]]  # same samples
    assert counted["mean_tokens"] == pytest.approx(plain["mean_tokens"] + sum(lengths) / len(lengths))
    assert counted["count_prompt_tokens"] is True and plain["count_prompt_tokens"] is False


def _problem(correct, tokens, prompt=5, answer="x"):
    return {"source": f"f:{answer}", "answer": answer, "prompt_tokens": prompt, "modes": [], "correct": correct,
            "tokens": tokens}  # fmt: skip


def test_oracle_router_on_hand_made_results():
    """Per problem and sample: short when it is right, else think when that is right, else wrong (counted short)."""
    from thinkless.train.eval import oracle, summarize

    def forced(mode, problems):
        for p in problems:
            p["modes"] = [mode] * len(p["correct"])
        return summarize("f.json", problems, [0, 1], 1, mode, False)

    # Two seeds, one sample each: [seed 0, seed 1].
    short = forced("short", [
        _problem([True, True], [10, 11], answer="a"),    # short right: short
        _problem([False, True], [12, 13], answer="b"),   # seed 0: only think right; seed 1: short right
        _problem([False, False], [8, 9], answer="c"),    # neither: wrong, counted short
        _problem([True, False], [7, 7], answer="d"),     # seed 1: only think right
    ])  # fmt: skip
    think = forced("think", [
        _problem([True, True], [100, 110], answer="a"),
        _problem([True, True], [90, 95], answer="b"),
        _problem([False, False], [120, 130], answer="c"),
        _problem([False, True], [80, 85], answer="d"),
    ])  # fmt: skip
    got = oracle(short, think)
    assert [p["modes"] for p in got["problems"]] == [["short", "short"], ["think", "short"], ["short", "short"],
                                                     ["short", "think"]]  # fmt: skip
    assert [p["correct"] for p in got["problems"]] == [[True, True], [True, True], [False, False], [True, True]]
    assert [p["tokens"] for p in got["problems"]] == [[10, 11], [90, 13], [8, 9], [7, 85]]
    seed0, seed1 = got["per_seed"]
    assert (seed0["accuracy"], seed0["think_ratio"], seed0["mean_tokens"]) == (0.75, 0.25, (10 + 90 + 8 + 7) / 4)
    assert (seed1["accuracy"], seed1["think_ratio"], seed1["mean_tokens"]) == (0.75, 0.25, (11 + 13 + 9 + 85) / 4)
    assert got["accuracy"] == 0.75 and got["think_ratio"] == 0.25 and got["std"]["accuracy"] == 0.0
    assert got["std"]["mean_tokens"] == pytest.approx(abs(115 / 4 - 118 / 4) / 2)
    assert got["accuracy_think"] == 1.0 and got["accuracy_short"] == pytest.approx(4 / 6)
    assert oracle(short, think, count_prompt=True)["mean_tokens"] == pytest.approx(got["mean_tokens"] + 5)
    # Reports of different problems or sampling do not pair.
    with pytest.raises(ValueError, match="different problems"):
        oracle(short, {**think, "problems": think["problems"][:3]})
    with pytest.raises(ValueError, match=r"different eval.seeds or rollout.n"):
        oracle(short, {**think, "seeds": [0, 2]})


def _val_files(tmp_path, n=6):
    rows = json.loads(MATH500.read_text())[:n]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [f"trainer.val_files=[{tmp_path / 'val.jsonl'}]", "trainer.val_n=2", "trainer.val_every=1"]


def test_validate_leaves_the_training_stream_and_mode_alone(base, tmp_path):
    from thinkless.train.eval import validate, validation_examples
    from thinkless.train.run import start_run

    config = _config(base, tmp_path / "rl", *_val_files(tmp_path), "algo.lr=1e-4")
    run = start_run(config, "rl")
    run.ready()
    assert run.model.training
    examples = validation_examples(config, run.tokenizer)
    torch.manual_seed(123)
    expected = torch.rand(4)  # what the training stream draws next, without validation
    torch.manual_seed(123)
    metrics = validate(run, config, step=3, examples=examples)
    assert torch.equal(torch.rand(4), expected)  # the stream goes on as if validation had not run
    assert run.model.training
    assert sorted(metrics) == ["val/val/accuracy", "val/val/mean_tokens", "val/val/think_ratio"]
    saved = json.loads((tmp_path / "rl" / "eval" / "step-3" / "val.json").read_text())
    assert saved["n"] == 2 * 6 and saved["samples_per_seed"] == 2
    assert metrics["val/val/think_ratio"] == saved["think_ratio"]
    assert validate(run, config, step=4) == metrics  # the same numbers every time: steps differ by the model alone


def test_validation_prompts_that_do_not_fit_are_dropped(base, tmp_path, capsys):
    from thinkless.train.data import DataError
    from thinkless.train.eval import validation_examples
    from thinkless.train.model import load_tokenizer

    tokenizer = load_tokenizer(str(base))
    config = _config(base, tmp_path, *_val_files(tmp_path), "data.max_prompt_tokens=130")
    kept = validation_examples(config, tokenizer)[str(tmp_path / "val.jsonl")]
    lengths = [len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"]) for e in kept]
    assert 0 < len(kept) < 6 and max(lengths) <= 130
    assert f"validation file {tmp_path / 'val.jsonl'}: dropped {6 - len(kept)} of 6 prompts" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"val.jsonl: no prompt fits data.max_prompt_tokens=5"):
        validation_examples(_config(base, tmp_path, *_val_files(tmp_path), "data.max_prompt_tokens=5"), tokenizer)


def test_validate_under_torchrun(base, tmp_path):
    """2 gloo ranks, the policy sharded by FSDP2: validation samples on each rank's rollout copy (no collective
    inside generation), gathers the records and gives every rank the same metrics; rank 0 writes."""
    import os

    args = [str(base), str(tmp_path), *_val_files(tmp_path, n=5)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # gloo's rare exit abort
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["same_twice"] and ranks[0]["training"] and ranks[0]["stream_kept"]
    saved = json.loads((tmp_path / "rl" / "eval" / "step-1" / "val.json").read_text())
    assert saved["n"] == 2 * 5 and ranks[0]["metrics"]["val/val/accuracy"] == saved["accuracy"]
    # Through an engine whose every generate is a collective (as vLLM's weight sync is), with shards of 2 and 3
    # problems at 2 per call: both ranks made the busiest rank's 2 calls, and all 5 problems were scored.
    assert [r["engine_calls"] for r in ranks] == [2, 2]
    assert ranks[0]["engine_metrics"] == ranks[1]["engine_metrics"]
    assert json.loads((tmp_path / "rl" / "eval" / "step-3" / "val.json").read_text())["n"] == 2 * 5


def _worker(base, out, *settings):
    """`test_validate_under_torchrun`'s ranks."""
    from thinkless.train.dist import shutdown
    from thinkless.train.eval import validate
    from thinkless.train.run import start_run

    config = _config(base, Path(out) / "rl", *settings)
    run = start_run(config, "rl")
    run.ready()
    assert run.dist.world == 2 and run.rollout_model is not None
    state = torch.get_rng_state()
    metrics = validate(run, config, step=1)
    kept = torch.equal(torch.get_rng_state(), state)
    again = validate(run, config, step=2)
    result = {"metrics": metrics, "same_twice": again == metrics, "training": run.model.training, "stream_kept": kept}

    import dataclasses

    from thinkless.train.rollout import generate

    class CollectiveEngine:  # stands in for vLLM: its weight sync is a collective in every generate
        def __init__(self):
            self.rollout, self.calls = config.rollout, 0

        def generate(self, model, tokenizer, prompts):
            self.calls += 1
            torch.distributed.all_gather_object([None] * 2, self.calls)  # pairs with the other rank's call
            return generate(run.rollout_model, tokenizer, prompts, self.rollout)

    engine = CollectiveEngine()
    two_per_call = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, batch_size=2))
    result["engine_metrics"] = validate(run, two_per_call, step=3, engine=engine)
    result["engine_calls"] = engine.calls
    (Path(out) / f"rank{run.dist.rank}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    _worker(*sys.argv[1:])


def test_a_broken_report_is_left_out_of_the_table(tmp_path, capsys):
    """An older eval cut short mid-write: the next eval's table skips that file and says so."""
    from thinkless.train.eval import folder_reports

    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "math500.json").write_text('{"accuracy": 0.')
    good = {"accuracy": 0.5, "think_ratio": 0.25, "mean_tokens": 10.0, "n": 4}
    (tmp_path / "math500.json").write_text(json.dumps(good))
    assert folder_reports(tmp_path) == [("math500", "model", good)]
    assert "not a readable report" in capsys.readouterr().out
