"""`thinkless-train`: the command-line entry point, the top layer of the package (it may import every other).

    thinkless-train {distill,sft,rl,eval,demo} [--config FILE.yaml] [key=value ...]
    thinkless-train plot RUN_DIR         # think ratio, accuracy, length and reward per RL step, as PNGs
    thinkless-train                      # the demo: a tiny model learns when to think, on CPU, in minutes

Settings are read and checked first (`thinkless.train.config`), then the data, then the model: a user mistake in
any of them exits with status 2 and one line that names it, before any training. The demo starts from its own
defaults (`thinkless.demo.run.DEFAULTS`); every key overrides them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from thinkless import __version__
from thinkless.train.checkpoint import CheckpointError
from thinkless.train.config import ConfigError, describe, load_config
from thinkless.train.data import DataError
from thinkless.train.model import ModelError
from thinkless.train.run import TrainingError

# The stages: the function that runs each (imported when it runs: `--help` stays fast) and its one-line help.
STAGES = {
    "distill": ("thinkless.train.distill:run_distill",
                "the warm-up data: each problem answered by a reasoning and an instruct model, verified, as SFT rows"),
    "sft": ("thinkless.train.sft:run_sft", "warm-up distillation on hybrid <short>/<think> data"),
    "rl": ("thinkless.train.rl:run_rl", "reinforcement learning with DeGRPO"),
    "eval": ("thinkless.train.eval:run_eval", "accuracy, think ratio and response length on validation files"),
    "demo": ("thinkless.demo.run:run_demo",
             "the built-in CPU demo: warm-up, then DeGRPO, on a task with difficulty levels"),
}  # fmt: skip
PLOT_HELP = "figures of an RL run from its metrics.jsonl: think ratio, accuracy and length per mode, reward"


def _runner(stage: str):
    module, function = STAGES[stage][0].split(":")
    return getattr(importlib.import_module(module), function)


def _defaults(stage: str) -> dict | None:
    """The stage's own defaults under the settings' (the demo's)."""
    if stage != "demo":
        return None
    from thinkless.demo.run import DEFAULTS

    return DEFAULTS


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block): the same shape as every other user mistake."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="thinkless-train",
        description="Train an LLM that learns when to think (Thinkless, arXiv 2505.13379): it opens every answer "
        "with <short> or <think>, learned by warm-up SFT and then DeGRPO.",
    )
    parser.add_argument("--version", action="version", version=f"thinkless {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="{" + ",".join([*STAGES, "plot"]) + "}")
    for name, (_, help_text) in STAGES.items():
        stage = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog="settings (section.key = default  # meaning):\n" + describe(_defaults(name)),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        stage.add_argument("--config", metavar="FILE.yaml", help="a YAML file of settings")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.n=8")
    # plot reads a finished (or running) run: a folder, not settings.
    plot = sub.add_parser("plot", help=PLOT_HELP, description=PLOT_HELP + "; PNGs in RUN_DIR/plots/")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a run's trainer.output_dir (it holds metrics.jsonl)")
    return parser


def _plot(run_dir: str) -> int:
    from thinkless.train.plot import plot_run

    try:
        for path in plot_run(run_dir):
            print(path)
    except DataError as err:
        print(f"thinkless-train plot: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before and after --config: argparse leaves the later ones over, and they join the rest.
    args, extra = parser.parse_known_args(argv)
    for item in extra:
        if item.startswith("-") or args.stage in (None, "plot"):
            parser.error(f"unrecognized argument: {item}")
        args.overrides.append(item)
    if args.stage == "plot":
        return _plot(args.run_dir)
    if args.stage is None:  # a bare `thinkless-train` runs the demo
        args.stage, args.config, args.overrides = "demo", None, []
    try:
        config = load_config(args.config, args.overrides, defaults=_defaults(args.stage))
        try:
            _runner(args.stage)(config)
        finally:
            from thinkless.train.dist import shutdown

            shutdown()
        return 0
    except (ConfigError, DataError, ModelError) as err:
        print(f"thinkless-train {args.stage}: error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingError) as err:  # not the user's mistake (a full disk, a NaN): status 1, one line
        print(f"thinkless-train {args.stage}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"thinkless-train {args.stage}: interrupted; run it again to resume from the last checkpoint",
              file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(main())
