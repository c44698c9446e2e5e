"""Every command's --help says what it does and shows examples (distill-train's through Hydra's help template)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_help_shows_examples_of_the_command(command):
    module, _, function = SCRIPTS[command].partition(":")
    code = f"import sys; sys.argv = [{command!r}, '--help']; from {module} import {function} as main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "examples" in out.lower(), out
    assert f"{command} " in out.split("xamples", 1)[1], f"no example of {command} itself:\n{out}"
    if command == "distill-train":   # the help template: what one cell is, the groups and the keys
        assert "one grid cell" in out.lower() or "one cell" in out.lower(), out
        for group in ("divergence", "model", "data", "rollout", "trainer"):
            assert group in out, group
