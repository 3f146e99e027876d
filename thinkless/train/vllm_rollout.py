"""Rollouts with vLLM, colocated with training (`rollout.engine=vllm`, the `vllm` extra).

Each rank runs its own vLLM engine in its own process, on its own GPU, beside the policy:
- **in process**: `VLLM_ENABLE_V1_MULTIPROCESSING=0` on one rank, `distributed_executor_backend="external_launcher"`
  under torchrun, so `apply_model` reaches the engine's model object and weights pass by reference, not by copy;
- **weights synced before every generation**: the policy's full state (gathered from the FSDP2 shards on several
  ranks) goes through the engine model's own `load_weights` (HF parameter names), then the prefix cache is reset;
- **memory freed while the policy trains** (`rollout.vllm_sleep`): after sampling the engine sleeps at level 2 (its
  weights and KV cache released: the next sync rewrites every weight anyway); before sampling it wakes its weights,
  takes the new ones, then wakes its KV cache;
- **log-probs of the sampling distribution**: `logprobs_mode="processed_logprobs"` (after temperature and top-p),
  one per generated token, for the importance-sampling correction (`algo.is_correction`) and `rollout_logp_diff`.

Written against vLLM 0.33's `LLM` API (`sleep`, `wake_up(tags)`, `apply_model`, `reset_prefix_cache`,
`SamplingParams`, `RequestOutput`). The tests drive it through a stand-in for that API on the CPU
(`tests/fake_vllm.py`); vLLM itself could not be installed on the machines this was built on.
"""

from __future__ import annotations

import math
import os

import torch

from thinkless.train.config import ConfigError
from thinkless.train.dist import full_model_state
from thinkless.train.rollout import Rollouts, assemble, stop_token_ids


class VLLMRollout:
    """A colocated vLLM engine that samples `rollout.n` responses per prompt from the current policy."""

    def __init__(self, model_path: str, run):
        try:
            import vllm
        except ImportError:
            raise ConfigError("rollout.engine=vllm needs the vllm package: pip install 'thinkless[vllm]'") from None
        config, d = run.config, run.dist
        grown = run.model.get_input_embeddings().weight.shape[0]
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_path).vocab_size
        if grown != vocab:
            raise ConfigError(
                f"rollout.engine=vllm: adding the control tokens grew the vocabulary of {model_path!r} from {vocab} "
                f"to {grown}; run the warm-up (sft) first and start RL from its output folder"
            )
        r = config.rollout
        self.rollout, self.dist, self.sleeps = r, d, r.vllm_sleep
        if d.world == 1:  # the engine in this process (forced: in a subprocess the weights would be pickled)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = vllm.LLM(
            model=model_path,
            skip_tokenizer_init=True,  # prompts go in as token ids; texts are decoded by the trainer's tokenizer
            dtype=str(next(run.model.parameters()).dtype).removeprefix("torch."),
            gpu_memory_utilization=r.vllm_gpu_memory_utilization,
            enable_sleep_mode=r.vllm_sleep,
            max_model_len=config.data.max_prompt_tokens + r.max_new_tokens,
            seed=config.trainer.seed + d.rank,
            logprobs_mode="processed_logprobs",
            distributed_executor_backend="external_launcher" if d.world > 1 else None,
        )
        self.awake = True

    def sync(self, model) -> None:
        """The policy's weights into the engine (waking its weights first when it sleeps)."""
        if not self.awake:
            self.llm.wake_up(tags=["weights"])
        state = full_model_state(model, self.dist)
        self.llm.apply_model(lambda engine_model: engine_model.load_weights(state.items()))
        if not self.awake:
            self.llm.wake_up(tags=["kv_cache"])
            self.awake = True
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def sleep(self) -> None:
        if self.sleeps and self.awake:
            self.llm.sleep(level=2)
            self.awake = False

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: list[str]) -> Rollouts:
        """`rollout.n` samples per prompt from `model`'s current weights; the engine sleeps again afterwards."""
        from vllm import SamplingParams

        r = self.rollout
        self.sync(model)
        stops = stop_token_ids(model, tokenizer)
        params = SamplingParams(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            top_k=0,
            max_tokens=r.max_new_tokens,
            logprobs=0,
            stop_token_ids=stops,
            detokenize=False,
        )  # fmt: skip  (no per-request seed: in process, vLLM samples from the CUDA generator the trainer seeds)
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        self.sleep()
        return rollouts_from_outputs(encoded, outputs, stops, tokenizer, r.n, next(model.parameters()).device)


def response_of(completion, stops: list[int], eos: int) -> tuple[list[int], list[float]]:
    """A completion's tokens and their log-probs, ending with its stop token when it stopped on one (appended, with
    an unknown log-prob, if the engine left it out: the model must learn to stop). vLLM's stop_reason is the stop
    token's id, or None for the EOS."""
    tokens = list(completion.token_ids)
    logps = [_sampled_logprob(completion.logprobs, i, t) for i, t in enumerate(tokens)]
    if completion.finish_reason == "stop" and (not tokens or tokens[-1] not in stops):
        stop = completion.stop_reason if isinstance(completion.stop_reason, int) else eos
        tokens.append(stop)
        logps.append(math.nan)
    return tokens, logps


def _sampled_logprob(logprobs, position: int, token: int) -> float:
    if logprobs is None or position >= len(logprobs) or logprobs[position] is None:
        return math.nan
    entry = logprobs[position].get(token)
    return math.nan if entry is None else float(entry.logprob)


def rollouts_from_outputs(encoded: list[list[int]], outputs, stops, tokenizer, n: int, device) -> Rollouts:
    """vLLM's RequestOutputs as Rollouts: prompts left-padded, responses right-padded, as the HF engine gives them."""
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id if getattr(tokenizer, "eos_token_id", None) in stops else stops[0]
    P = max(len(ids) for ids in encoded)
    rows = []
    for ids, out in zip(encoded, outputs, strict=True):
        completions = sorted(out.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for a prompt, expected rollout.n={n}")
        rows += [(ids, *response_of(c, stops, eos)) for c in completions]
    R = max(1, max(len(tokens) for _, tokens, _ in rows))
    S = len(rows)
    prompt_ids = torch.full((S, P), pad, dtype=torch.long)
    prompt_attention = torch.zeros(S, P, dtype=torch.long)
    generated = torch.full((S, R), pad, dtype=torch.long)
    response = torch.zeros(S, R, dtype=torch.bool)
    logp = torch.full((S, R), math.nan)
    for i, (ids, tokens, logps) in enumerate(rows):
        prompt_ids[i, P - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        prompt_attention[i, P - len(ids) :] = 1
        generated[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        response[i, : len(tokens)] = True
        logp[i, : len(tokens)] = torch.tensor(logps)
    moved = (x.to(device) for x in (prompt_ids, prompt_attention, generated, response, logp))
    return assemble(*moved, tokenizer, n)
