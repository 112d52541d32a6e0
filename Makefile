# attune.py: each target says what it does. PYTHON runs every target; install writes
# a launcher that runs that interpreter.
PYTHON ?= python3
PREFIX ?= /usr/local
DESTDIR ?=
COVERAGE_MIN = 90
# dev tools come from pip into a private virtual environment built on $(PYTHON) (never needed
# by attune.py itself); a venv, so that its coverage .pth file measures the suite's processes
TOOLS = $(CURDIR)/.tools/$(shell $(PYTHON) -c 'import sys; print(sys.implementation.cache_tag)')
TOOL_RUN = $(TOOLS)/bin/python

.PHONY: help check test test-all ci lint coverage bench demo install uninstall tools

help:
	@echo "make demo       start the embedded Attune sandbox and walk through login, refresh, logout"
	@echo "make check      the quick part of the suite with $(PYTHON), for everyday work (under 2 minutes)"
	@echo "make test       the whole suite with $(PYTHON), a line per test class"
	@echo "make test-all   the whole suite on every CPython 3.6-3.13 from pyenv and on pypy3"
	@echo "make lint       pyflakes on attune.py and test_attune.py (no ignores)"
	@echo "make coverage   statement coverage of attune.py by the suite and its processes (fails below $(COVERAGE_MIN)%)"
	@echo "make ci         what CI runs: lint, then test-all with $(PYTHON)'s run measured for coverage"
	@echo "make bench      measure start-up, memory and concurrent refresh against their targets"
	@echo "make install    install the fast form: $(PREFIX)/bin/attune and $(PREFIX)/lib/attune/ (PREFIX, DESTDIR, PYTHON)"
	@echo "make uninstall  remove what make install wrote"

check:
	$(PYTHON) test_attune.py check

test:
	$(PYTHON) test_attune.py run-suite

# COVERAGE=1: $(PYTHON)'s run is measured (its processes too) and must reach COVERAGE_MIN
test-all: $(if $(COVERAGE),tools)
	$(if $(COVERAGE),$(TOOL_RUN),$(PYTHON)) test_attune.py test-all $(if $(COVERAGE),--coverage $(COVERAGE_MIN))

ci: lint
	$(MAKE) --no-print-directory test-all COVERAGE=1

# coverage 7.10 or newer measures subprocesses and os._exit (its patch = subprocess, _exit)
tools:
	@test -x $(TOOL_RUN) || $(PYTHON) -m venv --without-pip $(TOOLS)
	@$(TOOL_RUN) -c "import pyflakes, coverage; assert coverage.version_info >= (7, 10)" 2>/dev/null || \
	  $(PYTHON) -m pip install -q --disable-pip-version-check --upgrade \
	    --target "$$($(TOOL_RUN) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	    pyflakes "coverage>=7.10"

lint: tools
	$(TOOL_RUN) -m pyflakes attune.py test_attune.py

coverage: tools
	$(TOOL_RUN) test_attune.py coverage $(COVERAGE_MIN)

bench:
	$(PYTHON) test_attune.py bench

demo:
	$(PYTHON) test_attune.py demo

install:
	$(PYTHON) attune.py self-install --prefix "$(PREFIX)" $(if $(DESTDIR),--destdir "$(DESTDIR)")

uninstall:
	$(PYTHON) attune.py self-uninstall --prefix "$(PREFIX)" $(if $(DESTDIR),--destdir "$(DESTDIR)")
