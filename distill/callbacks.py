"""Hydra callbacks: build the sweep report when a multirun ends.

Enable in the root config:

    hydra:
      callbacks:
        report:
          _target_: distill.callbacks.ReportCallback

With a submitit launcher `on_multirun_end` runs in the submitting process once every job of
the array has returned, so the report sees all cells.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Write report.md/.csv/.png into hydra.sweep.dir at the end of a multirun."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        from distill.report import build_report  # matplotlib only when a report is due

        sweep_dir = str(config.hydra.sweep.dir)
        try:
            paths = build_report(sweep_dir)
        except Exception as e:  # a report problem must not turn a finished sweep into a failure
            log.error("distill-report for %s failed: %s (rerun: distill-report %s)", sweep_dir, e, sweep_dir)
            return
        log.info("Sweep report: %s", paths["report.md"])
