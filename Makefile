# Every target sets itself up from nothing: a .venv with the pinned dependencies, then lorambo
# installed in editable mode. Stamps make a second run skip what is already installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS_STAMP    := $(VENV)/.deps-stamp
INSTALL_STAMP := $(VENV)/.install-stamp
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MAX_JOBS ?= 2
CSRC := $(shell find csrc -type f -name '*.cpp' -o -type f -name '*.cu' -o -type f -name '*.h')

.PHONY: all install data test demo bench bench-ext wheel sdist compile-cuda gpu-check gpu-sketch gpu-bundle gpu-experiment clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements/dev.txt | $(PY)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet -r requirements/dev.txt
	touch $@

$(INSTALL_STAMP): $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(INSTALL_STAMP)

# The sentiment task's data: Rotten Tomatoes sentences with human ratings (Hutto & Gilbert,
# ICWSM 2014), extracted from the vaderSentiment 3.3.2 sdist, which pip downloads once into
# $(LORAMBO_DATA_DIR)/vader (default ~/.cache/lorambo/vader).
data: $(INSTALL_STAMP)
	$(PY) -m lorambo.experiments.sentiment_data

test: $(INSTALL_STAMP) data
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(INSTALL_STAMP) data
	$(VENV)/bin/lorambo demo

bench: $(INSTALL_STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds

bench-ext: $(INSTALL_STAMP)
	$(PY) benchmarks/bench_ext.py --threads 1

wheel: $(DEPS_STAMP)
	$(PIP) wheel . --no-build-isolation --no-deps -w dist

sdist: $(DEPS_STAMP)
	$(PY) setup.py sdist -d dist

# Compile every csrc/*.cu to an sm_90 object (no GPU needed): catches CUDA compile errors.
compile-cuda: $(DEPS_STAMP)
	.ci/compile_cuda.sh $(PY)

# The whole GPU check in one call on the lent GPU machine (docs/gpu_check.md): the machine's own
# python3 and torch, no .venv and no pip, so it depends on none of the targets above.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(if $(OUT),--out "$(OUT)")

# The sketch kernels on the GPU, the call after gpu-check (docs/gpu_check.md): their tests on CUDA
# and bench_sketch --quick, into $(OUT) (default build/gpu-sketch); the machine's own python3.
gpu-sketch:
	PYTHON=$(PYTHON) sh benchmarks/gpu_sketch.sh $(OUT)

# The folder the GPU experiment reads on a machine without the model package, the data or a
# network (docs/gpu_experiment.md): MiniLM in fp16, the data files, a sha256 manifest; <= 56 MiB.
gpu-bundle: $(INSTALL_STAMP) data
	$(PY) -m lorambo.experiments.bundle build gpu_bundle

# One piece of the full experiment on the lent GPU machine (docs/gpu_experiment.md): the machine's
# own python3, no .venv, no pip. It reads gpu_bundle/ and continues gpu_runs/runs.jsonl when that
# journal exists (both carried); the journal so far comes back in $(OUT)/full/runs.jsonl.
GPU_WORKERS    ?= 8
GPU_TIME_LIMIT ?= 480
GPU_OUT        ?= $(if $(OUT),$(OUT),build/gpu-experiment)
gpu-experiment:
	PYTHONPATH=.:kernels PYTHONUNBUFFERED=1 $(PYTHON) -m lorambo.cli experiment --preset full --bundle gpu_bundle \
		--workers $(GPU_WORKERS) --time-limit $(GPU_TIME_LIMIT) --no-progress --out "$(GPU_OUT)/full" \
		$(if $(wildcard gpu_runs/runs.jsonl),--resume gpu_runs/runs.jsonl)

clean:
	rm -rf build dist *.egg-info .pytest_cache
