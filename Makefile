# The two commands a newcomer runs (see README.md):
#   make demo   set up .venv, then run the main job on the embedded synthetic benchmark
#   make test   set up .venv, then run the test suite
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
TEST_STAMP := $(VENV)/.requirements-test-installed

.PHONY: setup setup-test demo test test-fast test-durations bench clean

$(STAMP): requirements.txt
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt
	@command -v java >/dev/null 2>&1 || echo "WARNING: no java on PATH: the COCO caption metrics (PTB tokenizer, METEOR, SPICE) need Java 8+; install it as docs/CAPTIONING.md 'Java (caption metrics)' says (e.g. sudo apt-get install -y default-jre-headless)" >&2
	@touch $(STAMP)

# The test-only requirements (pytest, img2dataset...) on top of the run-time ones.
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PYTHON) -m pip install -q -r requirements-test.txt
	@touch $(TEST_STAMP)

setup: $(STAMP)

setup-test: $(TEST_STAMP)

demo: setup
	bash run.sh demo

# The suite on TEST_WORKERS pytest-xdist workers (a test file stays on one worker: its module-scoped
# runs are shared; the longest files first, by tests/durations.json, in conftest's order), then the
# few tests that bound a wall time (a hang given up on in time) alone.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The files that hold a timing test: the second part collects only these.
TIMING_FILES = $(shell grep -l "mark.timing" tests/test_*.py)

test: setup-test
	$(PYTEST_PARALLEL) -m "not timing" --durations=30
	$(PYTHON) -m pytest -q -m timing $(TIMING_FILES)

# The inner loop: everything but the end-to-end runs and torchrun launches.
test-fast: setup-test
	$(PYTEST_PARALLEL) -m "not slow and not dist and not timing"
	$(PYTHON) -m pytest -q -m "timing and not slow and not dist" $(TIMING_FILES)

# Re-measure tests/durations.json (the order the files are handed out in) with the parallel part.
test-durations: setup-test
	$(PYTEST_PARALLEL) -m "not timing" --durations=0 | tee .test-durations.txt
	$(PYTHON) -m tests.scripts.durations .test-durations.txt

bench: setup
	$(PYTHON) -m bench.bench_eval

clean:
	rm -rf outputs/demo
