"""The cell's own log, `<cell>/train.log`: every attempt's log lines, loss lines and tracebacks, on rank 0.

`logger` ("distill.cell_log") carries what belongs in the cell's log only (periodic loss lines, tracebacks): it
does not propagate, so none of it reaches the console. `attach` adds the file for one attempt; `detach` removes it.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from distill.cell.lock import slurm_ids

CELL_LOG_FILE = "train.log"

# Set once, at import: every process that runs a cell imports this module (a pickled-by-value job would not,
# hence distill/train/__main__.py).
logger = logging.getLogger("distill.cell_log")
logger.propagate = False


def attach(run_dir: Path) -> logging.Handler:
    """Append this attempt's log records to `<cell>/train.log`: the distill loggers at INFO, other libraries'
    warnings, the loss lines and tracebacks of `logger` (which stay off the console)."""
    handler = logging.FileHandler(Path(run_dir) / CELL_LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    handler._distill_level = logging.getLogger("distill").level  # type: ignore[attr-defined]
    for name in ("", "distill.cell_log"):
        logging.getLogger(name).addHandler(handler)
    if logging.getLogger("distill").getEffectiveLevel() > logging.INFO:
        logging.getLogger("distill").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)
    logger.info("attempt on %s pid %d %s", socket.gethostname(), os.getpid(), slurm_ids() or "")
    return handler


def detach(handler: logging.Handler) -> None:
    """Stop writing to the cell's log: remove `handler` and restore the distill loggers' level."""
    for name in ("", "distill.cell_log"):
        logging.getLogger(name).removeHandler(handler)
    logging.getLogger("distill").setLevel(handler._distill_level)  # type: ignore[attr-defined]
    handler.close()
