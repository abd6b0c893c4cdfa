"""A checkpoint that cannot be written (a full disk, a read-only file system, no permission, a file
size limit) stops the run with one line naming the path and the cause, exit status 1, and leaves
the previous checkpoint as it was; never torch's "enforce fail at inline_container.cc" traceback.

The real conditions, made where the test can: a small tmpfs and a read-only remount in a user and
mount namespace (`unshare -Urm`), a directory without write permission (root's override dropped),
RLIMIT_FSIZE."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# Two one-process checkpoints through checkpoint.save, the second after `BREAK` (python code) has
# made writing fail; prints what happened as JSON.
SAVES = r"""
import json, os, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from grpo.parts import checkpoint

class Module:
    def save_pretrained(self, d):
        Path(d).mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.ones(64, 64)}, Path(d) / "model.safetensors")

class Tok:
    def save_pretrained(self, d):
        (Path(d) / "tokenizer.json").write_text("{}")

run = Path(sys.argv[1])
first = checkpoint.save(run, 1, {"model": Module()}, Tok(), {}, {"data_pos": 1})
BREAK
try:
    checkpoint.save(run, 2, {"model": Module()}, Tok(), {}, {"data_pos": 2, "big": torch.zeros(200_000)})
    out = {"error": None}
except checkpoint.SaveError as e:
    out = {"error": str(e)}
root = run / "checkpoints"
out.update(entries=sorted(os.listdir(root)), latest=(root / "latest").read_text().strip(),
           damaged=str(checkpoint.damaged_file(first)), data_pos=checkpoint.load_state(first)["data_pos"])
print(json.dumps(out))
"""


def saves(run_dir, breaker: str, prefix=(), preexec=None):
    p = subprocess.run([*prefix, sys.executable, "-c", SAVES.replace("BREAK", breaker), str(run_dir)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
                       preexec_fn=preexec, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "inline_container" not in p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def assert_line(line, run_dir, where, cause):
    """One line: the checkpoint, the path written (under checkpoints/, `where` a pattern), the cause."""
    import re

    root = re.escape(f"{run_dir}/checkpoints")
    assert re.fullmatch(f"checkpoint step_000002 not written: {root}{where}: {re.escape(cause)}; "
                        f"the previous checkpoint, {root}/step_000001, is intact", line), line


def assert_previous_intact(out, run_dir):
    # the failed save left nothing: no step_000002, no .tmp_step_*; `latest` still names step 1, whole
    assert out["entries"] == ["latest", "step_000001"] and out["latest"] == "step_000001"
    assert out["damaged"] == "None" and out["data_pos"] == 1


def namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                       capture_output=True, timeout=30)
    return p.returncode == 0


needs_namespaces = pytest.mark.skipif(not namespaces_work(), reason="no user+mount namespaces (unshare -Urm)")


@needs_namespaces
def test_a_full_disk_stops_grpo_train_with_one_line(tiny_model_dir, tmp_path):
    """`grpo train` in a run dir on a 1000 KiB tmpfs: step 1's checkpoint fits, step 2's does not."""
    from tests.commands.test_train_e2e import TOY

    mnt = tmp_path / "disk"
    mnt.mkdir()
    args = [sys.executable, "-m", "grpo", "train", f"model.path={tiny_model_dir}", "logger=jsonl",
            "trainer.prompts_per_step=4", "algorithm.group_size=4", "rollout.max_new_tokens=6", "trainer.eval_size=8",
            "task.eval_size=8", f"'{TOY}'", "trainer.eval_every=0", "trainer.save_every=1", "trainer.max_steps=3",
            f"hydra.run.dir={mnt}/run"]
    check = ("from grpo.parts import checkpoint; import os, sys; r = sys.argv[1] + '/run/checkpoints'; "
             "print(sorted(os.listdir(r)), open(r + '/latest').read().strip(), "
             "checkpoint.damaged_file(r + '/step_000001'), checkpoint.load_state(r + '/step_000001')['step'])")
    script = (f"mount -t tmpfs -o size=1000k tmpfs {mnt} && {' '.join(args)}; echo rc=$?; "
              f"{sys.executable} -c \"{check}\" {mnt}")
    p = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
    out = p.stdout.strip().splitlines()
    assert out[-2] == "rc=1", p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert errors == [f"grpo train: error: checkpoint step_000002 not written: {mnt}/run/checkpoints: No space left "
                      f"on device (ENOSPC); the previous checkpoint, {mnt}/run/checkpoints/step_000001, is intact"]
    assert "inline_container" not in p.stderr
    assert out[-1] == "['latest', 'step_000001'] step_000001 None 1"


@needs_namespaces
def test_a_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    # 200 KiB: step 1 (a 16 KiB model) fits; step 2's 800 KB state.pt does not
    code = (f"mount -t tmpfs -o size=200k tmpfs {mnt} && exec {sys.executable} -c \"$SAVES\" {mnt}/run")
    p = subprocess.run(["unshare", "-Urm", "sh", "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), SAVES=SAVES.replace("BREAK", "")), timeout=300)
    assert p.returncode == 0 and "inline_container" not in p.stderr, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert_line(out["error"], mnt / "run", "/.tmp_step_000002_[^/]+/state.pt", "No space left on device (ENOSPC)")
    assert_previous_intact(out, mnt / "run")


@needs_namespaces
def test_a_read_only_file_system_keeps_the_previous_checkpoint(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    breaker = f"import subprocess; subprocess.run(['mount', '-o', 'remount,ro', '{mnt}'], check=True)"
    code = f"mount -t tmpfs -o size=4m tmpfs {mnt} && exec {sys.executable} -c \"$SAVES\" {mnt}/run"
    p = subprocess.run(["unshare", "-Urm", "sh", "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), SAVES=SAVES.replace("BREAK", breaker)), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert_line(out["error"], mnt / "run", "/.tmp_step_000002_[^/]+", "Read-only file system (EROFS)")
    assert_previous_intact(out, mnt / "run")


def drop_root_override():
    """In the child: root without the capabilities that override file modes (a plain user has none)."""
    import ctypes

    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, dropped for the exec'd python
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                os._exit(77)


def file_modes_apply(tmp_path) -> bool:
    """Whether a child started with drop_root_override is refused a write into a 0555 directory."""
    d = tmp_path / "modes"
    d.mkdir(mode=0o555)
    p = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1] + '/x', 'w')", str(d)],
                       capture_output=True, text=True, preexec_fn=drop_root_override)
    d.chmod(0o755)
    return "PermissionError" in p.stderr


def test_no_permission_keeps_the_previous_checkpoint(tmp_path):
    if not file_modes_apply(tmp_path):
        pytest.skip("this root cannot drop its file-mode override")
    breaker = "os.chmod(run / 'checkpoints', 0o555)"
    try:
        out = saves(tmp_path / "run", breaker, preexec=drop_root_override)
    finally:
        if (tmp_path / "run" / "checkpoints").exists():
            os.chmod(tmp_path / "run" / "checkpoints", 0o755)
    assert_line(out["error"], tmp_path / "run", "/.tmp_step_000002_[^/]+", "Permission denied (EACCES)")
    assert_previous_intact(out, tmp_path / "run")


def test_a_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    """RLIMIT_FSIZE (100 KB): step 2's state.pt (800 KB) is cut by the kernel with EFBIG."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = saves(tmp_path / "run", "", preexec=limit)
    assert_line(out["error"], tmp_path / "run", "/.tmp_step_000002_[^/]+/state.pt", "File too large (EFBIG)")
    assert_previous_intact(out, tmp_path / "run")


@pytest.mark.slow
@needs_namespaces
def test_a_full_disk_under_torchrun_stops_every_rank_with_one_line(tiny_model_dir, tmp_path):
    """Two ranks on a 1400 KiB tmpfs: step 2's save fails; every rank stops (none waits at a barrier
    for the other) and rank 0 alone prints the line; torchrun then reports its failed children."""
    from tests.commands.test_train_e2e import TOY

    mnt = tmp_path / "disk"
    mnt.mkdir()
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "grpo",
            "train", f"model.path={tiny_model_dir}", "logger=jsonl", "trainer.prompts_per_step=4",
            "algorithm.group_size=4", "rollout.max_new_tokens=6", "trainer.eval_size=8", "task.eval_size=8",
            f"'{TOY}'", "trainer.eval_every=0", "trainer.save_every=1", "trainer.max_steps=3", f"hydra.run.dir={mnt}/run"]
    script = (f"mount -t tmpfs -o size=1400k tmpfs {mnt} && {' '.join(args)}; echo rc=$?; "
              f"ls {mnt}/run/checkpoints | tr '\\n' ' '")
    p = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=600)
    out = p.stdout.strip().splitlines()
    assert out[-2] == "rc=1" and out[-1].split() == ["latest", "step_000001"], p.stderr[-3000:]
    ours = [x for x in p.stderr.splitlines() if x.startswith("grpo train: error")]
    assert len(ours) == 1 and "checkpoint step_000002 not written" in ours[0] and "(ENOSPC)" in ours[0], p.stderr[-5000:]
    assert "inline_container" not in p.stderr
