# attune.py: each target says what it does. PYTHON runs test, demo and lint.
PYTHON ?= python3
PREFIX ?= /usr/local
RUFF = ruff check --isolated --target-version py37 --line-length 120 --select E,F,W,B --ignore B904

.PHONY: help test test-all lint bench demo install

help:
	@echo "make demo       start the embedded Attune sandbox and walk through login, refresh, logout"
	@echo "make test       run the test suite with $(PYTHON)"
	@echo "make test-all   run the test suite on every CPython 3.6-3.13 from pyenv and on pypy3"
	@echo "make lint       compile on every interpreter; ruff and vermin too when installed"
	@echo "make bench      measure start-up, memory and concurrent refresh against their targets"
	@echo "make install    copy attune.py to $(PREFIX)/bin/attune"

test:
	$(PYTHON) -m unittest test_attune

test-all:
	$(PYTHON) test_attune.py test-all

# attune.py keeps most of its code as text (START, PROGRAM); the linters read a copy
# with that text inlined on the same lines (test_attune.py flat).
lint:
	@set -e; for py in $$($(PYTHON) test_attune.py interpreters); do \
	  $$py -c 'compile(open("test_attune.py", encoding="utf-8").read(), "test_attune.py", "exec")'; \
	  $$py test_attune.py flat | $$py -c 'import sys; compile(sys.stdin.read(), "attune.py", "exec")'; \
	  echo "compiles with $$py"; done
	@if command -v ruff >/dev/null 2>&1; then \
	  $(PYTHON) test_attune.py flat | $(RUFF) --extend-ignore E402,F811 --stdin-filename attune.py - && \
	  $(RUFF) test_attune.py; else echo "ruff not installed: skipped"; fi
	@if command -v vermin >/dev/null 2>&1; then flat=$$(mktemp --suffix .py) && \
	  $(PYTHON) test_attune.py flat > $$flat && vermin -t=3.6- --no-tips --violations $$flat; \
	  status=$$?; rm -f $$flat; exit $$status; else echo "vermin not installed: skipped"; fi

bench:
	$(PYTHON) test_attune.py bench

demo:
	$(PYTHON) test_attune.py demo

install:
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 attune.py $(DESTDIR)$(PREFIX)/bin/attune
