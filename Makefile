# One command for the main job, one for the tests; each sets up .venv when it is missing.
# The main job installs only the package; the tests add the dev extra (Model Garden, the
# notebook's kernel, pytest, ruff).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed

.PHONY: setup quickstart quickstart-classification quickstart-maskrcnn test test-slow lint benchmark clean

$(RUN_STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# Generates the synthetic shapes data (first run), trains, evaluates; prints COCO AP.
quickstart: $(RUN_STAMP)
	$(PY) -m spinenet_tf.train --gin_file=gin_configs/experiments/quickstart.gin \
		--model_dir=runs/quickstart --mode=train_and_eval

# The classifier's: synthetic shapes classification data, train, evaluate; prints top-1.
quickstart-classification: $(RUN_STAMP)
	$(PY) -m spinenet_tf.train --gin_file=gin_configs/experiments/quickstart_classification.gin \
		--model_dir=runs/quickstart_classification --mode=train_and_eval

# Mask R-CNN's: the same shapes data with its instance masks; prints box and mask AP.
quickstart-maskrcnn: $(RUN_STAMP)
	$(PY) -m spinenet_tf.train --gin_file=gin_configs/experiments/quickstart_maskrcnn.gin \
		--model_dir=runs/quickstart_maskrcnn --mode=train_and_eval

test: $(STAMP)
	$(PY) -m pytest

# The slow tests in two passes: two workers for most, then the memory-hungry ones alone, each
# in a process of its own (twelve XLA compiles in one process ended in a segfault). Both
# passes always run; either failing fails the target, and the failed heavy tests are listed.
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not memory"; light=$$?; \
	failed=""; \
	for t in $$($(PY) -m pytest -m "slow and memory" -n 0 --collect-only -q | grep "::"); do \
		$(PY) -m pytest -n 0 -m "slow and memory" "$$t" || failed="$$failed $$t"; \
	done; \
	test -z "$$failed" || echo "FAILED (memory pass):$$failed"; \
	test $$light -eq 0 && test -z "$$failed"

lint: $(STAMP)
	$(PY) -m ruff check spinenet_tf tests benchmarks examples
	$(PY) -m ruff format --check spinenet_tf tests benchmarks examples

benchmark: $(STAMP)
	$(PY) benchmarks/backbone.py
	$(PY) benchmarks/retinanet.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/tflite.py
	$(PY) benchmarks/maskrcnn.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache runs data/shapes data/shapes_classification
