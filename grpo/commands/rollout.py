"""`grpo rollout serve`: a rollout engine (hf or vllm) served to trainers on other processes or hosts.

Why argparse plus the trainer's own keys: the network side (--host, --port, --token-file,
--weights-dir) is the server's alone, like `grpo sandbox serve`; what it serves is configured with
the same `model.*` and `rollout.*` keys (and `model=` / `rollout=` options) as `grpo train`, checked
by the same schemas, so a trainer's settings carry over as they are. No run directory is made: a
server keeps no record of its own.
"""

from __future__ import annotations

import argparse

from grpo.parts.config import UserError

_GROUPS = ("model", "rollout")


def rollout_main(argv: list[str]) -> int:
    """`grpo rollout serve [--host H] [--port P] --weights-dir DIR [model.path=... rollout.engine=hf ...]`."""
    p = argparse.ArgumentParser(prog="grpo rollout", description="Serve a rollout engine to trainers over HTTP.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve generation and weight loads over HTTP (README: Rollouts on their own "
                                     "processes)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8420, help="0 = any free port (the first line printed names it)")
    s.add_argument("--weights-dir", required=True,
                   help="the directory the trainer writes its weights to (its rollout.server_weights_dir); "
                        "weight files are read from under it only")
    s.add_argument("--token-file", help="file whose first line is the token trainers must send "
                   "(default: $GRPO_ROLLOUT_TOKEN, or the file named by $GRPO_ROLLOUT_TOKEN_FILE)")
    s.add_argument("--weight-transfer", choices=("files", "nccl"), default="files",
                   help="files: load the trainer's safetensors pushes from --weights-dir (anywhere); nccl: receive "
                        "them over NCCL through vLLM's weight-transfer API (rollout.engine=vllm on GPUs; the "
                        "trainer sets rollout.server_weight_transfer=nccl)")
    s.add_argument("--insecure", action="store_true", help="allow a bind beyond loopback without a token")
    s.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a client has to send a whole request")
    s.add_argument("--max-body", type=int, default=256 << 20, help="largest request in bytes")
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="model.* and rollout.* keys as for grpo train, e.g. model.path=DIR rollout.engine=hf")
    a = p.parse_args(argv)
    for o in a.overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if "=" not in o or key.split(".", 1)[0] not in _GROUPS:
            raise UserError(f"{o}: a rollout server takes model.* and rollout.* keys only (KEY=VALUE)")
    from grpo.cli import _check_overrides, compose_config
    from grpo.parts import logs
    from grpo.parts.config import ModelConfig, RolloutConfig, parse
    from grpo.parts.rollout.server import TOKEN_ENV, TOKEN_FILE_ENV, serve
    from grpo.sandbox.client import load_token

    _check_overrides("train", a.overrides)  # an unknown key or option: one line
    logs.quiet_libraries(logs.VERBOSE)  # no progress bars; the project's warnings still reach stderr
    cfg = compose_config("train", a.overrides)
    model, rollout = parse(ModelConfig, cfg["model"], "model"), parse(RolloutConfig, cfg["rollout"], "rollout")
    try:
        token = load_token(None, a.token_file, TOKEN_ENV, TOKEN_FILE_ENV, "rollout server")
        serve(model, rollout, a.weights_dir, a.host, a.port, a.weight_transfer, max_body=a.max_body, request_timeout=a.request_timeout,
              token=token, insecure=a.insecure)
    except ValueError as e:  # a bad flag (port, token, directory): one line
        raise UserError(str(e)) from None
    except OSError as e:  # the port is taken, the address is not ours
        raise UserError(f"cannot serve on {a.host}:{a.port}: {e.strerror or e}") from None
    return 0
