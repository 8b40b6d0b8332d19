# privml: `make demo` (set up + main job), `make test` (set up + test suite), `make test-slow`.
.PHONY: setup demo test test-slow lint bench clean

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/privml demo

test: setup
	.venv/bin/python -m pytest

test-slow: setup
	.venv/bin/python -m pytest -m slow

lint: setup
	.venv/bin/ruff check privml models experiments tests

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
