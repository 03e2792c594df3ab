"""batch-slides on a real local Dask cluster: good slides, a corrupt one, and a resumed rerun."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install 'dannucnet[cluster]')")

from dannucnet.cli import main
from dannucnet.cohort import find_slides, is_done, output_path_for, read_failure, run_cohort
from dannucnet.errors import InputError
from dannucnet.slides.synthetic import write_synthetic_slide

SIZE = 256  # one model window per slide: fast on a loaded 2-core CPU, still a real pyramidal slide


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("slides")
    good = [write_synthetic_slide(folder / f"slide{i}.tif", SIZE, seed=i).path for i in range(3)]
    bad = folder / "broken.tif"
    bad.write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # a TIFF header followed by garbage
    return folder, [*good, bad]


def _feature_count(path: Path) -> int:
    with gzip.open(path, "rb") as fh:
        data = json.loads(fh.read())
    assert data["type"] == "FeatureCollection"
    return len(data["features"])


def test_cohort_runs_fails_cleanly_and_resumes(cohort, tmp_path, capsys):
    folder, slides = cohort
    out = tmp_path / "out"
    assert [p.name for p in find_slides(folder)] == ["broken.tif", "slide0.tif", "slide1.tif", "slide2.tif"]

    seen: list[str] = []
    report = run_cohort(find_slides(folder), out, model="untrained", device="cpu", workers=1, retries=1,
                        pipelined=True,
                        progress=lambda done, total, o: seen.append(f"{done}/{total}"))
    by_name = {Path(o.input).name: o for o in report.outcomes}
    assert seen[-1] == "4/4" and len(seen) == 4
    assert by_name["broken.tif"].status == "failed"
    assert by_name["broken.tif"].error == "InputError"
    for i in range(3):
        o = by_name[f"slide{i}.tif"]
        assert o.status == "done", o
        target = output_path_for(slides[i], out)
        assert target.is_file() and _feature_count(target) == o.nuclei
        assert is_done(target, "untrained", "0") and not is_done(target, "untrained", "1")
    failure = read_failure(output_path_for(slides[3], out))
    assert failure is not None and failure["error"] == "InputError" and "broken.tif" in failure["message"]
    assert not output_path_for(slides[3], out).exists()
    # nothing half-written: only outputs and their records
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]
    assert "1 failed" in report.table()

    # rerun through the CLI: the three done slides are skipped, the corrupt one is tried again and fails
    mtimes = {p: output_path_for(p, out).stat().st_mtime_ns for p in slides[:3]}
    listing = tmp_path / "slides.txt"
    listing.write_text("# cohort\n" + "\n".join(str(p) for p in slides) + "\n")
    code = main(["batch-slides", str(listing), "-o", str(out), "--model", "untrained", "--device", "cpu",
                 "--workers", "1", "-q"])
    text = capsys.readouterr().out
    assert code == 1
    assert "3 skipped" in text and "1 failed" in text and "0 done" in text
    assert all(output_path_for(p, out).stat().st_mtime_ns == m for p, m in mtimes.items())


def test_nothing_to_do_needs_no_cluster(cohort, tmp_path):
    """A finished cohort resumes instantly (no cluster is started when every slide is done)."""
    folder, slides = cohort
    out = tmp_path / "out"
    out.mkdir()
    from dannucnet.cohort.records import DoneRecord, write_done

    target = output_path_for(slides[0], out)
    target.write_bytes(b"{}")
    write_done(target, DoneRecord(str(slides[0]), str(target), "untrained", "0", 0, 0.0, 0.0))
    report = run_cohort([slides[0]], out, model="untrained", device="cpu", scheduler="tcp://127.0.0.1:1")
    assert [o.status for o in report.outcomes] == ["skipped"]


def test_auto_resume_accepts_the_models_auto_can_choose(cohort, tmp_path):
    """--model auto may segment a 20x slide with the 20x model: resuming skips it instead of redoing it,
    while output by a model auto never chooses (a lite one: auto-fast's), by a model that is not
    installed or by another version is redone."""
    folder, slides = cohort
    out = tmp_path / "out"
    out.mkdir()
    from dannucnet.catalogue import possible_choices
    from dannucnet.cohort.records import DoneRecord, write_done
    from dannucnet.cohort.runner import _model_identity
    from dannucnet.model.registry import list_models
    from dannucnet.pipeline import SegmentOptions

    installed = list_models()
    choices = possible_choices(installed)
    if not choices:
        pytest.skip("no trained model installed")
    other = choices[-1]  # the coarsest pixel size's model: the 20x model when it is installed
    target = output_path_for(slides[0], out)
    target.write_bytes(b"{}")
    write_done(target, DoneRecord(str(slides[0]), str(target), other.card_name, other.version, 0, 0.0, 0.0))
    report = run_cohort([slides[0]], out, model="auto", device="cpu", scheduler="tcp://127.0.0.1:1")
    assert [o.status for o in report.outcomes] == ["skipped"]

    accepted = _model_identity("auto", None, None, SegmentOptions())[3]
    assert (other.card_name, other.version) in accepted and (other.card_name, other.version + "-old") not in accepted
    fast = {(e.card_name, e.version) for e in possible_choices(installed, fast=True)}
    assert fast <= _model_identity("auto-fast", None, None, SegmentOptions())[3]
    assert not (fast - {(e.card_name, e.version) for e in choices}) & accepted  # auto redoes the lite models' output
    assert _model_identity("untrained", None, None, SegmentOptions())[3] == {("untrained", "0")}  # only it


def test_bad_cohort_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        find_slides(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no slides"):
        find_slides(empty)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(InputError, match="same output"):
        find_slides([tmp_path / "a" / "x.svs", tmp_path / "b" / "x.tif"])
