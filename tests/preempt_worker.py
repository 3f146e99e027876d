"""`thinkless-train`, with a SIGTERM sent to itself at the PREEMPT_AT-th mini-batch update, on rank PREEMPT_RANK
only, PREEMPT_TIMES times (2: the second signal must end the process at once)."""

import os
import signal
import sys

from thinkless.train import rl

AT, RANK = int(os.environ["PREEMPT_AT"]), os.environ.get("PREEMPT_RANK", "0")
TIMES = int(os.environ.get("PREEMPT_TIMES", "1"))
real, calls = rl.mini_batch_backward, [0]


def signalled(*args, **kwargs):
    calls[0] += 1
    if calls[0] == AT and os.environ.get("RANK", "0") == RANK:
        for _ in range(TIMES):
            os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)


rl.mini_batch_backward = signalled
if __name__ == "__main__":
    from thinkless.cli import main

    sys.exit(main(sys.argv[1:]))
