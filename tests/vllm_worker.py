"""Run by tests/test_distributed.py under torchrun: `thinkless-train rl` with the CPU stand-in for vLLM
(fake_vllm.py) as `vllm`; each rank then writes what its engine was asked to do to <calls_dir>/rank<r>.json."""

import json
import os
import sys
from pathlib import Path

import fake_vllm


class _Modules:  # fake_vllm.install takes a monkeypatch; outside pytest, set the module for good
    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


if __name__ == "__main__":
    calls_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    fake_vllm.install(_Modules())
    from thinkless.cli import main

    status = main(argv)
    (engine,) = fake_vllm.LLM.instances
    plain = {k: v for k, v in engine.kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))}
    record = {"calls": engine.calls, "kwargs": plain}
    (calls_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(record))
    sys.exit(status)
