"""Chromium under Playwright for the browser tests and the screenshot script.

Debian's Chromium (testkit/tools.py installs it), never Playwright's own download:
the network the suite runs on allows Debian's archive and the package index only.
Every page the tests open is watched: an uncaught exception in the page, or an
error it logs to the console, fails the test, because a real user would see the
page break; only the network errors a test expects (a server it stopped on
purpose) are let through.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Error, Page, Playwright

# Without the background-networking switches Chromium keeps calling Google's
# services, which a closed network turns into a flood of failing requests.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# `null`, `undefined`, `NaN` or `[object Object]` on screen: a value the page forgot to format.
LEAKED = re.compile(r"\b(null|undefined|NaN)\b|\[object Object\]")

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TABLET = {"width": 820, "height": 1180}  # a tablet held upright: between the two layouts


async def launch(playwright: Playwright, executable: str) -> Browser:
    return await playwright.chromium.launch(
        executable_path=executable, args=CHROMIUM_ARGS, headless=True
    )


@dataclass
class Watched:
    """A page and what went wrong in it."""

    page: Page
    name: str
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    allowed: list[re.Pattern[str]] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        url = message.location.get("url", "") if message.location else ""
        text = f"{message.text} (at {url})" if url else message.text
        if not any(p.search(text) for p in self.allowed):
            self.console_errors.append(text)

    def on_page_error(self, error: Error) -> None:
        self.page_errors.append(f"{error.name}: {error.message}\n{error.stack or ''}".strip())

    def problems(self) -> list[str]:
        return [f"[{self.name}] uncaught: {e}" for e in self.page_errors] + [
            f"[{self.name}] console error: {e}" for e in self.console_errors
        ]


class Pages:
    """Opens pages, each in a fresh browser context (its own storage: one user each)."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.contexts: list[BrowserContext] = []
        self.watched: list[Watched] = []
        # Chromium asks for /favicon.ico on its own; no user sees that request fail.
        self.allowed: list[re.Pattern[str]] = [re.compile(r"\(at [^)]*/favicon\.ico\)$")]
        # Every URL any page asked for, in order: what a page must never ask is checkable.
        self.requested: list[str] = []

    def allow(self, pattern: str) -> None:
        """Let console errors matching `pattern` through, on every page (now and later)."""
        compiled = re.compile(pattern)
        self.allowed.append(compiled)
        for w in self.watched:
            w.allowed.append(compiled)

    async def open(
        self,
        url: str,
        *,
        name: str,
        timezone: str = "Europe/London",
        locale: str = "en-GB",
        viewport: dict[str, int] | None = None,
        **context_options: Any,
    ) -> Page:
        context = await self.browser.new_context(
            viewport=viewport or DESKTOP,  # type: ignore[arg-type]
            timezone_id=timezone,
            locale=locale,
            **context_options,
        )
        self.contexts.append(context)
        page = await context.new_page()
        watched = Watched(page, name, allowed=list(self.allowed))
        page.on("console", watched.on_console)
        page.on("pageerror", watched.on_page_error)
        page.on("request", lambda request: self.requested.append(request.url))
        self.watched.append(watched)
        await page.goto(url)
        return page

    def problems(self) -> list[str]:
        return [p for w in self.watched for p in w.problems()]

    async def leaked_values(self) -> list[str]:
        """Text a person should never read: a JavaScript value rendered as words."""
        found = []
        for w in self.watched:
            if w.page.is_closed() or not w.page.url.startswith("http"):
                continue
            text = await w.page.locator("body").inner_text()
            for line in text.splitlines():
                if LEAKED.search(line):
                    found.append(f"[{w.name}] {w.page.url.split('#')[0]}: {line.strip()!r}")
        return found

    async def close(self) -> None:
        for context in self.contexts:
            await context.close()


@asynccontextmanager
async def pages_of(browser: Browser) -> AsyncIterator[Pages]:
    pages = Pages(browser)
    try:
        yield pages
    finally:
        await pages.close()
