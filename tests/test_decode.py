"""The static-cache, compiled HF rollout (`rollout.compile`) against the path it replaces, Hugging Face `generate`.

With `decode.EXACT_MULTINOMIAL` both draw with torch.multinomial from the same random numbers, so the same seed must
give the same tokens; the recorded log-probs and everything assembled from them must agree too. Three decoder
families (Qwen2 with q/k/v biases, Llama, Qwen3 with per-head q/k norms), left-padded prompts of several lengths,
temperature, top_p, and an extra stop token that ends rows early (and the whole batch before max_new_tokens).
"""

import functools
import json
import warnings
from types import SimpleNamespace

import pytest
import tiny
import torch

from thinkless.train import decode
from thinkless.train.model import load_tokenizer
from thinkless.train.rollout import generate

PROMPTS = [
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nFind the sum of all real x with x^2 = 9.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nHow many primes are below 30? Answer in a box.<|im_end|>\n<|im_start|>assistant\n",
]


def _config(kind: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=kind != "llama",
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "llama":  # SmolLM2's family; untied head, rope scaled as Llama 3 does
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 10000.0}  # fmt: skip
        return LlamaConfig(**common, rope_parameters=rope)
    return Qwen3Config(**common, head_dim=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("decode")
    tiny.make_tokenizer(root / "tok")
    tokenizer = load_tokenizer(str(root / "tok"))
    out = {}
    for i, kind in enumerate(("qwen2", "llama", "qwen3")):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(_config(kind, tokenizer), dtype=torch.float32)
        with torch.no_grad():  # logits spread like a trained model's: samples that are neither uniform nor fixed
            model.lm_head.weight.mul_(8.0)
        out[kind] = model
    return tokenizer, out


def _rollout(**kw):
    return SimpleNamespace(**{"n": 3, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 20, "compile": False, **kw})


def _both(model, tokenizer, settings, compile, seed=0, fast_settings=None):
    """generate's rollout and the static-cache path's (compiled or not; `fast_settings`: its extra settings)."""
    fast_settings = {**settings, **(fast_settings or {}), "compile": True}
    torch.manual_seed(seed)
    plain = generate(model, tokenizer, PROMPTS, _rollout(**settings))
    torch.manual_seed(seed)
    fast = generate(model, tokenizer, PROMPTS, _rollout(**fast_settings)) if compile else None
    if not compile:  # the static-cache path without torch.compile
        original = decode.sample
        decode.sample = lambda *a, **k: original(*a, **{**k, "compile": False})
        try:
            torch.manual_seed(seed)
            fast = generate(model, tokenizer, PROMPTS, _rollout(**fast_settings))
        finally:
            decode.sample = original
    return plain, fast


def _assert_same(plain, fast):
    assert torch.equal(plain.input_ids, fast.input_ids)
    assert torch.equal(plain.attention_mask, fast.attention_mask)
    assert torch.equal(plain.response_mask, fast.response_mask)
    assert torch.equal(plain.prompt_index, fast.prompt_index) and torch.equal(plain.lengths, fast.lengths)
    assert plain.texts == fast.texts and plain.modes == fast.modes and plain.prompt_width == fast.prompt_width
    torch.testing.assert_close(fast.rollout_logp, plain.rollout_logp, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_same_tokens_and_logprobs_as_generate(models, kind, compile, monkeypatch):
    monkeypatch.setattr(decode, "EXACT_MULTINOMIAL", True)
    tokenizer, all_models = models
    model = all_models[kind]
    assert decode.unsupported(model, 64) is None
    plain, fast = _both(model, tokenizer, {"top_p": 0.8 if kind == "qwen3" else 1.0}, compile)
    _assert_same(plain, fast)
    assert plain.input_ids.shape[1] == plain.prompt_width + 20  # no row stopped: all 20 tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decodes_like_generate(models):
    """On CUDA the compiled step draws with torch.multinomial's numbers (no switch needed): the tokens are
    generate's, with the step replayed as a CUDA graph too (`rollout.cuda_graphs`); the graph runs the compiled
    step's own kernels, so its log-probs are the compiled step's bit for bit."""
    tokenizer, all_models = models
    model = all_models["qwen2"].cuda()
    try:
        for settings in ({}, {"top_p": 0.8, "max_new_tokens": 33}):  # a second shape: compiled again
            plain, fast = _both(model, tokenizer, settings, compile=True)
            _assert_same(plain, fast)
            recorded = decode.CAPTURES["recorded"]
            _, graphed = _both(model, tokenizer, settings, compile=True, fast_settings={"cuda_graphs": True})
            assert decode.CAPTURES["recorded"] == recorded + 1 and not decode.CAPTURES["failed"]  # no fallback
            _assert_same(plain, graphed)
            assert torch.equal(graphed.rollout_logp, fast.rollout_logp)
    finally:
        model.cpu()


def test_multinomial_is_torch_multinomial():
    """`decode.multinomial` (one sample, capturable) draws torch.multinomial's tokens from the same random numbers
    and leaves the generator where torch.multinomial leaves it, also with zero-probability entries (top_p)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device, (rows, vocab) in ((d, shape) for d in devices for shape in ((1, 7), (9, 1000), (64, 50000))):
        gen = torch.Generator(device).manual_seed(rows)
        probs = torch.rand(rows, vocab, device=device, generator=gen).pow(8)
        probs[:, ::3] = 0.0
        probs = probs / probs.sum(-1, keepdim=True)
        torch.manual_seed(11)
        expected, state = torch.multinomial(probs, 1).squeeze(1), _rng_state(device)
        torch.manual_seed(11)
        assert torch.equal(decode.multinomial(probs), expected) and torch.equal(_rng_state(device), state)
        assert probs.gather(1, expected[:, None]).gt(0).all()


def _rng_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


class _Replayer:
    """The CPU stand-in for a recorded CUDA graph: replaying reruns the recorded step on the same tensors."""

    def __init__(self, step):
        self.step, self.replays, self.released = step, 0, False

    def replay(self):
        self.replays += 1
        self.step()

    def reset(self):
        self.released = True


@pytest.mark.parametrize("capture", ["recorded", "failed", "failed before"])
def test_replayed_steps_decode_as_stepping(models, monkeypatch, capture):
    """`rollout.cuda_graphs`' loop, on CPU with a stand-in for the graph: the first step runs (the warm-up) while
    the next is recorded (not run), then the recording is replayed once a token until every row has stopped, and
    released at the end. Tokens, log-probs and where the batch stops are stepping's; a failed capture goes on
    stepping, and so does a later rollout on a device where a capture failed before (the real warm_and_capture:
    it runs the step it was given, uncaptured). (That a real graph replays a step faithfully, the CUDA test
    checks.)"""
    monkeypatch.setattr(decode, "EXACT_MULTINOMIAL", True)
    monkeypatch.setattr(decode, "GRAPH_DEVICES", ("cpu",))
    recorded = []

    def warm_and_capture(step, device):
        step()  # the warm-up step runs; recording the next one runs nothing
        recorded.append(_Replayer(step) if capture == "recorded" else None)
        return recorded[-1]

    if capture == "failed before":
        monkeypatch.setattr(decode, "_CAPTURE_FAILED", {0})
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # the device's index (the model is on CPU)
    else:
        monkeypatch.setattr(decode, "warm_and_capture", warm_and_capture)
    tokenizer, all_models = models
    model = all_models["qwen2"]
    settings = {"max_new_tokens": 30}
    torch.manual_seed(3)
    probe = generate(model, tokenizer, PROMPTS, _rollout(**settings))
    stops = sorted(set(probe.input_ids[:, probe.prompt_width + 9].tolist()) - {tokenizer.eos_token_id})
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, *stops])
    plain, fast = _both(model, tokenizer, settings, compile=False, seed=3, fast_settings={"cuda_graphs": True})
    _assert_same(plain, fast)
    width = fast.input_ids.shape[1] - fast.prompt_width
    assert width == int(plain.lengths.max()) <= 10  # every row stopped by its tenth token
    if capture == "recorded":  # one drawn by the prefill's logits, one by the warm-up step, the rest by replays
        assert len(recorded) == 1 and recorded[0].replays == width - 2 and recorded[0].released


def test_sliding_windows_in_reach_fall_back(models):
    """Mistral reads its config's sliding_window at every call (Qwen2/3 set it per layer): a window shorter than
    prompt + response means plain generate; a longer one, the same tokens as generate."""
    from transformers import MistralConfig

    tokenizer, _ = models
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=42,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert "sliding window of 42" in decode.unsupported(model, 60)
    assert decode.unsupported(model, 42) is None
    model.config.sliding_window = 4096
    with pytest.MonkeyPatch.context() as m:
        m.setattr(decode, "EXACT_MULTINOMIAL", True)
        _assert_same(*_both(model, tokenizer, {}, compile=False))


def test_generation_config_processors_are_off_on_both_paths(models, monkeypatch):
    """A model's generation_config may ask for processors (suppressed tokens, a minimum length, ...) that would
    reshape what is sampled away from the temperature softmax the loss assumes: neither path applies them."""
    monkeypatch.setattr(decode, "EXACT_MULTINOMIAL", True)
    tokenizer, all_models = models
    model = all_models["qwen2"]
    torch.manual_seed(0)
    before = generate(model, tokenizer, PROMPTS, _rollout())
    common = int(torch.bincount(before.input_ids[:, before.prompt_width :].reshape(-1)).argmax())
    monkeypatch.setattr(model.generation_config, "suppress_tokens", [common])
    monkeypatch.setattr(model.generation_config, "min_new_tokens", 30)
    plain, fast = _both(model, tokenizer, {}, compile=False)
    _assert_same(plain, fast)
    assert torch.equal(plain.input_ids, before.input_ids)  # as if the config said nothing


def test_stop_tokens_end_rows_and_the_batch(models, monkeypatch):
    """An extra stop token of the model's generation config (chat models have several) ends its row there, the row
    is padded after; when every row has stopped, both paths stop before max_new_tokens."""
    monkeypatch.setattr(decode, "EXACT_MULTINOMIAL", True)
    tokenizer, all_models = models
    model = all_models["qwen2"]
    settings = {"max_new_tokens": 40, "top_p": 0.9}
    torch.manual_seed(3)
    probe = generate(model, tokenizer, PROMPTS, _rollout(**settings))
    # Each row's fifth token becomes a stop: the same seed then samples the same rows up to their first stop, so
    # every row ends within five tokens, and the batch long before max_new_tokens.
    stops = sorted(set(probe.input_ids[:, probe.prompt_width + 4].tolist()) - {tokenizer.eos_token_id})
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, *stops])
    plain, fast = _both(model, tokenizer, settings, compile=False, seed=3)
    _assert_same(plain, fast)
    assert (plain.lengths <= 5).all() and plain.input_ids.shape[1] == plain.prompt_width + int(plain.lengths.max())
    last = plain.input_ids[torch.arange(9), plain.prompt_width + plain.lengths - 1]
    assert torch.isin(last, torch.tensor(stops)).all()  # each response ends with its stop token, kept
    assert (plain.input_ids[~plain.attention_mask.bool()] == tokenizer.pad_token_id).all()  # pads after it


def test_exponential_race_samples_the_distribution():
    """The CPU draw: argmax p / E with E = -log(1 - U) is a sample of p (the exponential clocks' race); a zero-
    probability entry never wins, even against U = 0; and over a Qwen-sized vocabulary the tail of near-zero
    probabilities is not drawn (float32 uniforms hit U = 0 once in 2^24 entries, which made a junk token win about
    1 % of the draws at 150k entries)."""
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).expand(200_000, 5)
    gen = torch.Generator().manual_seed(0)
    picked = decode.exponential_race(probs, torch.rand(probs.shape, generator=gen, dtype=torch.float64))
    freq = torch.bincount(picked, minlength=5).double() / len(picked)
    sigma = (probs[0].double() * (1 - probs[0].double()) / len(picked)).sqrt()
    assert ((freq - probs[0]).abs() <= 5 * sigma + 1e-12).all(), freq
    assert freq[4] == 0
    zero = torch.zeros(1, 5, dtype=torch.float64)  # U = 0 everywhere: E at its floor, the largest p wins
    assert decode.exponential_race(probs[:1], zero).item() == 0
    V = 151_936
    logits = torch.full((1, V), -40.0)
    logits[0, :4] = torch.tensor([2.0, 1.0, 0.5, 0.0])  # four real candidates; the rest ~1e-18 each
    torch.manual_seed(0)
    tokens = torch.cat([decode.draw(logits.expand(256, V), 1.0, 1.0, race=True)[0] for _ in range(16)])
    assert tokens.max() < 4


def test_cpu_race_keeps_the_recorded_logprobs_exact(models):
    """The default CPU path (exponential race on uniforms): other random numbers than generate's, but the recorded
    log-probs are still those of the sampling distribution (the trainer's softmax at the temperature, recomputed
    by a full forward)."""
    from thinkless.train.config import AlgoConfig
    from thinkless.train.logprobs import sequence_logprobs

    tokenizer, all_models = models
    model = all_models["llama"]
    torch.manual_seed(0)
    ro = generate(model, tokenizer, PROMPTS, _rollout(compile=True))
    full = sequence_logprobs(model, ro, 0.7, AlgoConfig())
    response = ro.response_mask[:, 1:]
    assert (ro.rollout_logp - full)[response].abs().max() < 1e-4
    assert len(set(map(tuple, ro.input_ids[:, ro.prompt_width :].tolist()))) == 9  # nine different samples


def test_unsupported_models_fall_back_to_generate(models, tmp_path):
    """A model outside the Llama family (GPT-2 here) samples with plain generate under rollout.compile, with one
    warning that says why; the tokens are generate's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer, _ = models
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256,
                                       eos_token_id=tokenizer.eos_token_id))  # fmt: skip
    assert "gpt2" in decode.unsupported(model, 64)
    torch.manual_seed(0)
    plain = generate(model, tokenizer, PROMPTS, _rollout())
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="rollout.compile: model_type 'gpt2'.*plain generate"):
        fast = generate(model, tokenizer, PROMPTS, _rollout(compile=True))
    assert torch.equal(plain.input_ids, fast.input_ids)


def test_a_recompile_limit_runs_that_shape_eagerly(models, monkeypatch):
    """More shapes than the recompile limit: that shape runs eagerly from then on (one warning, no second try per
    token); compiling stays on for the others."""
    monkeypatch.setattr(decode, "_FAILED", set())
    monkeypatch.setattr(decode, "_EAGER", set())
    calls = []

    def over_the_limit(fn):
        def fail(*a, **k):
            calls.append(1)
            raise torch._dynamo.exc.FailOnRecompileLimitHit("recompile_limit reached")

        return fail

    monkeypatch.setattr(decode, "_compiled", over_the_limit)
    decode.warn_once.cache_clear()
    tokenizer, all_models = models
    with pytest.warns(UserWarning, match="more than 32 shapes; the new ones decode without compiling"):
        generate(all_models["qwen2"], tokenizer, PROMPTS, _rollout(compile=True))
    assert len(calls) == 2  # the plain call and the one under the raised limit, once for the whole rollout
    assert not decode._FAILED and len(decode._EAGER) == 1


def test_uniforms_are_fine_grained_inside_a_compiled_graph():
    """Inductor draws torch.rand as float32 on a 2^-31 grid whatever the dtype asked; fine_uniform's per-row shift
    moves the values off it, so U = 0 (the race's junk-token atom) is out of reach there too."""
    draw = torch.compile(lambda: decode.fine_uniform((512, 4096), torch.device("cpu")), fullgraph=True)
    u = draw()
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1
    on_grid = u * 2.0**31 == (u * 2.0**31).round()
    assert on_grid.double().mean() < 0.01  # off the 2^-31 grid (but for rows whose shift happens to be 0)
    assert abs(float(u.mean()) - 0.5) < 0.002 and abs(float(u.var()) - 1 / 12) < 0.001


def test_a_failed_compile_decodes_eagerly(models, monkeypatch):
    """torch.compile unavailable (no C++ compiler, say): one warning, then the same step without it."""
    monkeypatch.setattr(decode, "EXACT_MULTINOMIAL", True)
    monkeypatch.setattr(decode, "_FAILED", set())
    monkeypatch.setattr(decode, "_compiled", functools.cache(lambda fn: torch.compile(fn)))

    def broken(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("Compiler: cc not found\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    tokenizer, all_models = models
    model = all_models["qwen2"]
    torch.manual_seed(0)
    plain = generate(model, tokenizer, PROMPTS, _rollout())
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = generate(model, tokenizer, PROMPTS, _rollout(compile=True))
    messages = [str(w.message) for w in caught if "rollout.compile" in str(w.message)]
    assert messages == ["rollout.compile: torch.compile failed (Compiler: cc not found); decoding without it"]
    _assert_same(plain, fast)


def test_rl_step_with_the_compiled_rollout(models, tmp_path):
    """`thinkless-train rl rollout.compile=true`: two steps train, the samples' recorded log-probs agree with the
    trainer's (rollout_logp_diff), and the on-policy shortcut ran."""
    from thinkless.train.config import load_config
    from thinkless.train.rl import run_rl

    tok = tiny.make_tokenizer(tmp_path / "base")
    tiny.make_model(tmp_path / "base", tok)
    rows = json.loads((tiny.DATA / "math_train.json").read_text())[:8]
    (tmp_path / "rl.json").write_text(json.dumps([{"problem": r["problem"], "answer": r["answer"]} for r in rows]))
    run_rl(load_config(None, [
        f"model.path={tmp_path / 'base'}", f"data.train_files=[{tmp_path / 'rl.json'}]",
        f"trainer.output_dir={tmp_path / 'run'}", "trainer.total_steps=2", "trainer.batch_size=2", "rollout.n=4",
        "rollout.max_new_tokens=10", "rollout.compile=true", "algo.entropy_coef=0.01", "trainer.device=cpu",
    ]))  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["logprob_path"] == "on_policy" and r["updates"] == 1 and r["samples"] == 8
        assert r["rollout_logp_diff"] < 1e-4


def test_both_steps_take_the_mask_where_the_compile_cache_reads_it():
    """`_run` keys its compiled shapes on the mask argument: both steps must hold it at the same position."""
    import inspect

    for step in (decode.decode_step, decode.sample_step):
        assert list(inspect.signature(step).parameters)[decode.MASK_ARG] == "mask"
