"""bench/review_effort.py --cells: rechecking chosen cells of the grid gives the grid's own rows."""

import subprocess
import sys

import pytest

from persona_pipeline_tests.conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = REPO / "bench" / "review_effort.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def rows(stdout: str) -> list[str]:
    """The per-cell result lines (they start with sigma and N), timing column dropped."""
    lines = [line for line in stdout.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    return [line.rsplit("|", 1)[0] for line in lines]


def test_cells_runs_only_the_named_cells_with_the_grid_draws():
    grid = run("--seeds", "3", "--sigmas", "5", "--sizes", "20", "--flips", "0,0.1")
    chosen = run("--seeds", "3", "--cells", "5:20:0.1")
    assert grid.returncode in (0, 1) and chosen.returncode in (0, 1), grid.stderr + chosen.stderr
    assert len(rows(grid.stdout)) == 2
    assert rows(chosen.stdout) == [rows(grid.stdout)[1]]            # the same cell, the same numbers
    assert "1 cells" in chosen.stdout


def test_cells_that_do_not_parse_are_refused_naming_the_option():
    bad = run("--cells", "5:20")
    assert bad.returncode == 2 and "--cells '5:20'" in bad.stderr and "sigma:N:flip" in bad.stderr
    mixed = run("--cells", "5:20:0", "--sizes", "30")
    assert mixed.returncode == 2 and "--cells" in mixed.stderr and "--sizes" in mixed.stderr


def test_seed_offset_runs_other_seeds_and_says_they_are_not_the_judged_ones():
    judged = run("--seeds", "3", "--cells", "5:20:0")
    other = run("--seeds", "3", "--cells", "5:20:0", "--seed-offset", "1000")
    assert judged.returncode in (0, 1) and other.returncode in (0, 1), judged.stderr + other.stderr
    assert "seeds 1000..1002 (development, not the judged seeds)" in other.stdout
    assert "development" not in judged.stdout
    assert len(rows(other.stdout)) == 1 and rows(other.stdout) != rows(judged.stdout)
