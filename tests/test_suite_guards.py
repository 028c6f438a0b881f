"""Guards of the test suite itself: no test can hang it, and `make test` runs the static checks first."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_has_a_time_limit(pytestconfig):
    """pytest-timeout is active with a limit of a few minutes (pyproject: timeout = 300)."""
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed (test extra)"
    assert 60 <= float(pytestconfig.getini("timeout")) <= 600


def test_make_test_runs_ruff_and_mypy_then_pytest_with_the_slowest_tests():
    make = (ROOT / "Makefile").read_text()
    lint = make.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    test = make.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check src tests experiments" in lint and "mypy" in lint
    assert test.splitlines()[0].split().count("lint") == 1 and "pytest --durations=25" in test
