"""What the pages promise that needs no browser: every error code has words, every import a file.

The browser tests (tests/browser/test_browser.py) show a few error messages for real; this
keeps the rest from drifting when protocol/errors.py gains a code.
"""

from __future__ import annotations

import re

from protocol.errors import ErrorCode
from testkit.harness import REPO

STATIC = REPO / "static"


def test_every_error_code_has_a_human_message_on_the_pages() -> None:
    source = (STATIC / "js" / "messages.js").read_text()
    table = source.split("const ERROR_TEXT = {", 1)[1].split("\n};", 1)[0]
    worded = set(re.findall(r"^\s+(\w+): \"[^\"]{10,}\",?$", table, re.MULTILINE))
    assert {code.value for code in ErrorCode} <= worded
    assert worded - {code.value for code in ErrorCode} == {"offline"}  # the page's own


def test_every_module_import_and_page_asset_exists() -> None:
    """No build step: a typo in an import path is a blank page, so catch it here."""
    modules = sorted((STATIC / "js").glob("*.js"))
    imports = [
        (module, target)
        for module in modules
        for target in re.findall(r"""^import .*? from "(\.[^"]+)";""", module.read_text(), re.M)
    ]
    assert len(imports) >= len(modules)  # the pattern still finds them
    for module, target in imports:
        assert (module.parent / target).resolve().is_file(), f"{module.name}: {target}"
    for page in ("index.html", "doctor.html", "clinic.html"):
        html = (STATIC / page).read_text()
        assets = re.findall(r"""(?:src|href)="/static/([^"]+)\"""", html)
        assert assets, page
        for asset in assets:
            assert (STATIC / asset).is_file(), f"{page}: {asset}"
