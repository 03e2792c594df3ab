"""Many slides, one task each, on Dask distributed: a local cluster by default, a real one by address.

The cohort layer only schedules: every slide still goes through the standalone
door (:func:`dannucnet.jobs.segment_file.segment_source`), so a cohort
result is byte-for-byte what ``dannucnet segment`` would have written.
"""

from dannucnet.cohort.inputs import find_slides, output_path_for
from dannucnet.cohort.records import DoneRecord, is_done, read_failure, write_done, write_failure
from dannucnet.cohort.runner import CohortReport, SlideOutcome, run_cohort

__all__ = [
    "CohortReport",
    "DoneRecord",
    "SlideOutcome",
    "find_slides",
    "is_done",
    "output_path_for",
    "read_failure",
    "run_cohort",
    "write_done",
    "write_failure",
]
