# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test clean-venv bench multilingual compare quality gpu-bundle

venv: $(STAMP)

# Order matters: fairseq-fixed builds C extensions against torch, and pip's isolated build
# environment would pull a second (multi-GB CUDA) torch. So torch and the build tools go in
# first, then fairseq-fixed without build isolation, then this package (its deps are satisfied).
$(STAMP): setup.py
	@echo "==> creating $(VENV) and installing dependencies (first time: ~4 minutes)"
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==2.13.0" cython numpy setuptools wheel
	$(VPY) -m pip install -q --no-build-isolation "fairseq-fixed==0.12.3.1"
	$(VPY) -m pip install -q --no-build-isolation -e ".[test,serve]"
	touch $(STAMP)

demo: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/demo/run.sh

# Two pytest workers (one test file each at a time, so a file's fixtures are built once), one torch
# thread per process: the tests' toy trainings gain nothing from threads, and two workers with two
# threads each would oversubscribe two cores. TEST_WORKERS=0 runs in one process. The 25 slowest
# tests are listed at the end: the suite's time depends on the CPU (13-17 min on the Intel Xeon
# machines, 28 min on an AMD EPYC with AVX2 only, where fairseq's imports alone take ~6 s a process),
# and the list says where it goes.
TEST_WORKERS ?= 2
test: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} \
		$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

bench: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VPY) benchmarks/speed.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VPY) benchmarks/expert_parallel.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VPY) benchmarks/memory.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VPY) benchmarks/serving.py --base
	@if [ -s work/demo/checkpoints/checkpoint_last.pt ]; then \
		PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VPY) benchmarks/serving.py --checkpoint work/demo/checkpoints/checkpoint_last.pt; \
	else echo "benchmarks/serving.py on make demo's model: skipped (run make demo first)"; fi

clean-venv:
	rm -rf $(VENV)

# Many-to-many THOR vs dense on de/fr/es<->en and fr<->es from gettext catalogs, 1,000 updates each
# (34 min on 2 idle cores, measured; see examples/multilingual/README.md for its knobs).
multilingual: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash examples/multilingual/run.sh

# A quick look before the study: dense, THOR E=2, Switch and hash, one seed, 300 updates each, through
# benchmarks/quality.py (its report in benchmarks/results/quality-quick/; about 20 min on 2 idle cores,
# estimated from the study's per-update costs).
compare: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VPY) benchmarks/quality.py --plan dense:1,thor2:1,switch:1,hash:1 \
		--max-update 300 --work work/quality-quick --out benchmarks/results/quality-quick

# Multi-seed quality study: dense, R-Drop, THOR E=2/E=4, Switch, hash on one recipe, BLEU/chrF2 at
# equal updates and at dense's training time (~9.5 h on 2 idle cores, estimated; resumable cell by
# cell: rerun to continue). E.g. make quality QUALITY_ARGS="--threads 1" or "--report-only".
QUALITY_ARGS ?=
quality: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VPY) benchmarks/quality.py $(QUALITY_ARGS)

# What the bare GPU machine lacks (wheels for Python 3.12, fairseq-fixed's source, the demo corpus),
# for benchmarks/gpu/check.sh; see README "GPU check". DEMO_CORPUS=work/quality/data reuses a corpus.
gpu-bundle: venv
	bash benchmarks/gpu/bundle.sh
