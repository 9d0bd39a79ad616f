"""Browser fixtures: one Chromium per test module (launching is the slow part)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright, expect

from testkit.browser import Pages, launch, pages_of
from testkit.fixtures import Spawn
from testkit.tools import ensure_chromium
from tests.browser.kit import EXPECT_MS


@pytest.fixture(scope="module")
def chromium() -> str:
    reasons: list[str] = []
    path = ensure_chromium(reasons)
    if path is None:
        pytest.skip(reasons[0])
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    expect.set_options(timeout=EXPECT_MS)
    async with async_playwright() as playwright:
        b = await launch(playwright, chromium)
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def pages(browser: Browser, spawn_server: Spawn) -> AsyncIterator[Pages]:
    """Fresh contexts for the test; closed before its servers stop (spawn_server is older)."""
    async with pages_of(browser) as p:
        yield p
        problems = p.problems()
        assert not problems, "the pages reported errors:\n" + "\n".join(problems)
        leaked = await p.leaked_values()
        assert not leaked, "the pages show unformatted values:\n" + "\n".join(leaked)


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ---- the world behind the pages ----------------------------------------------------------------
