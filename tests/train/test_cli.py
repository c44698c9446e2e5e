"""`distill-train` on the command line (distill/train/cli.py): a config error is one line, exit 2."""

import subprocess
import sys

from tests.train.conftest import child_env


def test_cli_config_error_is_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "distill.train", "experiment=smoke", "tau=0", f"paths.root={tmp_path}"],
                          capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 2
    assert "config error: tau=0: the distillation temperature must be a finite number > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("*/*/metrics.json"))
