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


RAW_FULL_DISK = """
import errno, sys
from distill.train import cli
def run_cell(cfg):  # a write outside the atomic writers (an append) on a full disk: a bare OSError, no file named
    raise OSError(errno.ENOSPC, "No space left on device")
cli.run_cell = run_cell
sys.argv = ["distill-train", *sys.argv[1:]]
cli.main()
"""


def test_cli_a_bare_full_disk_error_is_one_output_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-c", RAW_FULL_DISK, "experiment=smoke", f"paths.root={tmp_path}"],
                          capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"distill-train: output error: cannot write {tmp_path}: no space left on the device (ENOSPC): free space there "
        "(or lower trainer.keep_ckpts) or point paths.root at another disk, then rerun (an unfinished cell resumes "
        "from its last complete checkpoint)"]


def test_cli_any_other_os_error_keeps_its_traceback(tmp_path):
    code = RAW_FULL_DISK.replace("errno.ENOSPC", "errno.EIO")
    proc = subprocess.run([sys.executable, "-c", code, "experiment=smoke", f"paths.root={tmp_path}"],
                          capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "OSError: [Errno 5]" in proc.stderr
