# The two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PY := .venv/bin/python
RS := .venv/bin/rankscope
DEMO_CONFIG ?= configs/micro.yaml
DEMO_RUN ?= runs/demo
DEMO_REPORT ?= reports/$(notdir $(DEMO_RUN))
# BLiMP: the real files where ../shared/data/blimp exists, else the built-in generated pairs
BLIMP ?= $(if $(wildcard ../shared/data/blimp/*.jsonl),../shared/data/blimp,builtin)

.PHONY: setup demo test test-unit test-slow bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(RS) prepare $(DEMO_CONFIG)
	$(RS) train $(DEMO_CONFIG) -o $(DEMO_RUN)
	$(RS) eval $(DEMO_RUN) --blimp $(BLIMP) --blimp-max-pairs 50 --json $(DEMO_RUN)/eval.json
	@echo "\nrun directory: $(DEMO_RUN) (config.yaml, metrics.jsonl, summary.json, eval.json, checkpoints/, tensorboard/)"
	@echo "next (or 'source .venv/bin/activate' once, then drop the .venv/bin/ prefix):"
	@echo "  $(RS) analyze $(DEMO_RUN)"
	@echo "  $(RS) report $(DEMO_RUN) -o $(DEMO_REPORT)      # then open $(DEMO_REPORT)/report.html"
	@echo "then the paper's four questions at the smallest sizes (full vs ReLoRA, 3 paired seeds; --check first says how long):"
	@echo "  $(RS) sweep --check studies/quick.yaml && $(RS) sweep studies/quick.yaml && $(RS) report runs/quick -o reports/quick"

# test: ruff, then the default suite (tests/unit + tests/integration, minus the `slow` and `gpu` markers)
test: setup
	.venv/bin/ruff check src tests bench
	$(PY) -m pytest -q

# test-unit: tests/unit only (no training run, no launched run): seconds, for every edit
test-unit: setup
	$(PY) -m pytest -q tests/unit

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/throughput.py

clean:
	rm -rf runs data .pytest_cache
