"""A stand-in for the part of vLLM's Python API that `thinkless.train.vllm_rollout` uses (as in vLLM 0.33: `LLM`,
`SamplingParams`, `RequestOutput`, `CompletionOutput`, `Logprob`), sampling on the CPU with a Hugging Face model.

vLLM cannot be installed where these tests run. The stand-in keeps the behaviour the engine relies on and checks
its side of the contract: it loads its own weights from the model folder (not the trainer's object), generation
asserts that weights and KV cache are awake, a level-2 sleep turns its weights to NaN (vLLM discards them), weights
arrive only through the worker's `reload_weights` under HF names, and log-probs are those of the processed
distribution (after temperature and top-p) when `logprobs_mode="processed_logprobs"`.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import torch


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, logprobs=None, stop_token_ids=None,
                 detokenize=True, seed=None, **unused):  # fmt: skip
        self.n, self.temperature, self.top_p, self.top_k = n, temperature, top_p, top_k
        self.max_tokens, self.logprobs, self.stop_token_ids, self.seed = max_tokens, logprobs, stop_token_ids, seed
        self.unused = unused


class _EngineModel:
    """What `apply_model` hands over: vLLM's model object, reduced to `load_weights` (HF names in, loaded names out)."""

    def __init__(self, hf_model):
        self.hf_model = hf_model

    def load_weights(self, weights):
        params = dict(self.hf_model.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                if name == "lm_head.weight" and self.hf_model.config.tie_word_embeddings:
                    continue  # tied to the embeddings, as vLLM skips it
                raise KeyError(f"vLLM has no parameter {name!r}")
            params[name].data.copy_(tensor.to(params[name].dtype))
            loaded.add(name)
        return loaded


class LLM:
    instances: list[LLM] = []
    include_stop_token = True  # vLLM keeps a stop token in token_ids; False tests the engine's fallback
    sleep_mode = True  # the platform's is_sleep_mode_available() (False: vLLM's CPU build)

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM

        if kwargs.get("enable_sleep_mode") and not LLM.sleep_mode:  # vLLM's ModelConfig refuses it at start
            raise ValueError("Sleep mode is not supported on current platform.")
        self.kwargs = kwargs
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.calls: list[tuple] = []
        self.weights_awake = self.kv_awake = True
        self.generator = torch.Generator().manual_seed(kwargs.get("seed", 0))
        LLM.instances.append(self)

    def sleep(self, level: int = 1, mode: str = "abort"):
        assert level in (0, 1, 2) and self.kwargs.get("enable_sleep_mode"), "sleep needs enable_sleep_mode=True"
        assert LLM.sleep_mode, "Sleep mode is not supported on current platform"
        self.calls.append(("sleep", level))
        self.weights_awake = self.kv_awake = False
        if level == 2:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags: list[str] | None = None) -> bool:
        tags = tags or ["weights", "kv_cache"]
        self.calls.append(("wake_up", tuple(tags)))
        self.weights_awake |= "weights" in tags
        self.kv_awake |= "kv_cache" in tags
        return self.weights_awake and self.kv_awake

    def apply_model(self, func):
        assert self.weights_awake, "weights written while asleep"
        self.calls.append(("apply_model",))
        return [func(_EngineModel(self.model))]

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        """The worker's reload_weights (vLLM >= 0.32): HF-named weights, checkpoint format. vLLM raises
        NotImplementedError for a method its worker lacks."""
        kwargs = kwargs or {}
        if method != "reload_weights":
            raise NotImplementedError(f"Method {method!r} is not implemented.")
        assert self.weights_awake, "weights written while asleep"
        assert kwargs.get("is_checkpoint_format", True), "HF-named weights are in checkpoint format"
        self.calls.append(("reload_weights",))
        return [_EngineModel(self.model).load_weights(kwargs["weights_iterator"])]

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.calls.append(("reset_prefix_cache",))
        return True

    @torch.no_grad()
    def generate(self, prompts, params: SamplingParams, use_tqdm=True):
        assert self.weights_awake and self.kv_awake, "generate on a sleeping engine"
        self.calls.append(("generate",))
        results = []
        each = params if isinstance(params, list) else [params] * len(prompts)  # vLLM: one, or one per prompt
        assert len(each) == len(prompts), "one SamplingParams per prompt"
        for i, (prompt, p) in enumerate(zip(prompts, each, strict=True)):
            ids = list(prompt["prompt_token_ids"])
            # A request with a seed: its k-th sample from a stream seeded seed + k (vLLM splits a request of n samples
            # into n children so seeded, vllm/v1/engine/parallel_sampling.py); else the engine's stream.
            streams = [
                self.generator if p.seed is None else torch.Generator().manual_seed(p.seed + k) for k in range(p.n)
            ]
            outputs = [self._sample(ids, p, k, streams[k]) for k in range(p.n)]
            results.append(RequestOutput(str(i), ids, outputs))
        return results

    def _sample(self, prompt: list[int], params: SamplingParams, index: int, generator) -> CompletionOutput:
        tokens, logprobs, finish, stop = [], [], "length", None
        for _ in range(params.max_tokens):
            logits = self.model(torch.tensor([prompt + tokens])).logits[0, -1].double() / params.temperature
            if params.top_p < 1.0:
                order = logits.argsort(descending=True)
                probs = logits[order].softmax(-1)
                drop = probs.cumsum(-1) - probs >= params.top_p  # keep the smallest prefix reaching top_p
                logits[order[drop]] = float("-inf")
            logp = logits.log_softmax(-1)
            if self.kwargs.get("logprobs_mode", "raw_logprobs") != "processed_logprobs":
                logp = (logits * params.temperature).log_softmax(-1)  # raw: before temperature (and top-p)
            token = int(torch.multinomial(logp.exp().float(), 1, generator=generator))
            tokens.append(token)
            logprobs.append({token: Logprob(float(logp[token]), rank=1)})
            if token in (params.stop_token_ids or []):
                finish, stop = "stop", token
                if not LLM.include_stop_token:
                    tokens.pop()
                    logprobs.pop()
                break
        kept = logprobs if params.logprobs is not None else None
        return CompletionOutput(index, "", tokens, None, kept, finish, stop)


def install(monkeypatch) -> types.ModuleType:
    """Make `import vllm` give this stand-in for the rest of a test."""
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    module.RequestOutput, module.CompletionOutput, module.Logprob = RequestOutput, CompletionOutput, Logprob
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_sleep_mode_available=lambda: LLM.sleep_mode)
    module.platforms = platforms
    LLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    return module
