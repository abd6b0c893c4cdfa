"""Tasks for the pool tests: a worker target whose behaviour the test picks (hang, raise, allocate)."""

import time

WARMED = []  # warm() appends: how many times this worker ran it


def warm():
    WARMED.append(time.monotonic())


def run(task):
    kind, arg = task
    if kind == "warmed":
        return len(WARMED)
    if kind == "add":
        return arg[0] + arg[1]
    if kind == "sleep":
        time.sleep(arg)
        return None
    if kind == "raise":
        raise ValueError(arg)
    if kind == "alloc_mb":
        return len(bytearray(arg * 1024 * 1024))
    raise KeyError(kind)
