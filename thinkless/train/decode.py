"""The HF engine's fast path (`rollout.compile`): a static KV cache and a compiled decode step.

At the sizes RL samples at, Hugging Face `generate` spends most of each new token in Python: logits processors,
stopping criteria, cache bookkeeping and masks rebuilt per token. Here the prompts go through the model's own
forward once (the prefill: so the first token, the mode, sees `generate`'s logits), their keys and values are
copied into a preallocated cache [S, kv heads, C, head dim] per layer, and every further token is one call of
`sample_step`: the model's own norms, projections and MLPs around an attention over the whole static cache under a
mask, then the draw. With every shape fixed, `torch.compile` (inductor) turns the step into one graph. A step reads
and writes one set of tensors allocated per rollout (`_Decoding`, the cache), in place, so with `rollout.cuda_graphs`
on CUDA the second step is recorded as a CUDA graph and replayed for every further token: one launch per token
instead of one per kernel, the host reading only whether a row is still unfinished. The graph goes with the rollout
(its memory pool back to torch's allocator, as the cache's); the price is one capture per rollout.

The sampling is `thinkless.train.rollout.generate`'s, op for op: scores = logits / temperature, top_p by the rule
of transformers' TopPLogitsWarper, a draw from their softmax, a stop token ends its row (kept) and pads follow, and
the recorded log-prob of each token is log_softmax of the final scores. The draw is `torch.multinomial` (the random
numbers `generate` draws: with the same seed the tokens are `generate`'s, up to the last bits of the logits, which
the compiled kernels sum in another order), except on CPU, where the same exponential race runs inside the
compiled step on fine-grained uniforms (`exponential_race`), 7x cheaper there.

Models: the Llama family of decoders (model_type llama, mistral, qwen2, qwen3) with a rotary embedding that does not
depend on the sequence length and no sliding window in reach. `unsupported(model)` says why another model is not;
`rollout.generate` then runs plain `generate`.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from thinkless.train.config import RolloutConfig


MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def unsupported(model, length: int) -> str | None:
    """Why `model` cannot take the static-cache path for sequences of `length` tokens (None: it can)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"model_type {kind!r} (the static-cache path knows {', '.join(MODEL_TYPES)})"
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        return f"{type(model).__name__} has no model.layers / embed_tokens / rotary_emb"
    if getattr(rotary, "rope_type", "default") in LENGTH_DEPENDENT_ROPE:
        return f"rope_type {rotary.rope_type!r} depends on the sequence length"
    for layer in inner.layers:
        # Qwen2/Qwen3 set it per layer (only where the config turns it on); Mistral reads its config at each call.
        attn = layer.self_attn
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        if window is not None and window < length:
            return f"a sliding window of {window} tokens, shorter than prompt + response"
    return None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, the rotate-half layout of these models."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def decode_step(model, tokens, positions, column, rotary, mask, keys, values):
    """Logits [S, V] (float32) of the next token after `tokens` [S], which sit at cache `column` (a 0-d tensor).

    positions [S]: each row's position of `tokens`; rotary: (cos, sin) [C, D] of every position; mask bool [S, C]:
    the cache columns each row may attend to (its real prompt tokens and every generated column; those after
    `column` are cut here); keys, values: per layer [S, Hkv, C, D], written at `column` in place."""
    inner = model.model
    S, C = mask.shape
    x = inner.embed_tokens(tokens[:, None])  # [S, 1, hidden]
    cos, sin = rotary[0][positions][:, None, None, :], rotary[1][positions][:, None, None, :]
    attend = (mask & (torch.arange(C, device=mask.device) <= column))[:, None, None, :]  # [S, 1, 1, C]
    for layer, k_cache, v_cache in zip(inner.layers, keys, values, strict=True):
        attn = layer.self_attn
        D = k_cache.shape[-1]
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(S, 1, -1, D)
        k = attn.k_proj(h).view(S, 1, -1, D)
        v = attn.v_proj(h).view(S, 1, -1, D)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before the rotation
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [S, heads, 1, D]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k_cache.index_copy_(2, column.view(1), k)
        v_cache.index_copy_(2, column.view(1), v)
        # One query per row: a plain softmax(q K^T) V (as transformers' eager attention: products in the model's
        # dtype, the softmax in fp32), which the compiler fuses, rather than a flash kernel built for long queries
        # (measured: 4x faster on CPU at 32 rows x 192 columns). Query heads grouped per KV head.
        G = q.shape[1] // k_cache.shape[1]
        qg = q.reshape(S, k_cache.shape[1], G, D)
        scores = torch.matmul(qg, k_cache.transpose(-1, -2)) * attn.scaling  # [S, Hkv, G, C]
        weights = scores.masked_fill(~attend, -float("inf")).softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        x = x + attn.o_proj(torch.matmul(weights, v_cache).reshape(S, 1, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(inner.norm(x))[:, 0].float()


def sample_step(model, tokens, positions, column, rotary, mask, keys, values, unfinished, stop_ids, pad_id: int,
                temperature: float, top_p: float, race: bool, forward=decode_step):  # fmt: skip
    """One new token per row after `tokens` (see `decode_step`): (token [S], its log-prob [S], unfinished [S]).
    A row that has stopped gets `pad_id`; a row stops at a token of `stop_ids`. `race`: the draw is the exponential
    race on uniforms drawn here (inside the compiled graph: the compiler's own generator); else torch.multinomial."""
    logits = forward(model, tokens, positions, column, rotary, mask, keys, values)
    token, logp = draw(logits, temperature, top_p, race)
    token = torch.where(unfinished, token, pad_id)
    return token, logp.gather(1, token[:, None]).squeeze(1), unfinished & ~is_stop(token, stop_ids)


def is_stop(token: torch.Tensor, stop_ids: torch.Tensor) -> torch.Tensor:
    """torch.isin(token, stop_ids) as one comparison: isin sorts (and reads sizes on the host, which a CUDA graph
    cannot record) once the stop list is long against the batch."""
    return (token[:, None] == stop_ids).any(dim=-1)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False, fullgraph=True)


_FAILED: set[str] = set()
_EAGER: set[tuple] = set()  # (step function, mask shape): shapes past the recompile limit, run eagerly
# Train, validation and evaluation batches (and prompt widths) give a handful of shapes; each compiles once.
RECOMPILE_LIMIT = 32
# decode_step and sample_step open with the same parameters; the mask [S, C] among them fixes every shape of a step.
MASK_ARG = list(inspect.signature(decode_step).parameters).index("mask")


def _run(compile: bool, device: torch.device, fn, *args):
    """`fn` (sample_step or decode_step), compiled when asked and when it compiles here (else eager, warned once)."""
    shape = (fn, tuple(args[MASK_ARG].shape))
    if not compile or device.type in _FAILED or shape in _EAGER:
        return fn(*args)
    from torch._dynamo import config

    limit_hit = _limit_hit()
    try:
        try:
            return _compiled(fn)(*args)
        except limit_hit:  # a new shape past dynamo's default limit (8)
            # Patched only here: the patch costs 40 us a call, as much as the compiled step's own launch.
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            with config.patch(**{name: RECOMPILE_LIMIT}):
                return _compiled(fn)(*args)
    except limit_hit:
        _EAGER.add(shape)
        warn_once(f"rollout.compile: more than {RECOMPILE_LIMIT} shapes; the new ones decode without compiling")
    except Exception as err:  # no C++ compiler, an inductor or dynamo error: the eager step is the same math
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise  # the CUDA graph capture failed, not the compiler: warm_and_capture falls back
        _FAILED.add(device.type)
        warnings.warn(f"rollout.compile: torch.compile failed ({_first_line(err)}); decoding without it", stacklevel=3)
    return fn(*args)


def _first_line(err: BaseException) -> str:
    """An error's first line for a one-line warning (its type when it has no message)."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


@functools.cache
def _limit_hit() -> tuple[type, ...]:
    """Dynamo's exception for a shape past its recompile limit (looked up once: `_run` is called every token)."""
    from torch._dynamo import exc

    names = ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")  # the second: torch < 2.7
    return tuple(getattr(exc, name) for name in names if hasattr(exc, name))


@functools.cache
def warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def cache_width(prompt: int, response: int) -> int:
    """Cache columns for prompts `prompt` tokens wide and `response` new tokens: the prompt width rounded up to a
    power of two (at least 64), so that steps whose prompts differ in length share a handful of shapes and the
    compiled step is reused instead of compiled again (each compile takes seconds); then a multiple of 64."""
    return -(-(max(64, 1 << (prompt - 1).bit_length()) + response) // 64) * 64


@torch.no_grad()
def sample(
    model, input_ids, attention_mask, stops: list[int], pad_id: int, rollout: RolloutConfig, compile: bool = True
):
    """`rollout.n` samples of each left-padded prompt row ([B, P]): (generated [S, R], log-probs [S, R]) with S = B n,
    the rows of a prompt adjacent, R <= rollout.max_new_tokens (it stops early when every row has stopped)."""
    n, R = rollout.n, rollout.max_new_tokens
    B, P = input_ids.shape
    S, device = B * n, input_ids.device
    C = cache_width(P, R)
    logits, keys, values, position = prefill(model, input_ids, attention_mask, n, C)
    prompt_mask = attention_mask.repeat_interleave(n, dim=0)
    rotary = _rotary_table(model, C, keys[0].dtype, device)
    # A row attends to its real prompt tokens and to every generated column (generate's mask grows by a one per
    # token, EOS or not); decode_step cuts the columns after the current one.
    mask = torch.cat((prompt_mask.bool(), torch.ones(S, C - P, dtype=torch.bool, device=device)), dim=1)
    race = not EXACT_MULTINOMIAL and device.type == "cpu"  # the draw inside the compiled step
    warp = (float(rollout.temperature), float(rollout.top_p), race)
    token, logp = draw(logits, *warp)
    stop_ids = torch.tensor(stops, device=device)
    s = _Decoding(
        token=token, unfinished=~is_stop(token, stop_ids),
        step=torch.zeros((), dtype=torch.long, device=device), tokens=token.new_full((S, R), pad_id),
        logps=logp.new_zeros(S, R), next_position=position[:, -1].repeat_interleave(n) + 1, prompt_width=P,
    )  # fmt: skip
    s.tokens[:, 0], s.logps[:, 0] = token, logp.gather(1, token[:, None]).squeeze(1)
    if race:  # the race: drawn inside the compiled step
        draw_next = functools.partial(_run, compile, device, sample_step)
    else:  # torch.multinomial's random numbers stay out of the graph: the compiler would draw others
        draw_next = functools.partial(sample_step, forward=functools.partial(_run, compile, device, decode_step))
    step = functools.partial(advance, s, draw_next, model, rotary, mask, keys, values, stop_ids, pad_id, warp)
    # A graph pays off from two replays on (the capture synchronizes and empties the allocator's cache).
    graphed = getattr(rollout, "cuda_graphs", False) and device.type in GRAPH_DEVICES and R > 3
    graph, taken = None, 0
    while taken < R - 1 and bool(s.unfinished.any()):
        if graph is not None:
            graph.replay()
        elif graphed and taken == 0:
            graph = warm_and_capture(step, device)  # runs this step (warm-up), records the next: replayed after
        else:
            step()
        taken += 1
    if graph is not None:
        graph.reset()  # its private memory pool goes back to torch's caching allocator
    logps = s.logps[:, : taken + 1]
    # What torch.multinomial's own check (a sync per token) refused: non-finite logits give NaN probabilities, and
    # NaN log-probs. (A pad after a row's stop may record -inf: top_p can cut the pad token.)
    if bool(torch.isnan(logps).any()):
        raise RuntimeError("rollout: the sampling distribution holds inf or nan (the model's logits are not finite)")
    return s.tokens[:, : taken + 1].contiguous(), logps.contiguous()


def prefill(model, input_ids, attention_mask, n: int, C: int):
    """The prompts [B, P] through the model's own forward, once per prompt (generate runs it on every copy): the
    next-token logits [B n, V] (float32) and the static cache, per layer keys and values [B n, Hkv, C, D] with the
    prompts' in columns :P, each prompt's n samples adjacent; and the prompt tokens' positions [B, P]."""
    S, P = input_ids.shape[0] * n, input_ids.shape[1]
    # Positions count the real tokens from 0 (left pads get one too, never attended).
    position = attention_mask.long().cumsum(-1) - 1
    position = position.masked_fill(attention_mask == 0, 1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position, use_cache=True,
                logits_to_keep=1)  # fmt: skip
    logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)
    cache = out.cache if "cache" in out else out.past_key_values  # transformers >= 5.2 names it cache
    out = None
    # A tensor per layer, [S, Hkv, C, D]: the step writes each in place (views of one tensor would be copied whole
    # by the compiled graph's input-mutation handling: measured 2x slower).
    keys, values = [], []
    for layer in cache.layers:  # [B, Hkv, P, D]
        for kept, new in ((keys, layer.keys), (values, layer.values)):
            full = new.new_zeros(S, new.shape[1], C, new.shape[-1])
            full[:, :, :P] = new.repeat_interleave(n, dim=0)
            kept.append(full)
    return logits, keys, values, position


GRAPH_DEVICES = ("cuda",)  # where `rollout.cuda_graphs` records the step (elsewhere the flag does nothing)


@dataclass
class _Decoding:
    """The state that the steps of one rollout read and write, in tensors allocated once: a step changes them in
    place, so that one recorded CUDA graph of a step replays the next (its inputs never move) and the host only
    reads `unfinished` to know when to stop."""

    token: torch.Tensor  # [S] the last token drawn (fed to the next step)
    unfinished: torch.Tensor  # [S] bool: no stop token drawn yet
    step: torch.Tensor  # 0-d long: steps taken (tokens drawn - 1)
    tokens: torch.Tensor  # [S, R] the drawn tokens (pad after a row's stop)
    logps: torch.Tensor  # [S, R] their recorded log-probs
    next_position: torch.Tensor  # [S] position of the first drawn token (each row's real prompt length)
    prompt_width: int  # P: the first drawn token sits in cache column P


def advance(s: _Decoding, draw_next, model, rotary, mask, keys, values, stop_ids, pad_id: int, warp: tuple):
    """One decode step of every row, in place on `s`: feeds `s.token` (cache column P + step) to `draw_next`
    (`sample_step`, compiled or not) and keeps what it draws."""
    column, positions = s.step + s.prompt_width, s.next_position + s.step
    args = (model, s.token, positions, column, rotary, mask, keys, values, s.unfinished, stop_ids, pad_id, *warp)
    token, picked, unfinished = draw_next(*args)
    s.step.add_(1)
    s.tokens.index_copy_(1, s.step.view(1), token[:, None])  # index_copy: no host read of the step count
    s.logps.index_copy_(1, s.step.view(1), picked[:, None])
    s.token.copy_(token)
    s.unfinished.copy_(unfinished)


CAPTURES = {"recorded": 0, "failed": 0}  # counts of warm_and_capture's outcomes (the tests and bench read them)
_CAPTURE_FAILED: set[int] = set()  # devices where a capture failed: later rollouts step without trying again


def warm_and_capture(step, device: torch.device):
    """Runs `step` once on a side stream of `device` (compiling and warming it, as CUDA graph capture asks), then
    records the next call of it as a CUDA graph without running it. None (and one warning) when the capture fails:
    the caller then goes on stepping eagerly, the same math, and so do later rollouts on that device.

    The capture error mode is thread-local: another thread's CUDA call (NCCL's watchdog under torchrun) would
    otherwise invalidate the capture."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _CAPTURE_FAILED:  # this step still runs (the caller counts it), eagerly
        step()
        return None
    with torch.cuda.device(index):  # streams and the capture on the model's device, whichever is current
        side, before = _side_stream(index), torch.cuda.current_stream()
        side.wait_stream(before)
        with torch.cuda.stream(side):
            step()
        before.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                step()
        except Exception as err:
            # A failed capture_end leaves the capture stream current (and what the capture allocated may stay in
            # its private pool: once per device, as no capture is tried there again).
            torch.cuda.set_stream(before)
            _CAPTURE_FAILED.add(index)
            CAPTURES["failed"] += 1
            cause = _first_line(err.__context__ or err)  # capture_end's own error hides the op that broke it
            warn_once(f"rollout.cuda_graphs: capturing the decode step failed ({cause}); decoding without CUDA graphs")
            return None
    CAPTURES["recorded"] += 1
    return graph


@functools.cache
def _side_stream(index: int):
    """One side stream per device for the warm-up and the capture (a new one per rollout would cycle through
    torch's stream pool, each with its own cuBLAS workspace)."""
    return torch.cuda.Stream(device=index)


def _rotary_table(model, length: int, dtype, device):
    """cos, sin [length, D] of positions 0..length-1, by the model's own rotary embedding."""
    positions = torch.arange(length, device=device)[None]
    cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=dtype, device=device), positions)
    return cos[0], sin[0]


def draw(logits: torch.Tensor, temperature: float, top_p: float, race: bool = False):
    """The next token of each row and the log-probs [S, V] of the distribution it was drawn from, as `generate`
    with our processors draws it: temperature, then top_p, then a draw from the softmax: `torch.multinomial`, or
    the exponential race."""
    scores = logits / temperature
    if top_p < 1.0:  # transformers' TopPLogitsWarper: drop the low tail of mass <= 1 - top_p, keep >= 1 token
        sorted_scores, order = torch.sort(scores, descending=False)
        tail = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        tail[:, -1] = False
        scores = scores.masked_fill(tail.scatter(1, order, tail), -float("inf"))
    probs = F.softmax(scores, dim=-1)
    if race:
        token = exponential_race(probs, fine_uniform(probs.shape, probs.device))
    else:
        token = multinomial(probs)
    return token, torch.log_softmax(scores, dim=-1)


# torch.multinomial draws one sample as argmax p / E with E ~ Exp(1) from `exponential_`, which on CPU costs 7x a
# uniform draw (0.40 ms against 0.06 ms for 32 x 603 float32 ones here: more than the compiled decode step).
# On CPU the race takes E = -log(1 - U) from uniforms instead: the same distribution, other random numbers than
# `generate`'s. True: torch.multinomial everywhere (the tests compare token for token with `generate` so).
EXACT_MULTINOMIAL = False


def multinomial(probs: torch.Tensor) -> torch.Tensor:
    """`torch.multinomial(probs, 1)` written out as torch computes one sample (argmax p / E, E from `exponential_`
    on the same generator): the same tokens from the same random numbers, leaving the generator where it leaves it
    (a test holds them equal, so a torch that changes its algorithm fails there), but without its check of `probs`,
    so that a CUDA graph can record it."""
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def fine_uniform(shape, device) -> torch.Tensor:
    """Float64 uniforms in [0, 1) off the 2^-31 grid, also inside a compiled graph: inductor draws its own random
    numbers as float32 on a 2^-31 grid whatever the dtype asked (then casts), where U = 0 comes once in 2^31 entries.
    One more uniform per row shifts the row's values within their grid cells (the sum modulo 1 stays uniform): the
    lowest cell then holds U in (0, 2^-31) continuously, and an entry of tiny p wins the race with about p, not
    2^-31. (A full second draw does the same for 7 % of the 4 x 8 x 64 rollout's time.)"""
    coarse = torch.rand(shape, dtype=torch.float64, device=device)
    shift = torch.rand((*shape[:-1], 1), dtype=torch.float64, device=device)
    return torch.frac(coarse + shift * 2.0**-31)


def exponential_race(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A sample of each row of `probs` [S, V] from uniforms U [S, V] in [0, 1): argmax p / E, E = -log(1 - U)
    ~ Exp(1). Entry i wins the race with probability p_i (the exponential clocks' minimum).

    U must be fine-grained (`fine_uniform`): a float32 U is a multiple of 2^-24, so E = 0 (U = 0) comes with
    probability 2^-24 per entry and lets any entry with p > 0 win; over a 150k vocabulary that is a junk token in
    about 1 % of the draws. E is kept above 0 so that a zero-probability entry never ties: 0 / E = 0."""
    race = torch.log1p(-uniform).neg_().clamp_(min=torch.finfo(uniform.dtype).tiny)
    return (probs.to(uniform.dtype) / race).argmax(dim=-1)
