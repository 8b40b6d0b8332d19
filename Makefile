# privml: `make demo` (set up + main job), `make test` (set up + test suite), `make test-slow`.
.PHONY: setup demo test test-slow lint clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/privml demo

test: setup
	.venv/bin/python -m pytest

# One pytest process per file: SEAL's memory pool keeps what a test freed, and the N=32768 LeNet-5
# session alone peaks at ~16 GB, so the slow files must not share a process on a 24 GB machine.
test-slow: setup
	@set -e; for f in $$(grep -l "mark.slow" tests/test_*.py); do \
		echo "== $$f"; .venv/bin/python -m pytest -m slow -q $$f || [ $$? -eq 5 ]; done

lint: setup
	.venv/bin/ruff check privml models experiments tests

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
