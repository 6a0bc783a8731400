"""`vqtool --help` stays quick: the CLI modules load torch and matplotlib only inside the command that runs."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from typer.testing import CliRunner
from vqtool.cli import app
for args in (["--help"], ["encode", "--help"], ["run", "--help"], ["train-prior", "--help"], ["report", "--help"]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
print(sorted(m for m in ("torch", "numpy", "matplotlib") if m in sys.modules))
"""


def test_help_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
