"""The user documentation stays short, starts with the two commands, and its links lead somewhere.

README.md is for users (at most ~200 lines); measurements live in docs/performance.md and the design
in docs/architecture.md. Every relative link in README.md and docs/*.md must name a file of the
repository (and, for a link into a Markdown file, a heading that exists there), and every measured
number README quotes (a decimal in GiB, or a ratio like 1.018x) must be the text of a link to its raw
file under bench/.
"""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 220
SETUP_AND_DEMO = ("python3 -m pip install torch==2.13.0 -r requirements.txt pytest 'peft>=0.17' && "
                  "python3 -m cogvid_core demo --out demo/demo.mp4")
TESTS = "python3 -m pytest -q tests"

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^)\s]+)\)")   # [text](target), ![alt](target)
SPACED_LINK = re.compile(r"\]\(([^)\s]*\s[^)]*)\)")     # [text](a b.json): not a link on GitHub; write a%20b.json
MEASURED = re.compile(r"\d+\.\d+\s?(?:GiB\b|x\b)")                      # 6.02 GiB, 1.018x


def _prose(text: str) -> str:
    """The text outside code blocks and inline code (commands there are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", FENCE.sub("", md.read_text()), re.M)}


def broken_links(md: Path) -> list[str]:
    bad = [f"{md.name}: {t} (a space in a link: write %20)" for t in SPACED_LINK.findall(_prose(md.read_text()))]
    for _text, target in LINK.findall(_prose(md.read_text())):
        if re.match(r"^[a-z]+:", target):          # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / unquote(path)).resolve() if path else md     # a file name with spaces: %20
        if not dest.exists():
            bad.append(f"{md.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{md.name}: {target} (no heading #{anchor} in {dest.name})")
    return bad


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (f"README.md has {n} lines, more than {MAX_README_LINES}: move measurements "
                                   "to docs/performance.md and design to docs/architecture.md")


def test_the_two_commands_come_first():
    """The first code block of README is the setup + demo command and the test command, nothing else."""
    first = FENCE.search(README.read_text())
    assert first, "README.md has no code block"
    commands = [ln.strip() for ln in first.group(0).splitlines()[1:-1] if ln.strip() and not ln.strip().startswith("#")]
    assert commands == [SETUP_AND_DEMO, TESTS], f"README's first code block runs {commands}"


def test_ci_runs_the_readme_test_command():
    assert TESTS in (ROOT / ".ci" / "run").read_text(), ".ci/run no longer runs README's test command"


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(md):
    assert broken_links(md) == []


def test_docs_exist():
    assert {p.name for p in DOCS} >= {"performance.md", "architecture.md"}


def test_readme_numbers_link_to_raw_files():
    """A measured number (x.y GiB, x.yz x) in README's prose is the text of a link into bench/."""
    text = _prose(README.read_text())
    unlinked = LINK.sub(lambda m: "" if m.group(2).startswith("bench/") else m.group(0), text)
    assert MEASURED.findall(unlinked) == [], "README quotes measurements without a link to their raw file"


def test_the_checks_catch_what_they_should(tmp_path):
    """Not vacuous: a missing file, a missing heading, a link with a raw space and an unlinked number are
    each caught; a file name with spaces written %20 (and + as %2B) is found."""
    (tmp_path / "b.md").write_text("# Real heading\n")
    doc = tmp_path / "a.md"
    (tmp_path / "c d+e.json").write_text("{}")
    doc.write_text("[x](missing.json) [y](b.md#real-heading) [z](b.md#no-such) `[w](code.md)` [v](c%20d%2Be.json) "
                   "[u](c%20d.json) [t](c d+e.json)\n")
    assert broken_links(doc) == ["a.md: c d+e.json (a space in a link: write %20)",
                                 "a.md: missing.json (no such file)",
                                 "a.md: b.md#no-such (no heading #no-such in b.md)",
                                 "a.md: c%20d.json (no such file)"]
    assert MEASURED.findall("runs in 6.02 GiB at 1.018x") == ["6.02 GiB", "1.018x"]
    assert MEASURED.findall("81 frames at 1360x768, a 12 GiB card") == []
