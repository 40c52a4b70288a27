"""`make install` puts mirrorfs where docs/systemd's units point (issue #26: the units ran a
/opt/mirrorfs/.venv/bin/mirrorfs that nothing installed). No systemd here: the test installs into a
temporary PREFIX and checks that every installed unit's ExecStart names a program that exists and
runs, with a command line the installed mirrorfs accepts."""

import re
import shlex
import subprocess
from pathlib import Path

from lib.commands import run

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "docs" / "systemd").glob("*.service"))


def exec_start(unit_text):
    """ExecStart's command line, continuation lines joined, as systemd reads it (a %i instance)."""
    text = re.sub(r"\\\n\s*", " ", unit_text)
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    line = line.removeprefix("ExecStart=").replace("%i", "vm1")
    # ${VAR} is one word, $VAR splits into words (here: empty), as systemd expands them.
    line = line.replace("${DEST_DIR}", "/srv/b").replace("${DISK}", "/srv/a/vm1.qcow2")
    return [w for w in shlex.split(line) if not w.startswith("$")]


def test_every_unit_runs_what_make_install_installs(workdir):
    prefix, units = workdir / "opt" / "mirrorfs", workdir / "units"
    res = run("make", "-C", ROOT, "install", f"PREFIX={prefix}", f"UNITDIR={units}",
              f"CONFDIR={workdir / 'etc'}")
    assert "installed mirrorfs" in res.stdout, res.stdout
    assert sorted(p.name for p in units.iterdir()) == [u.name for u in UNITS]
    for unit in UNITS:
        installed = (units / unit.name).read_text()
        assert "ExecStart=/opt/mirrorfs" not in installed, unit.name
        argv = exec_start(installed)
        program = Path(argv[0])
        assert program.is_file() and program.stat().st_mode & 0o111, (unit.name, program)
        assert str(program).startswith(str(prefix)), (unit.name, program)
        # The installed mirrorfs accepts the unit's command line as written.
        check = ("import sys; from mirrorfs.cli.main import COMMANDS; "
                 "from mirrorfs.cli.parser import build_parser; "
                 "build_parser(COMMANDS).parse_args(sys.argv[1:])")
        res = subprocess.run([program.parent / "python", "-c", check, *argv[1:]],
                             capture_output=True, text=True, cwd=workdir)
        assert res.returncode == 0, (unit.name, argv, res.stderr)
        # Installed, not a link to this checkout: it runs from the venv's own site-packages.
        where = run(program.parent / "python", "-c", "import mirrorfs; print(mirrorfs.__file__)",
                    cwd=workdir).stdout
        assert where.startswith(str(prefix)), where
    assert run(prefix / ".venv" / "bin" / "mirrorfs", "--version").stdout.startswith("mirrorfs ")
    for unit in ("mirrorfs-host.service", "mirrorfs-migrate@.service"):
        text = (units / unit).read_text()
        assert "[Install]" in text and "WantedBy=multi-user.target" in text
    assert "KillMode=process" in (units / "mirrorfs-host.service").read_text()
    assert "Type=notify" in (units / "mirrorfs-host.service").read_text()
