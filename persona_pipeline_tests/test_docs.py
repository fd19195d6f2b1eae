"""The docs a newcomer walks: README.md stays short, every line fits a screen, and nothing in README.md,
docs/ or deploy/README.md points at a file, heading or rule the repository lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from persona_pipeline_tests.conftest import REPO

README_MAX_LINES = 250
LINE_MAX_CHARS = 200
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "README.md"]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\s]+)`")
RULES_CITATION = re.compile(r"docs/rules\.md#([A-Za-z0-9_-]+)")
# Backticked paths worth checking: from the repository root, or short forms under persona_pipeline/.
ROOT_DIRS = ("persona_pipeline/", "persona_pipeline_tests/", "bench/", "deploy/", "workflows/", "datasets/", "docs/", ".ci/")
PACKAGE_DIRS = ("domain/", "db/", "assets/", "automation/", "resources/", "training/", "generation/", "review/")
FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".toml", ".sh", ".txt", ".png", ".example")


def _prose(path: Path) -> list[str]:
    """The lines of a markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """The heading anchors a markdown renderer gives `path` (GitHub's rule: lower case, punctuation
    dropped, spaces to hyphens, a repeated anchor numbered)."""
    seen: dict[str, int] = {}
    for line in _prose(path):
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_readme_is_short_and_no_doc_line_is_too_long():
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(readme) <= README_MAX_LINES, f"README.md has {len(readme)} lines; move detail into docs/"
    long_lines = [f"{_relative(doc)}:{number}: {len(line)} characters"
                  for doc in DOCS
                  for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
                  if len(line) > LINE_MAX_CHARS]
    assert not long_lines, long_lines


def test_every_relative_link_resolves_to_a_file_and_heading_in_the_repo():
    assert len(DOCS) > 1, "docs/ has no markdown files"
    broken = []
    for doc in DOCS:
        for line in _prose(doc):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                resolved = (doc.parent / file_part).resolve() if file_part else doc
                if not resolved.is_relative_to(REPO):
                    broken.append(f"{_relative(doc)}: {target} leaves the repository")
                    continue
                if not resolved.is_file():
                    broken.append(f"{_relative(doc)}: {target} is not a file in the repository")
                elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                    broken.append(f"{_relative(doc)}: {target} names no heading of {_relative(resolved)}")
    assert not broken, broken


def test_files_the_docs_name_exist():
    missing = []
    for doc in DOCS:
        for line in _prose(doc):
            for span in CODE_SPAN.findall(line):
                if any(mark in span for mark in "<>{}*$…") or not (span.endswith("/") or span.endswith(FILE_SUFFIXES)
                                                                  or "." not in span.rsplit("/", 1)[-1]):
                    continue
                if span.startswith(ROOT_DIRS):
                    path = REPO / span
                elif span.startswith(PACKAGE_DIRS):
                    path = REPO / "persona_pipeline" / span
                else:
                    continue
                if not path.exists():
                    missing.append(f"{_relative(doc)}: `{span}`")
    assert not missing, missing


def test_no_source_file_cites_a_file_outside_the_repository():
    """The older systems' rules are restated in docs/rules.md; nothing may send a reader elsewhere."""
    outside = "REFERENCES" + ".md"
    citing = [_relative(path) for pattern in ("persona_pipeline/**/*", "persona_pipeline_tests/**/*", "persona_fakes/**/*",
                                              "bench/**/*", "deploy/**/*", ".ci/*")
              for path in REPO.glob(pattern)
              if path.is_file() and path.suffix in (".py", ".md", ".yaml", ".html", ".js", "")
              and outside in path.read_text(encoding="utf-8", errors="replace")]
    assert not citing, citing


def test_every_citation_of_the_rules_names_a_section_of_docs_rules():
    anchors = _anchors(REPO / "docs" / "rules.md")
    cited, unknown = 0, []
    for path in [*REPO.glob("persona_pipeline/**/*.py"), *REPO.glob("persona_pipeline_tests/**/*.py"),
                 *REPO.glob("bench/*.py"), *DOCS]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for anchor in RULES_CITATION.findall(line):
                cited += 1
                if anchor not in anchors:
                    unknown.append(f"{_relative(path)}:{number}: docs/rules.md#{anchor}")
    assert cited, "nothing cites docs/rules.md"
    assert not unknown, unknown


def test_docs_cite_no_file_outside_the_repository():
    citing = [_relative(doc) for doc in DOCS if "REFERENCES" + ".md" in doc.read_text(encoding="utf-8")]
    assert not citing, citing
