"""The suite's check of its own temporary files (tests/conftest.py) fails a run that leaves something in the
temporary directory, in-process or from a subprocess, passes a clean one, and leaves nothing itself."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(CONFTEST)
    return pytester


def _suite_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("vitatlas-suite-tmp-"))


def test_a_leak_fails_the_run_and_is_removed(inner):
    inner.makepyfile(test_leaks="""
        import subprocess, sys, tempfile

        def test_in_process():
            tempfile.mkdtemp(prefix="leaked-dir-")

        def test_in_a_subprocess():
            subprocess.run([sys.executable, "-c", "import tempfile; tempfile.mkstemp(prefix='leaked-file-')"],
                           check=True)
    """)
    import tempfile

    root = Path(tempfile.gettempdir())  # this suite's own temporary directory: the inner run makes its own in it
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # both tests passed: the leak alone fails the run
    result.stdout.fnmatch_lines(["*2 passed*"])
    result.stdout.fnmatch_lines(["*the suite left 2 entries in its temporary directory*leaked-dir-*leaked-file-*"])
    assert _suite_dirs(root) == []


def test_a_clean_run_passes(inner):
    inner.makepyfile(test_clean="""
        import tempfile

        def test_cleans_up(tmp_path):
            (tmp_path / "x").write_text("in pytest's basetemp: fine")
            with tempfile.TemporaryDirectory() as tmp:
                assert tmp.startswith(tempfile.gettempdir())
    """)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    assert "temporary directory" not in result.stdout.str()


def test_a_known_foreign_entry_is_reported_and_removed_but_does_not_fail_the_run(inner):
    inner.makepyfile(test_foreign="""
        import os, tempfile

        def test_writes_the_foreign_name():
            open(os.path.join(tempfile.gettempdir(), ".ses"), "w").close()
    """)
    import tempfile

    root = Path(tempfile.gettempdir())
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["*removed a known foreign entry*.ses (file, 0 B*"])
    assert "the suite left" not in result.stdout.str()
    assert _suite_dirs(root) == []
