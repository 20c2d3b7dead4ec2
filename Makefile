# The two commands: `make demo` and `make test`. Both set up whatever is missing first.
VENV := .venv

.PHONY: setup demo test server clean chaos

setup:
	@scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/xms demo

test: setup
	$(VENV)/bin/python -m pytest -q

server: setup
	$(VENV)/bin/xms server

chaos: setup
	$(VENV)/bin/python -m chaos.run

clean:
	rm -rf $(VENV) build *.egg-info
