# cxr: `make demo` and `make test` are all a newcomer needs; both create .venv when it is missing.
# `make install` installs the test and export extras (onnx, onnxscript, onnxruntime: `cxr export`, `cxr predict --model`).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WORKERS ?= 2

.PHONY: install test demo bench eval recipes clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,export]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup tests

demo: $(STAMP)
	$(BIN)/python -m cli demo --out demo

bench: $(STAMP)
	$(BIN)/python bench/run.py --out BENCHMARKS.md

# Evaluate the newest run under runs/ and demo/runs/ (or RUN=path) on its test split.
eval: $(STAMP)
	$(BIN)/python -m cli eval --run "$(or $(RUN),$$(ls -td runs/*/ demo/runs/*/ 2>/dev/null | head -n 1))"

recipes: $(STAMP)
	bash recipes/phantom.sh

clean:
	rm -rf demo .bench
