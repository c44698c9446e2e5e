"""distill.report.tables: the one number formatter and the one markdown / CSV table renderer."""

import math

from distill.report.tables import csv_table, interval, markdown_row, markdown_table, number, plus_minus


def test_number_formats_floats_only():
    assert (number(2.0), number(0.5), number(41.04, ".1f"), number(-6.8, "+.1f")) == ("2", "0.5", "41.0", "-6.8")
    assert number(1000000) == "1000000" and number("x") == "x" and number(None) == "None"   # never '1e+06'


def test_plus_minus_and_interval():
    assert plus_minus(41.04, 1.38) == "41.0 ± 1.4" and plus_minus(41.0, math.nan) == "41.0"
    assert interval(-10.12, -3.46) == "[-10.1, -3.5]" and interval(math.nan, math.nan) == "–"


def test_markdown_table_rule_alignment_and_spanned_cells():
    assert markdown_table(["a", "b", "c"], [[1, "", "x"]], align="r") == ["| a | b | c |", "|---:|---|---|", "| 1 |  | x |"]
    assert markdown_row(["sft", "20.0 (every τ)", None, "test"]) == "| sft | 20.0 (every τ) | | test |"


def test_csv_table_keeps_full_precision():
    assert csv_table(["x", "y"], [[0.1 + 0.2, "a,b"]]) == 'x,y\n0.30000000000000004,"a,b"\n'
