"""Every relative link in the README and the docs pages leads somewhere.

A link `[text](path#anchor)` or image `![alt](path)` must name a file or folder that exists,
relative to the page; an anchor must match a heading of the target page, made into an id the
way GitHub does (lower case, punctuation dropped, spaces to hyphens, -1/-2 for repeats).
Web links (http, https, mailto) are not fetched. Links inside fenced code blocks are not links.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                ROOT / "qupath_scripts" / "README.md", ROOT / "benchmarks" / "README.md"])

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
EXTERNAL = ("http://", "https://", "mailto:", "ftp://")


def _prose_lines(text: str) -> list[str]:
    """The lines of a markdown page outside fenced code blocks."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's id for a heading: link targets reduced to their text, then lower case with
    punctuation other than - and _ dropped and spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The ids of a page's headings, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    ids = set()
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def broken_links(page: Path) -> list[str]:
    """'target: reason' for every relative link of `page` that does not resolve."""
    broken = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if target.startswith(EXTERNAL):
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            if not dest.exists():
                broken.append(f"{target}: no such file {dest}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert page.exists(), f"{page} is missing"
    assert broken_links(page) == []


def test_checker_finds_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Results on `the` test (14 images)\n## Results on the test 14 images\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Top\n"
        "[ok](other.md#results-on-the-test-14-images) [ok too](other.md#results-on-the-test-14-images-1)\n"
        "[self](#top) [web](https://example.org/none) `[code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[gone](missing.md) ![img](pics/none.png) [bad anchor](other.md#no-such-heading) [bad self](#nope)\n"
    )
    assert [b.split(":")[0] for b in broken_links(page)] == [
        "missing.md", "pics/none.png", "other.md#no-such-heading", "#nope"]
