"""No command destroys its input; outputs are atomic, honour the umask, and SIGTERM leaves nothing behind.

Issue 21: ``segment s.tif -o s.tif`` replaced the slide and exited 0; every output was 0600;
SIGTERM during ``segment`` left a hidden ``.part`` file. Real files, the real CLI, a real
subprocess for the signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from dannucnet.atomic import AtomicFile, atomic_path, write_text
from dannucnet.cli import TERMINATED_EXIT, main
from dannucnet.errors import InputError, OutputError
from dannucnet.outputs import refuse_clobbering

REPO = Path(__file__).resolve().parents[1]


def _image(path: Path, side: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], folder: Path, capsys) -> str:
    """Run the CLI; it must exit 2 with one error line and leave every file in ``folder`` as it was."""
    before = _snapshot(folder)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "nothing was written" in err[0], err
    assert _snapshot(folder) == before
    return err[0]


# -- segment ------------------------------------------------------------------------------------------------


@pytest.fixture()
def png(tmp_path) -> Path:
    return _image(tmp_path / "s.png")


def _segment(*args: str) -> list[str]:
    return ["segment", *args, "--mpp", "0.25", "--model", "untrained", "-q"]


def test_segment_output_equal_to_input_is_refused(png, tmp_path, capsys):
    line = _refused(_segment(str(png), "-o", str(png)), tmp_path, capsys)
    assert f"-o {png} resolves to input {png}" in line


def test_segment_overlay_equal_to_input_or_to_output_is_refused(png, tmp_path, capsys):
    _refused(_segment(str(png), "-o", str(tmp_path / "n.geojson"), "--overlay", str(png)), tmp_path, capsys)
    out = tmp_path / "n.png"
    line = _refused(_segment(str(png), "-o", str(out), "--overlay", str(out)), tmp_path, capsys)
    assert "one output would overwrite the other" in line


def test_segment_output_reaching_the_input_another_way_is_refused(png, tmp_path, capsys):
    """A relative spelling, a symlink to the input and a hard link of it all name the same bytes."""
    (tmp_path / "sub").mkdir()
    os.symlink(png, tmp_path / "link.png")
    os.link(png, tmp_path / "hard.png")
    for output in (tmp_path / "sub" / ".." / "s.png", tmp_path / "link.png", tmp_path / "hard.png"):
        _refused(_segment(str(png), "-o", str(output)), tmp_path, capsys)
    os.symlink(tmp_path, tmp_path / "alias")  # a symlinked folder
    _refused(_segment(str(png), "-o", str(tmp_path / "alias" / "s.png")), tmp_path, capsys)


def test_segment_output_onto_the_model_files_is_refused(png, tmp_path, capsys):
    from dannucnet.model import ModelCard, save_model
    from dannucnet.model.network import DANNucNet, ModelConfig

    model = tmp_path / "model"
    save_model(model, DANNucNet(ModelConfig(base_filters=16, depth=2)), ModelCard(name="m", version="1"), half=False)
    argv = ["segment", str(png), "-o", str(model / "weights.safetensors"), "--mpp", "0.25", "--model", str(model)]
    line = _refused(argv, tmp_path, capsys)
    assert "resolves to --model" in line


def test_segment_still_writes_beside_its_input(png, tmp_path, capsys):
    assert main(_segment(str(png), "-o", str(tmp_path / "s.geojson"), "--overlay", str(tmp_path / "s.ov.png"))) == 0
    assert json.loads((tmp_path / "s.geojson").read_text())["type"] == "FeatureCollection"


# -- the other commands that write files --------------------------------------------------------------------


def test_batch_slides_output_or_record_onto_a_slide_or_the_list_is_refused(tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    _image(slides / "a.png")
    parquet = _image(slides / "b.png")
    parquet.rename(slides / "b.parquet")  # a listed slide whose output name is its own
    listing = slides / "list.txt"
    listing.write_text("a.png\nb.parquet\n")
    line = _refused(["batch-slides", str(listing), "-o", str(slides), "--format", "parquet", "-q"], tmp_path, capsys)
    assert "resolves to slide" in line
    # the slide list itself named like the output of one of its slides
    named = slides / "a.geojson.gz"
    named.write_text("a.png\n")
    line = _refused(["batch-slides", str(named), "-o", str(slides), "-q"], tmp_path, capsys)
    assert "resolves to slide list" in line


def _project(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "project.qpproj").write_text("{}")
    (folder / "data" / "1").mkdir(parents=True)
    (folder / "data" / "1" / "data.qpdata").write_bytes(b"qupath")
    return folder


def test_export_training_never_replaces_the_project(tmp_path, capsys):
    """``-o`` the project, a folder holding it (``--overwrite`` would delete it), or one whose
    ``.partial`` working folder is the project: all refused before QuPath is even started."""
    project = _project(tmp_path / "proj")
    for out, extra in ((project, []), (tmp_path, ["--overwrite"]), (tmp_path / "x", [])):
        if out.name == "x":
            project = project.rename(tmp_path / "x.partial")
        _refused(["export-training", str(project), "-o", str(out), *extra], tmp_path, capsys)


def test_import_geojson_refuses_a_file_qupath_would_replace(tmp_path, capsys):
    project = _project(tmp_path / "proj")
    inside = project / "data" / "1" / "nuclei.geojson"
    inside.write_text('{"type":"FeatureCollection","features":[]}')
    line = _refused(["import-geojson", str(project), "img", str(inside)], tmp_path, capsys)
    assert "would be replaced" in line
    _refused(["import-geojson", str(project), "img", str(project / "project.qpproj")], tmp_path, capsys)


def test_batch_refuses_a_model_inside_the_folders_it_rewrites(tmp_path, capsys):
    project = _project(tmp_path / "proj")
    model = project / "data" / "1" / "model"
    model.mkdir()
    (model / "model_card.json").write_text("{}")
    _refused(["batch", str(project), "--model", str(model)], tmp_path, capsys)


def _dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    _image(root / "images" / "a.png")
    tifffile.imwrite(root / "labels" / "a.tif", np.zeros((64, 64), np.uint16))
    (root / "dataset.json").write_text(json.dumps({"mpp": 0.25}))
    return root


def test_train_refuses_out_equal_to_data_or_to_the_model_it_starts_from(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    _refused(["train", "--data", str(data), "--out", str(data), "--epochs", "1"], tmp_path, capsys)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_card.json").write_text("{}")
    (model / "weights.safetensors").write_bytes(b"weights")
    line = _refused(["train", "--data", str(data), "--out", str(model), "--init-from", str(model)], tmp_path, capsys)
    assert "resolves to --init-from" in line


def test_evaluate_outputs_never_replace_the_data_or_each_other(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    base = ["evaluate", "--data", str(data), "--model", "untrained", "--no-progress"]
    _refused([*base, "--json", str(data / "dataset.json")], tmp_path, capsys)
    _refused([*base, "--json", str(data / "images" / "a.png")], tmp_path, capsys)
    _refused([*base, "--report", str(data)], tmp_path, capsys)
    report = tmp_path / "report"
    line = _refused([*base, "--report", str(report), "--json", str(report / "evaluation.json")], tmp_path, capsys)
    assert "one output would overwrite the other" in line


def test_synth_refuses_labels_onto_the_slide(tmp_path, capsys):
    out = tmp_path / "s.tif"
    _refused(["synth", str(out), "--size", "64", "--labels", str(out)], tmp_path, capsys)
    assert not out.exists()


def test_the_rule_on_its_own():
    with pytest.raises(InputError, match="resolves to input"):
        refuse_clobbering([("input", "a/../b.tif")], [("-o", "b.tif")])
    refuse_clobbering([("input", "b.tif")], [("-o", "b.geojson"), ("--overlay", None)])


# -- the atomic writer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o007, 0o660)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    """Every writer goes through dannucnet.atomic: GeoJSON, overlay PNG, TIFFs, model folder, GeoParquet and
    cohort records get 0o666 filtered by the umask, as ``open`` would give (they were all 0600)."""
    from dannucnet.cohort.records import DoneRecord, write_done
    from dannucnet.formats.geoparquet import GeoParquetWriter
    from dannucnet.model import ModelCard, save_model
    from dannucnet.model.network import DANNucNet, ModelConfig

    png = _image(tmp_path / "s.png")
    out, overlay, slide = tmp_path / "n.geojson", tmp_path / "n.ov.png", tmp_path / "syn.tif"
    previous = os.umask(umask)
    try:
        assert main(_segment(str(png), "-o", str(out), "--overlay", str(overlay))) == 0
        assert main(["synth", str(slide), "--size", "64", "--labels", str(tmp_path / "labels.tif")]) == 0
        save_model(tmp_path / "model", DANNucNet(ModelConfig(base_filters=16, depth=2)),
                   ModelCard(name="m", version="1"))
        with GeoParquetWriter(tmp_path / "n.parquet") as writer:
            writer.write([])
        write_done(out, DoneRecord(str(png), str(out), "m", "1", 0, 0.0, 0.0))
    finally:
        os.umask(previous)
    written = [out, overlay, slide, tmp_path / "labels.tif", *(tmp_path / "model").iterdir(), tmp_path / "n.parquet",
               tmp_path / "n.geojson.done.json"]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: oct(mode) for p in written}


def test_atomic_writer_leaves_the_old_file_or_the_new_one(tmp_path):
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("stopped half-way")
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


def test_atomic_writer_never_replaces_a_file_named_like_its_temporary(tmp_path, monkeypatch):
    """The old writers used a fixed ``.<name>.part``; an input so named would have been overwritten."""
    import dannucnet.atomic as atomic

    target = tmp_path / "t.bin"
    squatter = tmp_path / ".t.bin.00000000.part"
    squatter.write_bytes(b"someone else's")
    names = iter(["00000000", "00000001"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    file = AtomicFile(target)
    assert file.tmp.name == ".t.bin.00000001.part"
    file.abort()
    assert squatter.read_bytes() == b"someone else's"


def test_temporary_files_a_signal_orphaned_are_removed(tmp_path):
    """A signal can land after the temporary file exists but before its writer is assigned; the
    CLI then calls remove_pending(), which knows every uncommitted temporary file of the process."""
    from dannucnet.atomic import remove_pending

    orphan = AtomicFile(tmp_path / "a.json")  # as if the exception struck before anyone kept it
    committed = AtomicFile(tmp_path / "b.json")
    committed.commit()
    assert orphan.tmp.exists()
    assert remove_pending() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]


def test_atomic_writer_follows_a_symlinked_output(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    (tmp_path / "link.json").symlink_to(real)
    write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and real.read_text() == "new"


def test_atomic_writer_unwritable_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        write_text(tmp_path / "missing" / "a.json", "{}")


# -- signals --------------------------------------------------------------------------------------------


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A test run started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler, so the Ctrl-C below would be lost and the CLI would finish with 0 (seen once that way)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python_backend"),
                                                         os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, TERMINATED_EXIT), (signal.SIGINT, 130)])
def test_a_signal_during_segment_leaves_no_part_file(tmp_path, signum, code):
    """Signal the real CLI once its temporary output exists (it is still segmenting: a 1536² image
    is ~80 windows of the untrained model); it must exit cleanly and leave the folder as it was."""
    png = _image(tmp_path / "big.png", side=1536)
    out = tmp_path / "big.geojson"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dannucnet", *_segment(str(png), "-o", str(out), "--no-tissue-detection")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".big.geojson.*.part")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no temporary output appeared"
            time.sleep(0.02)  # polling for the file; the signal itself needs no timing
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"], err
