"""The shared run parts every command is built from: the run skeleton (run.py), typed configs,
checkpoints, distributed wrapping, model loading, optimizers, batches and log-prob forwards,
reward sources, evaluation, tracking and logs, and the rollout engines (rollout/)."""
