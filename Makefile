# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
RS := .venv/bin/rankscope
DEMO_CONFIG ?= configs/micro.yaml
DEMO_RUN ?= runs/demo

.PHONY: setup demo test test-slow bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(RS) prepare $(DEMO_CONFIG)
	$(RS) train $(DEMO_CONFIG) -o $(DEMO_RUN)
	$(RS) eval $(DEMO_RUN)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/throughput.py

clean:
	rm -rf runs data .pytest_cache
