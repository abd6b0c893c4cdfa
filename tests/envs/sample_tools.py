"""Function tools for the tests: self-contained, standard library only (they run in the sandbox)."""

import os


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    The rest of the docstring is not in the schema."""
    return a * b


def where_am_i() -> str:
    """The process's working directory and whether the host's /work is visible."""
    return f"{os.getcwd()} {os.path.exists('/work')}"


class RankTurns:
    """An environment whose conversations last 1 + RANK turns (torchrun sets RANK): ranks take
    different numbers of turns, which a sharded model's lockstep forwards must survive."""

    tools: list = []

    def reset(self, sample):
        return {"left": int(os.environ.get("RANK", "0"))}

    def step(self, state, message):
        from grpo.envs.base import Turn

        if state["left"] == 0:
            return Turn(done=True, reason="answered")
        state["left"] -= 1
        return Turn(messages=[{"role": "tool", "content": "again"}])

    def close(self):
        pass
