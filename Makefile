# attune.py: each target says what it does. PYTHON runs test, demo and lint.
PYTHON ?= python3
PREFIX ?= /usr/local

.PHONY: help test test-all lint demo install

help:
	@echo "make demo       start the embedded Attune sandbox and walk through login, refresh, logout"
	@echo "make test       run the test suite with $(PYTHON)"
	@echo "make test-all   run the test suite on every CPython 3.6-3.13 from pyenv and on pypy3"
	@echo "make lint       compile on every interpreter; ruff and vermin too when installed"
	@echo "make install    copy attune.py to $(PREFIX)/bin/attune"

test:
	$(PYTHON) -m unittest test_attune

test-all:
	$(PYTHON) test_attune.py test-all

lint:
	@set -e; for py in $$($(PYTHON) test_attune.py interpreters); do \
	  $$py -c 'import sys; [compile(open(f, encoding="utf-8").read(), f, "exec") for f in sys.argv[1:]]' \
	    attune.py test_attune.py && echo "compiles with $$py"; done
	@if command -v ruff >/dev/null 2>&1; then ruff check --isolated --target-version py37 --line-length 120 --select E,F,W,B --ignore B904 attune.py test_attune.py; \
	  else echo "ruff not installed: skipped"; fi
	@if command -v vermin >/dev/null 2>&1; then vermin -t=3.6- --no-tips --violations attune.py; \
	  else echo "vermin not installed: skipped"; fi

demo:
	$(PYTHON) test_attune.py demo

install:
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 attune.py $(DESTDIR)$(PREFIX)/bin/attune
