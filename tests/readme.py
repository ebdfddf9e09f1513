"""The README's copy-paste blocks, as the tests run them: literally, the way a user copies them."""

from __future__ import annotations

import os

from tests.flanneld import REPO


def readme_block(heading: str, after: str = "") -> str:
    """The first indented code block under a README `## heading`, or the first one after the
    line that holds the text `after` in that section (the sentence that introduces it)."""
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
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
