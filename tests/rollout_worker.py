"""`grpo train` under torchrun made to wait for every rollout, for tests/parts/test_rollout_server.py:
grpo train's `submits` answers no, so rollout=server's lagged rollouts (rollout.max_staleness >= 1)
are generated in the foreground, one at a time, instead of sent in the background.

    torchrun --nproc_per_node W tests/rollout_worker.py [grpo train overrides ...]
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    import grpo.commands.train as T
    from grpo.cli import main

    T.submits = lambda engine: False
    main(["train", *sys.argv[1:]])
