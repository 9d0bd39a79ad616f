"""docs/deploy.md as data: its named blocks, so tests run what the operator is told to.

Each block the deployment test knows is preceded by `<!-- deploy:NAME -->`. A test
takes a block's text from here and changes only addresses, ports and paths
(`substitute`), so the document and what is tested cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from testkit.harness import REPO

DEPLOY_MD = REPO / "docs" / "deploy.md"
_BLOCK = re.compile(r"<!-- deploy:([a-z0-9-]+) -->\n```([a-z]*)\n(.*?)\n```", re.S)


@dataclass(frozen=True)
class Block:
    name: str
    lang: str
    text: str


def blocks(path: Path = DEPLOY_MD) -> dict[str, Block]:
    """Every named block, in the document's order (names are unique)."""
    found: dict[str, Block] = {}
    for match in _BLOCK.finditer(path.read_text()):
        name, lang, text = match.groups()
        if name in found:
            raise ValueError(f"{path.name}: two blocks named {name!r}")
        found[name] = Block(name, lang, text)
    return found


def substitute(text: str, replacements: dict[str, str]) -> str:
    """Replace each key (longest first, so a path and its prefix do not collide)."""
    for old in sorted(replacements, key=len, reverse=True):
        text = text.replace(old, replacements[old])
    return text


def assignments(text: str) -> dict[str, str]:
    """NAME=value lines (an environment file, or a block of them), comments skipped."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip()
    return found


def unit_sections(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (a key may repeat, e.g. Environment)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections
