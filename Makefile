# The two commands of the README. Both build (or reuse) the environment first.
.PHONY: serve test setup lint

setup:
	@scripts/setup.sh >/dev/null

serve:
	@venv=$$(scripts/setup.sh) && exec "$$venv/bin/deliberate" serve $(ARGS)

test:
	@venv=$$(scripts/setup.sh) && cd "$(CURDIR)" && \
	  PATH="$$venv/bin:$$PATH" python -m pytest $(PYTEST_ARGS)

lint:
	@venv=$$(scripts/setup.sh) && "$$venv/bin/ruff" check . && "$$venv/bin/ruff" format --check .
