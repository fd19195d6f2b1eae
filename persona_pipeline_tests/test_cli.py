"""Every CLI subcommand answers an ordinary error (an empty home, an unknown id, a database that is
down, a bad setting, a bad argument) in one line naming the fix, with a non-zero exit, never a
traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from persona_pipeline import cli
from persona_pipeline.db.session import head_revision, upgrade

from .conftest import write_persona

BIN = Path(sys.executable).parent

# Every subcommand that opens the application database.
DATABASE_COMMANDS = [
    ["trace", "999"],
    ["lora", "list", "demo"],
    ["lora", "set", "demo", "1", "--weight", "1"],
    ["lora", "export-comfyui", "{tmp}"],
    ["review"],
]


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    for name in ("PERSONA_DATABASE_URL", "PERSONA_CANDIDATES_PER_RUN", "PERSONA_PUBLISHER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PERSONA_HOME", str(home))
    monkeypatch.setenv("PERSONA_DATASETS_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("REVIEW_TOKENS", "bo:" + "t" * 32)
    monkeypatch.setenv("REVIEW_SECRET_KEY", "k" * 48)
    return home


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize("argv", DATABASE_COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_database_commands_on_an_empty_home_say_to_upgrade(argv, empty_home, tmp_path, capsys):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert "has no tables yet: run `persona-pipeline db upgrade`" in line and str(empty_home / "persona.db") in line


def test_a_database_behind_the_code_says_to_upgrade(empty_home, capsys):
    upgrade(f"sqlite:///{empty_home / 'persona.db'}", "0005")
    assert cli.main(["trace", "1"]) == 2
    assert f"is at revision 0005, not the latest {head_revision()}: run `persona-pipeline db upgrade`" in _one_error_line(capsys)


@pytest.mark.slow
def test_unknown_ids_and_personas_are_one_line(empty_home, tmp_path, capsys):
    assert cli.main(["db", "upgrade"]) == 0
    capsys.readouterr()
    assert cli.main(["trace", "999"]) == 2
    assert _one_error_line(capsys) == "error: post 999 does not exist"
    for argv in (["lora", "list", "nobody"], ["lora", "set", "nobody", "1", "--weight", "1"]):
        assert cli.main(argv) == 2
        assert "persona 'nobody' is not in the database" in _one_error_line(capsys)
    write_persona(tmp_path / "datasets", "mira", photos=0)
    assert cli.main(["demo", "--persona", "nobody"]) == 2
    assert "persona 'nobody' was not found under" in _one_error_line(capsys)


def test_an_unreachable_database_is_named_without_its_password(empty_home, monkeypatch, capsys):
    monkeypatch.setenv("PERSONA_DATABASE_URL", "postgresql+psycopg2://postgres:hunter2secret@127.0.0.1:1/nowhere")
    for argv in (["trace", "1"], ["db", "upgrade"]):
        assert cli.main(argv) == 2
        line = _one_error_line(capsys)
        assert "127.0.0.1:1/nowhere" in line and "hunter2secret" not in line and "refused" in line


def test_bad_settings_and_arguments_are_one_line(empty_home, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("PERSONA_CANDIDATES_PER_RUN", "many")
    assert cli.main(["trace", "1"]) == 2
    assert "PERSONA_CANDIDATES_PER_RUN='many' is not an integer" in _one_error_line(capsys)
    monkeypatch.delenv("PERSONA_CANDIDATES_PER_RUN")
    assert cli.main(["schedules", "--now", "tomorrow"]) == 2
    assert "--now 'tomorrow' is not an ISO date-time" in _one_error_line(capsys)
    assert cli.main(["lora", "export-comfyui", str(tmp_path / "missing")]) == 2
    assert "missing is not a folder" in _one_error_line(capsys)
    (tmp_path / "file").write_text("x")
    assert cli.main(["demo-photos", "--out", str(tmp_path / "file" / "photos")]) == 2
    assert str(tmp_path / "file") in _one_error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:  # argparse's own one-line usage error
        cli.main(["schedules", "--count", "0"])
    assert exit_info.value.code == 2 and "'0' is not a whole number of 1 or more" in capsys.readouterr().err


@pytest.mark.slow
def test_the_installed_command_answers_trace_of_a_missing_post_in_one_line(empty_home):
    """The reproduction from the report: `persona-pipeline trace 999` on an empty home, then after
    `db upgrade`, through the real console script."""
    run = subprocess.run([str(BIN / "persona-pipeline"), "trace", "999"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().endswith("run `persona-pipeline db upgrade`") and run.stdout == ""
    subprocess.run([str(BIN / "persona-pipeline"), "db", "upgrade"], check=True, capture_output=True, timeout=120)
    run = subprocess.run([str(BIN / "persona-pipeline"), "trace", "999"], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr, run.stdout) == (2, "error: post 999 does not exist\n", "")
