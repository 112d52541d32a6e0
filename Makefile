# attune.py: each target says what it does. PYTHON runs every target; install writes
# a launcher that runs that interpreter.
PYTHON ?= python3
PREFIX ?= /usr/local
DESTDIR ?=
COVERAGE_MIN = 90
# dev tools come from pip into a private directory (never needed by attune.py itself)
TOOLS = .tools/$(shell $(PYTHON) -c 'import sys; print(sys.implementation.cache_tag)')
TOOL_RUN = PYTHONPATH=$(TOOLS) $(PYTHON)

.PHONY: help test test-all lint coverage bench demo install uninstall tools

help:
	@echo "make demo       start the embedded Attune sandbox and walk through login, refresh, logout"
	@echo "make test       run the test suite with $(PYTHON)"
	@echo "make test-all   run the test suite on every CPython 3.6-3.13 from pyenv and on pypy3"
	@echo "make lint       pyflakes on attune.py and test_attune.py (no ignores)"
	@echo "make coverage   statement coverage of attune.py under the suite (fails below $(COVERAGE_MIN)%)"
	@echo "make bench      measure start-up, memory and concurrent refresh against their targets"
	@echo "make install    install the fast form: $(PREFIX)/bin/attune and $(PREFIX)/lib/attune/ (PREFIX, DESTDIR, PYTHON)"
	@echo "make uninstall  remove what make install wrote"

test:
	$(PYTHON) -m unittest test_attune

test-all:
	$(PYTHON) test_attune.py test-all

tools:
	@$(TOOL_RUN) -c "import pyflakes, coverage" 2>/dev/null || \
	  $(PYTHON) -m pip install -q --disable-pip-version-check --target $(TOOLS) pyflakes coverage

lint: tools
	$(TOOL_RUN) -m pyflakes attune.py test_attune.py

coverage: tools
	ATTUNE_TEST_LONG=0 $(TOOL_RUN) -m coverage run --include=attune.py -m unittest test_attune
	$(TOOL_RUN) -m coverage report --show-missing --fail-under=$(COVERAGE_MIN) | tail -n 3

bench:
	$(PYTHON) test_attune.py bench

demo:
	$(PYTHON) test_attune.py demo

install:
	$(PYTHON) attune.py self-install --prefix "$(PREFIX)" $(if $(DESTDIR),--destdir "$(DESTDIR)")

uninstall:
	$(PYTHON) attune.py self-uninstall --prefix "$(PREFIX)" $(if $(DESTDIR),--destdir "$(DESTDIR)")
