"""Settings of a run: typed dataclass sections, read from YAML and `section.key=value` overrides (as in verl).

    thinkless-train rl --config run.yaml rollout.n=8 algo.alpha=0.001 data.train_files=[a.json,b.json]

Every key has a default and a help line (`thinkless-train <stage> --help` lists them). An unknown section or key is
a `ConfigError` that lists the valid ones; a value of the wrong type names the key and the type it needs. The
resolved settings are saved as `config.yaml` in the run's output folder.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from thinkless.kernels.degrpo_weights import KL_TYPES, LOSS_AGGS, DeGRPOParams
from thinkless.train.config_values import ConfigError as ConfigError  # (raised here; imported from here by all)
from thinkless.train.config_values import coerce

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _key(default, help_text: str, *, low=None, above=None, unit: bool = False, choices: tuple | None = None):
    """A setting: its default, its help line, and its rule (checked by `validate`, a ConfigError naming the key):
    `low` (value >= low), `above` (value > above), `unit` (0 < value <= 1) or `choices`."""
    rule = {"low": low, "above": above, "unit": unit, "choices": choices}
    metadata = {"help": help_text, **{k: v for k, v in rule.items() if v is not None and v is not False}}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_LOSS_OPTIONS = {f.name: f for f in dataclasses.fields(DeGRPOParams)}


def _loss_key(name: str, help_text: str | None = None, **rule):
    """An algo.* setting that is an option of the DeGRPO loss: its default and meaning as the loss declares them
    (`thinkless.kernels.DeGRPOParams`); `policy_loss.loss_options` hands it to the loss by name."""
    option = _LOSS_OPTIONS[name]
    return _key(option.default, help_text or option.metadata["help"], **rule)


@dataclass
class ModelConfig:
    path: str = _key("", "local folder or Hugging Face hub id of the policy (AutoModelForCausalLM)")
    dtype: str = _key(
        "auto",
        "auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32",
        choices=("auto", "bfloat16", "float16", "float32"),
    )
    attn_implementation: str = _key(
        "auto",
        "auto (flash_attention_2 if installed on CUDA, else sdpa), sdpa, eager",
        choices=("auto", "sdpa", "eager", "flash_attention_2"),
    )
    gradient_checkpointing: bool = _key(False, "recompute activations in backward to save memory")
    liger: bool = _key(True, "apply Liger-Kernel patches (RMSNorm, RoPE, SwiGLU) on CUDA when installed")
    ref_path: str = _key("", "the frozen reference model for the KL term; default: model.path")


@dataclass
class DataConfig:
    train_files: list[str] = _key([], "json, jsonl or parquet files to train on")
    val_files: list[str] = _key([], "json, jsonl or parquet files to evaluate on, one report each")
    problem_key: str = _key("auto", "column holding the problem text; auto: problem, else question (GSM8K)")
    answer_key: str = _key(
        "auto", "column holding the reference answer; auto: answer, else solution (MATH: its last \\boxed{})"
    )
    answer_format: str = _key(
        "auto",
        "how the answer column holds the final answer: plain (as is), gsm8k (after the last ####, commas dropped), "
        "boxed (the last \\boxed{}), auto (#### -> gsm8k, \\boxed -> boxed, else plain)",
        choices=("auto", "plain", "gsm8k", "boxed"),
    )
    filter_key: str = _key("", "keep only the rows whose value in this column is one of data.filter_values (e.g. type)")
    filter_values: list[str] = _key([], "the values data.filter_key keeps, whole and case-insensitive (e.g. [Algebra])")
    response_key: str = _key("response", "SFT: column holding the target response, starting with its control token")
    messages_key: str = _key("messages", "SFT: column holding a chat [{role, content}, ...] instead")
    instruction: str = _key(INSTRUCTION, "the instruction added to every problem in the user turn")
    instruction_position: str = _key(
        "after",
        "where the instruction goes: after (problem, space, instruction), before (instruction, newline, "
        "problem: the authors' eval prompt) or none (the problem alone: the authors' RL prompt)",
        choices=("after", "before", "none"),
    )
    tag_key: str = _key("", "RL: column that tags each problem (e.g. level); metrics are also reported per tag")
    max_prompt_tokens: int = _key(1024, "prompts longer than this are dropped (with a count in the log)", low=1)
    max_length: int = _key(8192, "SFT: longest prompt + response in tokens; longer examples are truncated", low=2)


@dataclass
class RolloutConfig:
    n: int = _key(8, "samples per prompt (the group size G of GRPO)", low=1)
    temperature: float = _key(0.6, "sampling temperature; the loss uses the same one for its log-probs", above=0)
    top_p: float = _key(1.0, "nucleus sampling", unit=True)
    max_new_tokens: int = _key(4096, "longest response", low=1)
    engine: str = _key(
        "hf",
        "generation engine: hf (transformers generate) or vllm (colocated; the vllm extra)",
        choices=("hf", "vllm"),
    )
    compile: bool = _key(
        False, "hf engine: static KV cache and a torch.compile'd decode step (Llama-family models; else generate)"
    )
    cuda_graphs: bool = _key(
        False,
        "hf engine with rollout.compile, on CUDA: replay each decode step as a CUDA graph (one capture a rollout)",
    )
    vllm_gpu_memory_utilization: float = _key(
        0.3, "vllm: share of the GPU's memory for its weights and KV cache", unit=True
    )
    vllm_sleep: bool = _key(True, "vllm: release its GPU memory while the policy trains (sleep level 2)")


@dataclass
class AlgoConfig:
    # The DeGRPO loss's options (kernels.DeGRPOParams), by name; off-switches are 0 here where the loss takes None.
    alpha: float = _loss_key("alpha", low=0)
    decoupled: bool = _loss_key("decoupled")
    clip_low: float = _loss_key("clip_low", low=0)
    clip_high: float = _loss_key("clip_high", low=0)
    kl_coef: float = _loss_key("kl_coef", "weight of the KL term to the reference model (loaded only when > 0)", low=0)
    kl_type: str = _loss_key("kl_type", choices=KL_TYPES)
    kl_clamp: float = _key(
        0.0, "clamp each token's KL estimate to [-kl_clamp, kl_clamp] (low_var_kl: 10); 0: off", low=0
    )
    entropy_coef: float = _key(0.0, "entropy bonus: the loss subtracts entropy_coef x the token-mean entropy", low=0)
    loss_agg: str = _loss_key("loss_agg", choices=LOSS_AGGS)
    loss_agg_norm: int = _key(0, "seq_mean_token_sum_norm: the constant token count; 0: rollout.max_new_tokens", low=0)
    normalize_std: bool = _key(False, "divide advantages by the group std (GRPO); false: Dr. GRPO, as Thinkless")
    filter_groups: bool = _key(False, "drop groups whose rewards are all equal (zero advantage)")
    ppo_epochs: int = _key(1, "passes over each batch of rollouts", low=1)
    mini_batch_size: int = _key(0, "prompts per optimizer step within a batch; 0: the whole batch", low=0)
    micro_batch_size: int = _key(4, "sequences per forward/backward (gradient accumulation)", low=1)
    micro_batch_tokens: int = _key(0, "with padding_free: tokens per micro-batch (dynamic); 0: micro_batch_size", low=0)
    padding_free: bool = _key(False, "pack each micro-batch into one row (positions restart; no padding computed)")
    lr: float = _key(1e-6, "AdamW learning rate", above=0)
    weight_decay: float = _key(0.0, "AdamW weight decay", low=0)
    betas: list[float] = _key([0.9, 0.999], "AdamW betas (beta1, beta2); the authors' run uses [0.9, 0.95]")
    warmup_steps: int = _key(0, "linear learning-rate warmup, in optimizer updates", low=0)
    lr_scheduler: str = _key(
        "constant",
        "after the warmup: constant, cosine or linear (decay to 0 at the last step)",
        choices=("constant", "cosine", "linear"),
    )
    max_grad_norm: float = _key(1.0, "gradient clipping", above=0)
    is_correction: bool = _key(
        False, "truncated importance sampling: weight each token by min(exp(old - rollout log-prob), is_cap)"
    )
    is_cap: float = _key(2.0, "the truncation of the importance-sampling weights (algo.is_correction)", above=0)


@dataclass
class RewardsConfig:
    correct_short: float = _key(1.0, "reward of a correct <short> answer")
    correct_think: float = _key(0.5, "reward of a correct <think> answer")
    wrong: float = _key(-1.0, "reward of a wrong answer")
    format_error: float = _key(-1.0, "reward of a response without a control token or a \\boxed{} answer")


@dataclass
class TrainerConfig:
    output_dir: str = _key("thinkless-runs/run", "the run's folder: config, metrics.jsonl, checkpoints, eval")
    batch_size: int = _key(8, "prompts per step (RL) or examples per step (SFT)", low=1)
    total_steps: int = _key(
        100, "training steps (RL: rollout batches, each with its updates; SFT: optimizer steps)", low=0
    )
    save_every: int = _key(50, "write checkpoint-<step>/ every this many steps (and at the end)", low=1)
    keep_last: int = _key(2, "checkpoints kept; older ones are deleted", low=1)
    max_skipped_updates: int = _key(
        3,
        "stop after this many optimizer updates in a row skipped for a non-finite loss or gradient",
        low=1,
    )
    seed: int = _key(0, "random seed")
    device: str = _key("auto", "auto (cuda if available), cuda or cpu")
    report_to: str = _key("none", "none, tensorboard or wandb", choices=("none", "tensorboard", "wandb"))
    val_files: list[str] = _key([], "RL: files to validate on every val_every steps (val/<file>/... metrics)")
    val_every: int = _key(0, "RL: validate every this many steps (and before the first); 0: never", low=0)
    val_n: int = _key(1, "RL: samples per validation problem", low=1)


@dataclass
class EvalConfig:
    seeds: list[int] = _key(
        [],
        "one pass over each file per seed (rollout.n samples per problem each; the authors: [0,1,2,3,4], n=1), "
        "reported as the mean and std across seeds; empty: one pass with trainer.seed",
    )
    count_prompt_tokens: bool = _key(False, "count tokens as prompt + response (the authors' table); else response")
    scoring: str = _key(
        "rl",
        "rl: the training reward's rule (think answers after </think>); authors: their evaluation scripts' rule "
        "(the last \\boxed{} anywhere, thinking included, else the last number), for the paper's table",
        choices=("rl", "authors"),
    )
    limit: int = _key(0, "evaluate only the first N problems of each file (lm-eval's --limit); 0: all", low=0)
    force_mode: str = _key(
        "",
        "short or think: the control token goes into the prompt, so that one mode is measured (in eval/<mode>/; "
        "both measured give the oracle router); empty: the model chooses",
        choices=("", "short", "think"),
    )


@dataclass
class DistillConfig:
    think_model: str = _key("", "the reasoning model that writes the <think> answers (hub id, folder or .gguf)")
    think_file: str = _key(
        "", "instead of think_model: existing long responses keyed by problem (json, jsonl or parquet)"
    )
    think_problem_key: str = _key(
        "auto", "think_file: the problem column; auto: problem, question, else the user turn of conversations/messages"
    )
    think_response_key: str = _key(
        "auto", "think_file: the response column; auto: response, else the assistant turn of conversations/messages"
    )
    short_model: str = _key("", "the instruct model that writes the <short> answers (hub id, folder or .gguf)")
    think_template_args: list[str] = _key([], "think_model: chat-template options, key=value each")
    short_template_args: list[str] = _key(
        [], "short_model: chat-template options, key=value each (Qwen3: [enable_thinking=false])"
    )
    think_n: int = _key(1, "think_model: samples per problem", low=1)
    think_temperature: float = _key(0.6, "think_model: sampling temperature", above=0)
    think_top_p: float = _key(0.95, "think_model: nucleus sampling", unit=True)
    think_max_tokens: int = _key(16384, "think_model: longest response; a longer one is cut off and dropped", low=1)
    short_n: int = _key(1, "short_model: samples per problem", low=1)
    short_temperature: float = _key(0.6, "short_model: sampling temperature", above=0)
    short_top_p: float = _key(0.95, "short_model: nucleus sampling", unit=True)
    short_max_tokens: int = _key(2048, "short_model: longest response; a longer one is cut off and dropped", low=1)
    keep_per_mode: int = _key(1, "correct responses kept per problem and mode, the first sampled; 0: all", low=0)
    require_both: bool = _key(False, "keep only problems with a correct answer in both modes")
    shard_size: int = _key(256, "problems per shard: the unit of work written at once, and of resuming", low=1)
    limit: int = _key(0, "only the first N problems (after dedup and the contamination guard); 0: all", low=0)
    format: str = _key("jsonl", "the hybrid file's format: jsonl or parquet", choices=("jsonl", "parquet"))


@dataclass
class DemoConfig:
    levels: int = _key(5, "demo only: difficulty levels (1..levels digits per operand)", low=1)
    mix: str = _key("3,1", "demo only: RL problems per level, easiest first, the last repeating (3x more 1-digit)")
    warmup_steps: int = _key(700, "demo only: warm-up SFT steps", low=0)
    warmup_batch_size: int = _key(128, "demo only: warm-up SFT examples per step", low=1)
    warmup_lr: float = _key(1e-3, "demo only: warm-up SFT peak learning rate (cosine decay)", above=0)
    eval_problems: int = _key(500, "demo only: problems per level in the before/after evaluation", low=1)
    hidden_size: int = _key(128, "demo only: width of the tiny Qwen2 (2 layers)", low=8)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = typing.get_type_hints(Config)  # section name -> its dataclass, in Config's order


def _field_types(section_cls) -> dict[str, object]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _set(config: Config, dotted: str, value) -> None:
    section, _, key = dotted.partition(".")
    if section not in SECTIONS or not key:
        sections = ", ".join(SECTIONS)
        raise ConfigError(f"unknown setting {dotted!r}: settings are section.key with section one of {sections}")
    kinds = _field_types(SECTIONS[section])
    if key not in kinds:
        raise ConfigError(f"unknown key {dotted!r}; the keys of {section!r} are: {', '.join(kinds)}")
    setattr(getattr(config, section), key, coerce(dotted, value, kinds[key]))


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), defaults: dict | None = None
) -> Config:
    """Defaults (`defaults`, {"section.key": value}, over the dataclasses'), then the YAML file, then the
    `section.key=value` overrides, in that order."""
    config = Config()
    for dotted, value in (defaults or {}).items():
        _set(config, dotted, value)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {at}{what}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown section {section!r} in {str(path)!r}; sections: {', '.join(SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"section {section!r} in {str(path)!r} must be a mapping of keys")
            for key, value in values.items():
                _set(config, f"{section}.{key}", value)
    for item in overrides:
        dotted, eq, text = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        _set(config, dotted.strip(), _parse_override(dotted.strip(), text))
    validate(config)
    return config


def _parse_override(dotted: str, text: str):
    """The value of `section.key=text` as its key's type reads it: text stays text (a path `yes`, an instruction
    with `: ` or `#`), a list is `[a, b]` or `a,b`, numbers and booleans are read by `coerce`."""
    section, _, key = dotted.partition(".")
    kind = _field_types(SECTIONS[section]).get(key) if section in SECTIONS else None
    if typing.get_origin(kind) is list and text.strip().startswith("["):
        try:  # every item as text (YAML 1.1 would read [on, yes, 007] as [True, True, 7]); `coerce` types them
            return yaml.load(text, Loader=yaml.BaseLoader)
        except yaml.YAMLError:
            raise ConfigError(f"{dotted} must be a list like [a.json, b.json], got {text!r}") from None
    return text  # _set's coercion gives it the key's type (or names the key when it cannot)


def validate(config: Config) -> None:
    """Every key's rule (`_key`: ranges and choices), then the rules between keys; checked before any data or
    model is read (a bad value must not cost a training step)."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            _check_rule(f"{section}.{f.name}", getattr(getattr(config, section), f.name), f.metadata)
    t, a, r = config.trainer, config.algo, config.rollout
    if bool(t.val_files) != bool(t.val_every):  # one without the other would be silently ignored
        given, missing = (
            ("trainer.val_files", "trainer.val_every") if t.val_files else ("trainer.val_every", "trainer.val_files")
        )
        raise ConfigError(f"{given} needs {missing} (validation during RL uses both)")
    if len(a.betas) != 2 or not all(0 <= b < 1 for b in a.betas):
        raise ConfigError(f"algo.betas must be two numbers in [0, 1), e.g. [0.9, 0.95]; got {a.betas!r}")
    if r.engine == "vllm" and not 0.01 <= r.temperature <= 2.0:  # vLLM raises lower ones to 0.01, refuses > 2
        raise ConfigError(f"rollout.temperature must be in [0.01, 2] with rollout.engine=vllm, got {r.temperature!r}")
    if r.cuda_graphs and not (r.compile and r.engine == "hf"):  # it would be silently ignored
        raise ConfigError("rollout.cuda_graphs needs rollout.engine=hf and rollout.compile=true (the graphs replay "
                          "the static-cache decode step)")  # fmt: skip
    if bool(config.data.filter_key) != bool(config.data.filter_values):
        raise ConfigError(
            "data.filter_key and data.filter_values go together, e.g. data.filter_key=type data.filter_values=[Algebra]"
        )
    if not (t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:")):
        raise ConfigError(f"trainer.device must be auto, cpu, cuda or cuda:<index>, got {t.device!r}")


def _check_rule(name: str, value, rule) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison; inf most
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if "low" in rule and value < rule["low"]:
        raise ConfigError(f"{name} must be >= {rule['low']}, got {value!r}")
    if "above" in rule and value <= rule["above"]:
        raise ConfigError(f"{name} must be > {rule['above']}, got {value!r}")
    if "unit" in rule and not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    if "choices" in rule and value not in rule["choices"]:
        raise ConfigError(f"{name} must be one of {', '.join(rule['choices'])}, got {value!r}")


def describe(defaults: dict | None = None) -> str:
    """Every key with its default (`defaults` over the dataclasses') and help, for `--help`."""
    config = Config()
    for dotted, value in (defaults or {}).items():
        _set(config, dotted, value)
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = getattr(getattr(config, section), f.name)
            lines.append(f"  {section}.{f.name} = {default!r}  # {f.metadata['help']}")
    return "\n".join(lines)
