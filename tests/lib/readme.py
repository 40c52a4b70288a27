"""The commands of README.md and docs/*.md, for the tests that promise to run exactly them.

A section is found by its heading, in README.md or any docs/*.md; a heading a test uses must be
unique across them (`section` refuses one written twice). A section's ```sh blocks hold one command
per line (a trailing backslash continues it; `#` lines are comments). A block whose first line is
`# in the guest` holds commands run inside the test guest. The docs write example paths
(/run/vm1.sock, $KERNEL, ...); a test maps them to its own.
"""

import re
import shlex
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
README = TESTS.parent / "README.md"
GUEST_INIT = TESTS / "guest-init.sh"
ROOT = TESTS.parent


def documents():
    """README.md and the guides, the files a section may be in."""
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def _section_in(path, title):
    """The text of the section of `path` whose heading is `title`, up to the next heading of its
    level (a `#` line inside a code block is a comment, not a heading); None if there is none."""
    found, level, fenced = None, 0, False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        heading = re.match(r"(#+) (.*?)\s*$", line) if not fenced else None
        if found is None:
            if heading and heading.group(2) == title:
                found, level = [], len(heading.group(1))
            continue
        if heading and len(heading.group(1)) <= level:
            break
        found.append(line)
    return None if found is None else "".join(found)


def where(title):
    """The one document that has a section `title`."""
    having = [path for path in documents() if _section_in(path, title) is not None]
    names = [str(path.relative_to(ROOT)) for path in having]
    assert having, f"no section {title!r} in README.md or docs/*.md"
    assert len(having) == 1, f"section {title!r} is in several documents: {names}"
    return having[0]


def section(title):
    """The text of the section whose heading is `title`, wherever it is (README.md or docs/*.md)."""
    return _section_in(where(title), title)


def commands(title):
    """(host commands, guest commands) of a section, as strings."""
    host, guest = [], []
    for block in re.findall(r"^```sh\n(.*?)^```", section(title), re.M | re.S):
        lines = block.splitlines()
        into = guest if lines and lines[0].strip() == "# in the guest" else host
        current = ""
        for line in lines:
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            current += line.rstrip()
            if current.endswith("\\"):
                current = current[:-1]
                continue
            into.append(" ".join(current.split()))
            current = ""
    return host, guest


def _replace(text, mapping):
    for old in sorted(mapping, key=len, reverse=True):
        text = text.replace(old, mapping[old])
    return text


def _first_of_pipe(tokens):
    """`debugfs ... | sha256sum`: the test runs the first command and hashes its output itself."""
    return tokens[:tokens.index("|")] if "|" in tokens else tokens


def check_commands(title, paths, argvs, guest=None):
    """Every argv the test ran is a command of the section `title` (README.md or docs/*.md), once
    its example paths are replaced by the test's (`paths`: the document's text → the test's value).
    `guest`: the commands the guest ran; the section's guest block must be among them, and name
    every nbd-client they ran."""
    host, guest_block = commands(title)
    written = [[_replace(token, paths) for token in _first_of_pipe(shlex.split(cmd, comments=True))]
               for cmd in host]
    argvs = [[str(a) for a in argv] for argv in argvs]
    # Both ways: the section shows no command the test does not run (but the guest's build, which
    # the test does through guest.build()).
    unrun = [cmd for cmd, argv in zip(host, written) if argv not in argvs and argv[0] != "eval"]
    doc = where(title).name
    assert not unrun, f"{doc} section {title!r} shows commands the test does not run: {unrun}"
    for argv in argvs:
        if argv not in written:
            as_readme = shlex.join(_replace(a, {v: k for k, v in paths.items()}) for a in argv)
            raise AssertionError(f"{doc} section {title!r} does not show the command the test "
                                 f"ran; it would read:\n{as_readme}")
    if guest is not None:
        missing = [c for c in guest_block if c not in guest]
        assert not missing, f"{title!r}: the guest does not run {missing}"
        unshown = [c for c in guest if c.startswith("nbd-client") and c not in guest_block]
        assert not unshown, f"{title!r} does not show {unshown}"


def guest_commands():
    """The commands of the guest's /init, one per line, without their `|| fail ...`."""
    found = []
    for line in GUEST_INIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            found.append(" ".join(line.split(" || fail")[0].split()))
    return found
