# Two entry points: `make demo` (the main job) and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# keep in step with finn_flow.finn_compat.FINN_PLUS_VERSION (a test checks it)
FINN_PLUS_VERSION := 1.6.1

.PHONY: demo test lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# pinned CPU torch first: anything unpinned would resolve to a multi-GB CUDA build
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev,finn]'
	# FINN+ and the ap_int.h headers (hls4ml, for C++ simulation) without their dependencies:
	# finn-plus pins brevitas==0.13.0, onnx==1.21.0 and more that conflict with ours (and would pull a
	# CUDA torch); what it needs at run time is our `finn` extra above. pip warns about those pins.
	$(VENV)/bin/pip install --quiet --no-deps finn-plus==$(FINN_PLUS_VERSION) hls4ml==1.3.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/a2q demo --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV)
