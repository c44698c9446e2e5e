"""Numbers and tables as every written table shows them: one number formatter, one markdown / CSV renderer.

report.md, report.csv and report.html (distill.report), grad_analysis.md/.csv (distill.evaluation.gradients)
and scripts/ablation_tables.py format their numbers and lay out their tables here, so a value reads the
same wherever it appears. Pure functions, no third-party imports.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Sequence


def number(value: Any, spec: str = "g") -> str:
    """A float with the format spec `spec` ('g': 2, 0.5; '.1f': 41.0; '+.1f': -6.8; '.4g'); any other value
    (an int, a string, None) as str(), so an int never turns into '1e+06'."""
    return format(value, spec) if isinstance(value, float) else str(value)


def plus_minus(mean: float, std: float) -> str:
    """'41.0 ± 1.4'; the mean alone when there is no spread (std nan: one seed)."""
    return number(mean, ".1f") if math.isnan(std) else f"{number(mean, '.1f')} ± {number(std, '.1f')}"


def interval(low: float, high: float) -> str:
    """'[-10.1, -3.5]', signed to one decimal; '–' when there is none (nan)."""
    return "–" if math.isnan(low) else f"[{number(low, '+.1f')}, {number(high, '+.1f')}]"


def markdown_row(cells: Iterable[Any]) -> str:
    """'| a | b |'. A None cell is a column the cell before it spans (markdown has no colspan): '| |'."""
    return "|" + "".join(" |" if c is None else f" {c} |" for c in cells)


def markdown_rule(n: int, align: str = "") -> str:
    """The line under a header of n columns: '|---|' per column, '|---:|' where `align` has an 'r'."""
    return "|" + "".join("---:|" if align[i:i + 1] == "r" else "---|" for i in range(n))


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """A markdown table as lines: the header, its rule (`align`: one letter per column, 'r' = right) and rows."""
    return [markdown_row(header), markdown_rule(len(header), align), *(markdown_row(r) for r in rows)]


def csv_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A CSV document ('\\n' line ends; floats in full precision, as the csv module writes them)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
