"""The README stays short and true, read as text: at most 150 lines, every .py path the docs name
exists, and its two commands are make targets (its migration, run as written:
tests/system/test_docs.py)."""

import re

from lib.readme import README, ROOT, commands, documents

MAX_README_LINES = 150
MODULE_PATH = re.compile(r"(?<![\w/])(?:mirrorfs|tests|scripts|plugin)/[\w/]*\.py\b")


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move detail to docs/")


def test_every_python_path_in_the_docs_exists():
    """mirrorfs/..., tests/..., scripts/... and plugin/... paths ending in .py, in README.md and
    docs/*.md: a module that moves takes its docs along."""
    missing = [f"{path.relative_to(ROOT)}: {name}" for path in documents()
               for name in sorted(set(MODULE_PATH.findall(path.read_text())))
               if not (ROOT / name).is_file()]
    assert not missing, "the docs name modules that do not exist:\n" + "\n".join(missing)


def test_the_readmes_two_commands_are_make_targets():
    host, _ = commands("Two commands")
    assert [c.split("#")[0].split() for c in host] == [["make", "demo"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text()
    # `make demo` runs what tests/system/test_demo.py runs; `make test` is the two suites.
    assert re.search(r"^demo: setup\n\t\$\(PY\) scripts/demo.py$", makefile, re.M)
    # `make test` lints first (make lint, which needs only the venv), then runs the unit suite and
    # the system suite's two passes (tests/system/conftest.py).
    recipe = re.search(r"^test: lint setup\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "no `test: lint setup` rule"
    steps = re.findall(r"-m pytest (tests/\w+)(?: --pass=(\w+))?", recipe.group(1))
    assert steps == [("tests/unit", ""), ("tests/system", "parallel"), ("tests/system", "serial")], steps
    assert re.search(r"^lint: venv$", makefile, re.M)
    # `make check`, before every commit: lint and the unit suite, nothing that needs setup.
    assert re.search(r"^check: lint\n\t\$\(PY\) -m pytest -q tests/unit", makefile, re.M)
