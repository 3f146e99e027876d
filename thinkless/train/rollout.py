"""Rollouts: `rollout.n` samples per prompt from the policy, with Hugging Face `generate` (left-padded batches).

The result keeps what the loss and the rewards need: prompt + response token ids, the response mask (generated
tokens up to and including the first EOS), the mode chosen by the first generated token, and the decoded text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from thinkless.modes import SHORT, THINK, mode_of_token
from thinkless.train import decode
from thinkless.train.model import control_token_ids, text_decoder

if TYPE_CHECKING:
    from thinkless.train.config import RolloutConfig


@dataclass
class Rollouts:
    input_ids: torch.Tensor  # [B*n, P+R]: left-padded prompt, then the response, right-padded
    attention_mask: torch.Tensor  # [B*n, P+R]
    response_mask: torch.Tensor  # bool [B*n, P+R]: generated tokens up to and including the first EOS
    prompt_index: torch.Tensor  # int64 [B*n]: which prompt each sample answers (samples of a prompt are adjacent)
    modes: list[str | None]  # "short", "think" or None, from the first generated token
    texts: list[str]  # the decoded responses (control tokens kept)
    lengths: torch.Tensor  # int64 [B*n]: response tokens
    prompt_width: int = 0  # P: the columns of the left-padded prompts
    # [B*n, P+R-1]: log-prob of token j+1 under the distribution it was sampled from, as the engine computed it (the
    # same layout as the trainer's log-probs; 0 off the responses). The importance-sampling correction and the
    # `rollout_logp_diff` metric compare it with the trainer's own.
    rollout_logp: torch.Tensor | None = None


def merge_rollouts(parts: list[Rollouts], prompts: list[int], device) -> Rollouts:
    """The rollouts of several ranks (`prompts[i]` prompts each) as one batch, in order: prompt indices offset,
    rows re-padded to a common prompt and response width."""
    P = max(r.prompt_width for r in parts)
    R = max(r.input_ids.shape[1] - r.prompt_width for r in parts)

    def place(t: torch.Tensor, width: int, shifted: bool = False) -> torch.Tensor:  # shifted: column c is token c+1
        out = t.new_zeros((t.shape[0], P + R - shifted))
        out[:, P - width : P - width + t.shape[1]] = t
        return out

    offsets = [sum(prompts[:i]) for i in range(len(parts))]
    with_logp = all(r.rollout_logp is not None for r in parts)
    cat = lambda ts: torch.cat(ts).to(device)  # noqa: E731
    return Rollouts(
        input_ids=cat([place(r.input_ids, r.prompt_width) for r in parts]),
        attention_mask=cat([place(r.attention_mask, r.prompt_width) for r in parts]),
        response_mask=cat([place(r.response_mask, r.prompt_width) for r in parts]),
        prompt_index=cat([r.prompt_index + o for r, o in zip(parts, offsets, strict=True)]),
        modes=[m for r in parts for m in r.modes],
        texts=[t for r in parts for t in r.texts],
        lengths=cat([r.lengths for r in parts]),
        prompt_width=P,
        rollout_logp=cat([place(r.rollout_logp, r.prompt_width, shifted=True) for r in parts]) if with_logp else None,
    )


def _plain_sampling() -> dict:
    """Every processor and warper that transformers adds when a model's generation_config asks for it, switched
    off: the loss's log-probs assume the plain temperature softmax (top_p aside), so nothing else may reshape what is
    sampled (suppressed tokens, a minimum length, banned words or n-grams, biases), and the recorder must see the
    scores that are sampled (warpers would run after it). Only the settings this transformers knows."""
    from transformers import GenerationConfig

    known = GenerationConfig()
    off = dict(
        min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, top_h=None, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, bad_words_ids=None, min_length=0, min_new_tokens=None, suppress_tokens=None,
        begin_suppress_tokens=None, sequence_bias=None, forced_bos_token_id=None, forced_eos_token_id=None,
        exponential_decay_length_penalty=None, renormalize_logits=False, guidance_scale=None, watermarking_config=None,
        force_words_ids=None, constraints=None, num_beams=1, num_beam_groups=1, diversity_penalty=0.0,
        stop_strings=None, prompt_lookup_num_tokens=None, assistant_model=None,
    )  # fmt: skip
    return {name: value for name, value in off.items() if hasattr(known, name)}


class _SampledLogprobs:
    """A logits processor that runs last: it keeps log_softmax of the final scores (the distribution `generate`
    samples from) and, one step later, reads off the log-prob of the token that was drawn from it."""

    def __init__(self):
        self.last: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.take(input_ids[:, -1])
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def take(self, tokens: torch.Tensor) -> None:
        if self.last is not None:
            self.picked.append(self.last.gather(1, tokens[:, None]).squeeze(1))
            self.last = None


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS and every EOS of the model's generation config (chat models have several)."""
    stops = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(t for t in stops if t is not None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], rollout: RolloutConfig) -> Rollouts:
    """`rollout.n` samples for each prompt, by `rollout.temperature`, `top_p`, `max_new_tokens`: with
    `rollout.compile` by the static-cache decoder (`thinkless.train.decode`) where the model allows it, else by
    Hugging Face `generate`."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    stops = stop_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    P = enc["input_ids"].shape[1]
    why_not = decode.unsupported(model, P + rollout.max_new_tokens) if getattr(rollout, "compile", False) else ""
    if why_not is None:
        try:
            generated, picked = decode.sample(
                model, enc["input_ids"], enc["attention_mask"], stops, tokenizer.pad_token_id, rollout
            )
        finally:
            model.train(was_training)
    else:
        if why_not:
            decode.warn_once(f"rollout.compile: {why_not}; sampling with plain generate")
        try:
            generated, picked = _hf_generate(model, tokenizer, enc, stops, rollout)
        finally:
            model.train(was_training)
    is_stop = torch.isin(generated, torch.tensor(stops, device=generated.device))
    # A response ends at its first stop token (kept: the model must learn to stop); everything after is padding.
    # A pad token sampled before it is an ordinary token of the response.
    response = (is_stop.long().cumsum(1) - is_stop.long()) == 0
    prompt_attention = enc["attention_mask"].repeat_interleave(rollout.n, dim=0)
    prompt_ids = enc["input_ids"].repeat_interleave(rollout.n, dim=0)
    return assemble(prompt_ids, prompt_attention, generated, response, picked, tokenizer, rollout.n)


def _hf_generate(model, tokenizer, enc, stops: list[int], rollout: RolloutConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The generated tokens [S, R] and the log-prob of each under the distribution it was drawn from, by HF
    `generate`."""
    # Plain temperature (and top_p) sampling, the distribution the loss's log-probs assume: the model's own
    # generation_config (top_k, repetition_penalty, ...) must not reshape it. The warpers are passed as processors,
    # with temperature and top_p 1 to `generate`: its own warpers would run after our recorder, which must see the
    # final scores.
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    recorder = _SampledLogprobs()
    processors = [TemperatureLogitsWarper(rollout.temperature)]
    if rollout.top_p < 1.0:
        processors.append(TopPLogitsWarper(rollout.top_p))
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        **_plain_sampling(),
        logits_processor=LogitsProcessorList([*processors, recorder]),
        max_new_tokens=rollout.max_new_tokens,
        num_return_sequences=rollout.n,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops,
        # Gradient checkpointing sets config.use_cache=False for training; generation must keep its KV cache (or
        # rerun the whole sequence for every new token), whatever a model's configs say.
        use_cache=True,
    )
    recorder.take(out[:, -1])
    generated = out[:, enc["input_ids"].shape[1] :]
    # One per generated column; an engine step that generate undoes afterwards (it runs one extra step on MPS) adds
    # a record past the last column, cut here.
    return generated, torch.stack(recorder.picked, dim=1)[:, : generated.shape[1]]


def assemble(prompt_ids, prompt_attention, generated, response, logp, tokenizer, n: int) -> Rollouts:
    """Rollouts from any engine's tokens: left-padded prompts [S, P] (each repeated n times), the generated tokens
    [S, R], which of them belong to the response [S, R] (up to and including the stop token), and the engine's
    log-prob of each generated token [S, R] (NaN where the engine gave none)."""
    P = prompt_ids.shape[1]
    ids = control_token_ids(tokenizer)
    modes = [mode_of_token(int(t), ids[SHORT], ids[THINK]) for t in generated[:, 0]]
    decode = text_decoder(tokenizer)
    texts = [decode(row[mask].tolist()) for row, mask in zip(generated, response, strict=True)]
    return Rollouts(
        input_ids=torch.cat((prompt_ids, generated), dim=1),
        attention_mask=torch.cat((prompt_attention, response.long()), dim=1),
        response_mask=torch.cat((torch.zeros_like(prompt_attention, dtype=torch.bool), response), dim=1),
        prompt_index=torch.arange(len(generated) // n, device=generated.device).repeat_interleave(n),
        modes=modes,
        texts=texts,
        lengths=response.sum(1),
        prompt_width=P,
        rollout_logp=_shifted_logp(logp, response, P),
    )


def _shifted_logp(logp: torch.Tensor, response: torch.Tensor, P: int) -> torch.Tensor:
    """The log-probs of the generated tokens [S, R] in the trainer's [S, P+R-1] layout (column c: token c+1), 0 off
    the responses."""
    S, R = response.shape
    out = torch.zeros(S, P + R - 1, dtype=torch.float32, device=response.device)
    out[:, P - 1 :] = torch.where(response, logp.float(), 0.0)
    return out
