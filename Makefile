# Every target that needs Python depends on `install`, which builds .venv once (and again only
# when pyproject.toml changes), so `make train-local` and `make test` work on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: install constraints notebooks train-local evaluate-local extract-local test test-fast lint bench bench-natural bench-cluster bench-extract bench-analysis bench-shards gpu-check slurm-up slurm-down clean chromium

install: $(STAMP)

# constraints.txt holds the exact versions the tests pass with; pyproject.toml only minimums.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,all]'  # all: timm, open_clip, transformers (their tests run)
	touch $(STAMP)

constraints: install  ## rewrite constraints.txt from the venv (after a deliberate upgrade)
	{ sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze | grep -viE '^(-e|bonnerlab|nvidia-|cuda-|triton)'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

train-local: install  ## train mnist_cnn on the embedded digits dataset (CPU, offline, < 1 min)
	$(PY) jobs/train.py $(ARGS)

evaluate-local: install  ## evaluate the newest run's best checkpoint
	$(PY) jobs/evaluate.py $(ARGS)

# The SLURM tests (marker `slurm`) mostly wait on the scheduler and must not share the cluster
# with each other (a preemption test displaces every running job), so they run in one pytest
# process while the CPU-bound rest runs in parallel beside them (2 xdist workers).
test: install  ## the whole suite, slow and cluster tests included
	@$(PY) -m pytest -q -p no:cacheprovider -m slurm $(ARGS) > .slurm-tests.log 2>&1 & cluster=$$!; \
	$(PY) -m pytest -q -n 2 -m "not slurm" $(ARGS); rest=$$?; \
	wait $$cluster; slurm=$$?; echo "---- SLURM tests ----"; cat .slurm-tests.log; \
	[ $$slurm -eq 5 ] && slurm=0; [ $$rest -eq 5 ] && rest=0; \
	exit $$(( rest || slurm ))

test-fast: install  ## skip tests marked slow
	$(PY) -m pytest -q -n 2 -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

notebooks: install  ## execute notebooks/*.ipynb in place, so they are committed with their figures
	$(PY) tests/docs/test_notebooks.py

bench: install  ## benchmarks: ratios against reference implementations, measured in one run
	$(PY) bench/bench_train.py $(ARGS)

bench-natural: install  ## ResNet-18 on 2,000 JPEG photographs: natural preset vs a torchvision DataLoader loop
	$(PY) bench/bench_natural.py $(ARGS)

bench-cluster: install  ## cluster costs on the local SLURM (starts it if needed; root)
	$(PY) bench/bench_cluster.py

bench-extract: install  ## extraction vs a bare forward pass (images/s, peak RSS)
	$(PY) bench/bench_extract.py

bench-analysis: install  ## Gram/RDM and encoding from a store vs numpy, rsatoolbox, sklearn, himalaya
	$(PY) bench/bench_analysis.py $(ARGS)

bench-shards: install  ## training batches/s and extraction images/s from shards vs the same folder, files opened
	$(PY) bench/bench_shards.py $(ARGS)

gpu-check: install  ## only when a GPU is lent: AMP + channels-last training, NCCL DDP, CUDA evaluation, GPU decode + shards (section 7)
	$(PY) bench/gpu_check.py

slurm-up:  ## start the one-node SLURM cluster on localhost (root; installs Debian packages)
	bash slurm/start-cluster.sh

slurm-down:
	bash slurm/stop-cluster.sh

clean:
	rm -rf runs .pytest_cache

chromium:  ## Debian's Chromium, for the headless test of report.html (root)
	command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }
