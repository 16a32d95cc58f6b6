"""The console script: help, version, and a clear refusal of bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ranray
from ranray.cli import main


def test_console_script_help_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "ranray.cli", "--help"], capture_output=True, text=True, check=True)
    assert "version" in out.stdout


def test_version_verb(capsys):
    assert main(["version", "--short"]) == 0
    assert capsys.readouterr().out.strip() == f"ranray {ranray.__version__}"


def test_unknown_verb_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fly"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
