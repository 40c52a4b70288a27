"""Each option validated once, where it is defined, on the values the operator gave: the
operator's options by mirrorfs.control.options.ServeOptions when it is made, what a migration or
a group may not take by Migration and Group, so that the Python API refuses what the CLI refuses,
with the same words, before anything starts. (The CLI's refusals, through the real command:
tests/system/test_bad_input.py, test_operator_mistakes.py, test_evacuate_start.py, test_lag.py.
The data path's own parameters: tests/unit/test_core.py.)"""

from pathlib import Path

import pytest

import mirrorfs
from mirrorfs.control import options as options_module
from mirrorfs.control.options import ServeOptions
from mirrorfs.errors import UsageError

STATE = "<state>"           # a state directory that can be made (in the test's directory)
M = 1 << 20

# (ServeOptions fields, the words of the refusal). Every one is a value the Python API can give;
# the CLI's parser turns text into values and refuses some before (a rate below 1 byte/s).
BAD = [
    ({"copy": "mirror"}, "--copy 'mirror': expected one of none, full"),
    ({"policy": "sometimes"}, "--on-dest-error 'sometimes': expected one of fail, degrade"),
    ({"rate": 0, "copy": "full"}, "--rate 0: expected a whole number of bytes per second, at "
                                  "least 1 (None: no limit)"),
    ({"rate": -M, "copy": "full"}, f"--rate {-M}: expected a whole number"),
    ({"rate": 0.5, "copy": "full"}, "--rate 0.5: expected a whole number"),
    ({"rate": True, "copy": "full"}, "--rate True: expected a whole number"),
    ({"rate": "100M", "copy": "full"}, "--rate '100M': expected a whole number"),
    ({"region": 3000000}, "--region 3000000: expected a power of two of at least 1 MiB"),
    ({"region": M // 2}, f"--region {M // 2}: expected a power of two"),
    ({"io_timeout": float("inf")}, "--io-timeout inf: expected seconds, 0 for none"),
    ({"io_timeout": -1}, "--io-timeout -1: expected seconds"),
    ({"lag": -M, "state_dir": STATE}, f"--lag {-M}: expected a size, 0 for none"),
    ({"lag": 64 * M}, "--lag needs --state-dir"),
    ({"lag": 64 * M, "readonly": True}, "--lag lets a destination fall behind; --readonly"),
    ({"lag": 64 * M, "state_dir": STATE, "switch_first": True, "copy": "full"}, "nothing to lag"),
    ({"switch_first": True}, "--switch-first needs --state-dir: the hydration map"),
    ({"switch_first": True, "state_dir": STATE}, "--switch-first copies the whole source in the "
                                                 "background: give --copy full"),
    ({"switch_first": True, "readonly": True}, "--switch-first writes the destination"),
    ({"copy_on_read": True, "copy": "full"}, "--copy-on-read hydrates the regions a client reads "
                                             "in an evacuation: it needs --switch-first"),
    ({"readonly": True, "copy": "full"}, "--copy full copies the source to a destination"),
    ({"threads": 0}, "--threads 0: expected a positive number"),
    ({"cache": "sometimes"}, "--cache 'sometimes'"),
]


def _fields(fields, tmp_path):
    return {k: str(tmp_path / "state") if v == STATE else v for k, v in fields.items()}


@pytest.mark.parametrize("fields,words", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_the_python_api_refuses_a_bad_option_in_one_line_when_it_is_given(fields, words, tmp_path):
    with pytest.raises(UsageError) as e:
        ServeOptions(socket=str(tmp_path / "d.sock"), **_fields(fields, tmp_path))
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_the_options_are_checked_on_their_own_values_not_on_placeholder_sides(tmp_path, monkeypatch):
    """Making ServeOptions builds no data path options (it once did, on placeholder URIs and a
    placeholder cluster size, running every rule of the data path's a first time); the process
    tree builds them once, from the real sides, and checks the one rule that needs those: an
    evacuation's --region against the destination's cluster size."""
    def refuse(**kw):
        raise AssertionError("DataPathOptions built while the options were made")
    real = options_module.DataPathOptions
    monkeypatch.setattr(options_module, "DataPathOptions", refuse)
    o = ServeOptions(socket=str(tmp_path / "d.sock"), copy="full", switch_first=True,
                     state_dir=str(tmp_path / "state"), rate=M, region=M)
    monkeypatch.setattr(options_module, "DataPathOptions", real)
    built = o.datapath("nbd+unix:///?socket=/s", "nbd+unix:///?socket=/d", "/c", 64 * 1024)
    assert (built.rate, built.region, built.switch_first) == (M, M, True)
    with pytest.raises(UsageError, match=rf"--region {M}: with --switch-first, a multiple of the "
                                         rf"destination's cluster size \({2 * M}\)"):
        o.datapath("nbd+unix:///?socket=/s", "nbd+unix:///?socket=/d", "/c", 2 * M)


def test_a_migration_refuses_rate_from_the_python_api_too(tmp_path):
    """`start --rate` without --switch-first was refused by the CLI alone: the Python API took
    it (as a base copy's cap). Migration refuses it now, for both."""
    from mirrorfs.control.migration import Migration
    with pytest.raises(UsageError) as e:
        Migration(tmp_path / "vm1.qcow2", tmp_path / "b", socket=str(tmp_path / "d.sock"), rate=M)
    assert "--rate limits the hydration of --switch-first; a migration's base copy takes " \
        "'mirrorfs copy --rate'" == str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_an_evacuation_is_switch_first_and_what_that_needs_is_refused_once(tmp_path):
    """Evacuation adds only that its options are switch-first ones: without --copy full or with
    --readonly, ServeOptions has refused them already, in its own words."""
    from mirrorfs.control.evacuation import Evacuation
    sock, state = str(tmp_path / "d.sock"), str(tmp_path / "state")
    with pytest.raises(UsageError, match="an evacuation is --switch-first"):
        Evacuation(tmp_path / "vm1.qcow2", tmp_path / "b", socket=sock, state_dir=state, copy="full")
    with pytest.raises(UsageError, match="--switch-first copies the whole source in the background"):
        Evacuation(tmp_path / "vm1.qcow2", tmp_path / "b", socket=sock, state_dir=state,
                   switch_first=True)
    assert list(tmp_path.iterdir()) == []


def test_a_group_refuses_rate_from_the_python_api_too(tmp_path):
    """A group's --rate was refused by the CLI alone (and dropped by the member options it made):
    Group refuses it, and leaves no state directory behind."""
    from mirrorfs.control.group import Group

    def member(name, state_dir):
        return ServeOptions(disk=name, state_dir=str(state_dir), hold_copy=True, rate=M)
    with pytest.raises(UsageError) as e:
        Group(["vm1", "vm2"], [None, None], tmp_path / "b", member, tmp_path / "group",
              tmp_path / "g.ctl")
    assert str(e.value) == "a group's base copies take 'mirrorfs copy --rate'"
    assert list(tmp_path.iterdir()) == []


# The words of every rule above, each written once in the package (a rule written in two places
# drifts: "--switch-first needs --state-dir" once was, in ServeOptions and in DataPathOptions).
RULES = ["expected a whole number of bytes per second", "expected a power of two of at least 1 MiB",
         "--switch-first needs --state-dir", "copies the whole source in the background", "--copy-on-read hydrates",
         "--lag needs --state-dir", "nothing to lag", "expected seconds, 0 for none",
         "--rate limits the hydration of --switch-first", "a group's base copies take",
         "a group has no lag", "expected one of {', '.join(COPY_MODES)}",
         "expected one of {', '.join(POLICIES)}", "with --switch-first, a multiple of the"]


def test_each_rule_is_written_once():
    sources = {p: p.read_text() for p in Path(mirrorfs.__file__).parent.rglob("*.py")}
    twice = {r: [str(p.name) for p, text in sources.items() for _ in range(text.count(r))]
             for r in RULES}
    assert {r: where for r, where in twice.items() if len(where) != 1} == {}


# The host service's options and the host budget: the Python API reaches the rules the CLI does
# (the CLI parses the text only), and a refusal makes nothing (checked before the registry, the
# run directory or the budget file exist).

@pytest.mark.parametrize("kwargs, words", [
    ({"cache": "sometimes"}, "--cache 'sometimes'"),
    ({"take_back_after": -1}, "--take-back-after -1: expected 0 or more seconds"),
    ({"take_back_after": float("nan")}, "--take-back-after nan: expected 0 or more seconds"),
    ({"take_back_after": "10"}, "--take-back-after '10': expected 0 or more seconds"),
    ({"socket_group": "no-such-group-here"}, "no-such-group-here: no such group"),
])
def test_the_host_services_options_are_refused_by_the_python_api(kwargs, words):
    # HostService takes its options only as a HostOptions: the one way in checks them.
    from mirrorfs.host.service import HostOptions
    with pytest.raises(UsageError) as e:
        HostOptions(**kwargs)
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.parametrize("changes, words", [
    ({"max_copies": 0}, "--max-copies 0: expected a positive number"),
    ({"max_copies": 1.5}, "--max-copies 1.5: expected a positive number"),
    ({"rate": -5}, "budget rate -5: expected a positive number"),
    ({"floor": True}, "--floor True: expected a positive number"),
    ({"ceiling": 5}, "budget: no field 'ceiling'"),
])
def test_the_host_budget_refuses_a_bad_value_from_the_python_api_and_writes_nothing(changes, words,
                                                                                    tmp_path):
    from mirrorfs.host import budget
    from mirrorfs.host.rundir import RunDir
    rundir = RunDir(tmp_path / "run")
    before = sorted(p.name for p in rundir.path.iterdir())
    with pytest.raises(UsageError) as e:
        budget.save(rundir, **changes)
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert sorted(p.name for p in rundir.path.iterdir()) == before
