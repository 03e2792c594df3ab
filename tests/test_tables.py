"""The one plain-text table formatter (``dannucnet.tables``) and the summaries that print with it."""

from __future__ import annotations

import pytest

from dannucnet.tables import format_table


def test_columns_pad_to_the_widest_cell_and_numbers_align_right():
    text = format_table(["image", "nuclei", "note"], [["a.svs", 1200, "ok"], ["long-name.tif", 7, None]])
    assert text.splitlines() == [
        "image          nuclei  note",
        "-------------  ------  ----",
        "a.svs            1200  ok",
        "long-name.tif       7",  # None is an empty cell; no trailing blanks
    ]


def test_alignment_and_rule_can_be_chosen():
    text = format_table(["", "F1", "AJI"], [["final (2)", "81.14", "nan"]], rule=False, align="<>>")
    assert text.splitlines() == ["              F1  AJI", "final (2)  81.14  nan"]
    with pytest.raises(ValueError, match="one '<' or '>' per column"):
        format_table(["a", "b"], [], align="<")


def test_an_empty_table_is_its_header():
    assert format_table(["slide", "status"], [], rule=False) == "slide  status"


def test_the_cohort_report_prints_through_it():
    """batch-slides' end-of-run table: same column rules as every other summary, the note last."""
    from dannucnet.cohort.runner import CohortReport, SlideOutcome

    report = CohortReport([SlideOutcome("/x/s1.tif", "o", "done", 120, 3.21),
                           SlideOutcome("/x/slide-two.tif", "o", "failed", error="InputError", message="bad")],
                          model="m", model_version="1")
    lines = report.table().splitlines()
    assert lines[:3] == [
        "slide          status  nuclei  seconds  note",
        "s1.tif         done    120     3.2",
        "slide-two.tif  failed                   InputError: bad",
    ]
    assert lines[3].startswith("1 done, 0 skipped")
