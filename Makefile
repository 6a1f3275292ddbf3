# Two entry points: `make study` (the main job on the embedded digits data)
# and `make test` (the whole suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
WORKDIR ?= runs/study_digits

.PHONY: study test venv bench clean

venv: $(STAMP)

$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

study: $(STAMP)
	$(VENV)/bin/python -m experiments.run_study --config=experiments/configs/study_digits.py --workdir=$(WORKDIR)
	$(VENV)/bin/python -m experiments.report --workdir=$(WORKDIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python -m benchmarks.train_throughput

clean:
	rm -rf $(VENV) runs
