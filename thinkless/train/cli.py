"""`thinkless-train`: the command-line entry point.

    thinkless-train {sft,rl,eval,demo} [--config FILE.yaml] [key=value ...]

The kernels (`thinkless.kernels`) are in place; the training stages arrive with the trainer, so for now each
stage says so and exits with status 2 rather than pretending to run.
"""

from __future__ import annotations

import argparse
import sys

from thinkless import __version__

STAGES = {
    "sft": "warm-up distillation on hybrid <short>/<think> data",
    "rl": "reinforcement learning with DeGRPO",
    "eval": "accuracy, think ratio and response length on validation files",
    "demo": "the built-in CPU demo: warm-up, then DeGRPO, on a task with difficulty levels",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thinkless-train",
        description="Train an LLM that learns when to think (Thinkless, arXiv 2505.13379): it opens every answer "
        "with <short> or <think>, learned by warm-up SFT and then DeGRPO.",
    )
    parser.add_argument("--version", action="version", version=f"thinkless {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="{" + ",".join(STAGES) + "}")
    for name, help_text in STAGES.items():
        stage = sub.add_parser(name, help=help_text, description=help_text)
        stage.add_argument("--config", metavar="FILE.yaml", help="a YAML file of settings")
        stage.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.n=8")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage is None:
        parser.print_help()
        return 0
    print(
        f"thinkless-train {args.stage}: this stage is not available in thinkless {__version__} yet; "
        "the kernels are (see `python -c 'import thinkless.kernels; help(thinkless.kernels)'`).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
