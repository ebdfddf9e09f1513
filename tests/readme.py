"""The README's copy-paste blocks, as the tests run them: literally, the way a user copies them."""

from __future__ import annotations

import os

from tests.flanneld import REPO

README = os.path.join(REPO, "README.md")


def readme_section(heading: str) -> str:
    """The text under the README's `## heading`, up to the next `## `."""
    with open(README) as f:
        text = f.read()
    assert f"\n## {heading}\n" in text, f"README has no section {heading!r}"
    return text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def readme_block(heading: str, after: str = "") -> str:
    """The first indented code block under a README `## heading`, or the first one after the
    line that holds the text `after` in that section (the sentence that introduces it)."""
    section = readme_section(heading)
    if after:
        assert after in section, f"README's {heading!r} section no longer says {after!r}"
        section = section.split(after, 1)[1]
    lines: list[str] = []
    # The first line is the rest of the heading's or of `after`'s line.
    for line in section.splitlines()[1:]:
        if line.startswith("    "):
            lines.append(line[4:])
        elif lines:
            break
    assert lines, f"no indented block in README's {heading!r} section after {after!r}"
    return "\n".join(lines)


def command_blocks() -> list[tuple[str, str]]:
    """Every indented code block of the README, as readme_block gives it, with the heading of
    its section: lines indented by four spaces after a blank line (a list item's continuation
    lines follow its text, not a blank line), outside fenced blocks."""
    with open(README) as f:
        lines = f.read().splitlines()
    blocks: list[tuple[str, str]] = []
    heading, block, previous, fenced = "", None, "", False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("## "):
            heading = line[3:]
        if block is not None and line.startswith("    "):
            block.append(line[4:])
        elif block is not None:
            blocks.append((heading, "\n".join(block)))
            block = None
        elif not fenced and line.startswith("    ") and not previous.strip():
            block = [line[4:]]
        previous = line
    if block is not None:
        blocks.append((heading, "\n".join(block)))
    return blocks
