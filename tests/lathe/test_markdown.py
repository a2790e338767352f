"""lathe/markdown.py: pipe tables exactly as Lathe's reports wrote them by hand."""

from __future__ import annotations

import pytest

from lathe.markdown import markdown_table


def test_header_rule_and_rows_end_in_a_newline() -> None:
    table = markdown_table(["stage", "status", "seconds"], [["a", "ran", "1.0"], ("b", "not run", "–")])
    assert table == "| stage | status | seconds |\n|---|---|---|\n| a | ran | 1.0 |\n| b | not run | – |\n"


def test_no_rows_is_the_header_and_rule() -> None:
    assert markdown_table(["a"], []) == "| a |\n|---|\n"


def test_cells_are_written_as_str_and_not_escaped() -> None:
    rows = iter([[1, 0.5, None, "`x|y`"]])  # any iterable of rows; escaping is the caller's job
    assert markdown_table(["i", "f", "n", "code"], rows) == "| i | f | n | code |\n|---|---|---|---|\n| 1 | 0.5 | None | `x|y` |\n"


def test_alignment() -> None:
    table = markdown_table(["a", "b", "c", "d"], [["1", "2", "3", "4"]], align=["", "left", "center", "right"])
    assert table.splitlines()[1] == "|---|:---|:---:|---:|"


@pytest.mark.parametrize(("headers", "rows", "align", "message"), [
    ([], [], None, "at least one column"),
    (["a", "b"], [["1"]], None, "row 1 has 1 cells for 2 columns"),
    (["a"], [["1"], ["1", "2"]], None, "row 2 has 2 cells"),
    (["a"], [], ["left", "right"], "align has 2 entries for 1 columns"),
    (["a"], [], ["middle"], "unknown alignment 'middle'"),
])
def test_malformed_tables_are_refused(headers: list[str], rows: list[list[str]], align: list[str] | None,
                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        markdown_table(headers, rows, align)
