"""Test support code: services (harness), system tools, Chromium, screenshots, fixtures,
and the helpers more than one test file uses (wire, engine, layout).

Imported by the suite (tests/), by `bench/` and by the Makefile (`make tools`,
`make screenshots`). It is not installed (pyproject's packages leave it out, so
the slotcast wheel ships no test code and needs no Playwright): it is found from
the repository root, which is on sys.path for each of its users: pytest through
`pythonpath = ["."]`, `python -m testkit.screenshots` and `python -c` through the
working directory (the Makefile runs at the root), and `bench/*.py` by inserting
the root themselves.
"""
