# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-slow install install-test bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	touch $@

# The package with its runtime dependencies (re-run when setup.cfg changes).
$(VENV)/.installed: $(VENV)/.created setup.cfg pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

# Test extras: pytest, the Hugging Face parity stack (torch CPU), TFDS/grain, espeak-ng voices.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,hf,data,audio]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Train the tiny DeepSeek-style MoE on the embedded corpus, evaluate, sample, print the workdir.
demo: $(VENV)/.installed
	$(PY) scripts/demo.py --workdir runs/demo

# The default suite on 8 simulated CPU devices (tests/conftest.py); slow tier excluded.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --durations=15

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow --durations=15

bench: $(VENV)/.installed-test
	$(PY) scripts/bench_moe.py
	$(PY) scripts/bench_generate.py

clean:
	rm -rf $(VENV) runs
