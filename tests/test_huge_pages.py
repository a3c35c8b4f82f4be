"""The commands that run a model restart once with glibc's heap on transparent huge pages (util/heap.py): when,
with what environment, and that the restarted command is the same command (arguments, stdin, exit code)."""
import os
import subprocess
import sys
import textwrap

import pytest

from ktjax.util.heap import HUGE_PAGES_ENV, _glibc_version, _thp_mode, huge_pages_active, huge_pages_env

ON = "glibc.malloc.hugetlb=1"

CASES = {  # case -> (environment, glibc, THP mode, the GLIBC_TUNABLES to restart with, or None: no restart)
    "glibc 2.36, madvise": ({}, (2, 36), "madvise", ON),
    "THP always": ({}, (2, 35), "always", ON),
    "other tunables kept": ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise",
                            "glibc.malloc.arena_max=2:" + ON),
    "turned off by the user": ({HUGE_PAGES_ENV: "0"}, (2, 36), "madvise", None),
    "the user's own setting wins": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),
    "already restarted": ({"GLIBC_TUNABLES": ON}, (2, 36), "madvise", None),
    "glibc too old": ({}, (2, 34), "madvise", None),
    "not glibc": ({}, None, "madvise", None),
    "THP off": ({}, (2, 36), "never", None),
    "no THP file": ({}, (2, 36), None, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_when_a_command_restarts_on_huge_pages(case):
    environ, glibc, thp, want = CASES[case]
    env = huge_pages_env(dict(environ, PATH="/bin"), glibc, thp)
    if want is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == want and env["PATH"] == "/bin"


PROBE = textwrap.dedent("""
    import os, sys
    def main():
        print(os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], sys.stdin.read(), os.getpid())
        return 3
""")


def _run(tmp_path, **env):
    (tmp_path / "probe_cmd.py").write_text(PROBE)
    code = "import sys; from ktjax.util.process import run_command; run_command('probe_cmd', huge_pages=True)"
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", HUGE_PAGES_ENV)}
    environ["PYTHONPATH"] = os.pathsep.join([str(tmp_path), environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-c", code, "a b", "--x"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**environ, **env})
    out, _ = proc.communicate("the prompt", timeout=120)
    return proc.returncode, out.strip(), proc.pid


def test_the_restarted_command_is_the_same_command(tmp_path):
    if huge_pages_env({}, _glibc_version(), _thp_mode()) is None:
        pytest.skip(f"no restart here (glibc {_glibc_version()}, transparent huge pages {_thp_mode()})")
    rc, out, pid = _run(tmp_path)
    assert rc == 3 and out == f"{ON} ['a b', '--x'] the prompt {pid}"  # same pid: exec, not a child
    rc, out, pid = _run(tmp_path, **{HUGE_PAGES_ENV: "0"})
    assert rc == 3 and out == f"None ['a b', '--x'] the prompt {pid}"


ACTIVE = {  # GLIBC_TUNABLES, THP mode -> whether the heap is on huge pages
    ("glibc.malloc.hugetlb=1", "madvise"): True,
    ("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2", "always"): True,
    ("glibc.malloc.hugetlb=0", "madvise"): False,
    ("glibc.malloc.hugetlb=1", "never"): False,
    ("", "madvise"): False,
    ("glibc.malloc.arena_max=2", "always"): False,
}


@pytest.mark.parametrize("tunables,thp", list(ACTIVE))
def test_the_statistics_say_whether_the_heap_is_on_huge_pages(tunables, thp):
    assert huge_pages_active({"GLIBC_TUNABLES": tunables}, thp) is ACTIVE[(tunables, thp)]


def test_a_generation_reports_it():
    import ktjax
    from ktjax.demo import DEMO_MODEL_DIR

    stats = ktjax.load(DEMO_MODEL_DIR).generate([[1, 2, 3]], max_new_tokens=2).stats
    assert stats["huge_pages"] is huge_pages_active()
