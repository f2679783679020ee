.PHONY: setup test lint format demo bench
setup:
	bash scripts/setup.sh
test:
	.venv/bin/python -m pytest -q
lint:
	.venv/bin/ruff check vlcache tests scripts plugins
	.venv/bin/ruff format --check vlcache tests scripts plugins
	.venv/bin/mypy vlcache plugins
format:
	.venv/bin/ruff check --fix vlcache tests scripts plugins
	.venv/bin/ruff format vlcache tests scripts plugins
demo:
	.venv/bin/python scripts/demo.py
bench:
	.venv/bin/python scripts/bench_decode.py
