"""The one chunk loop (``pipeline.slide.run_slide``) and what the doors around it now share.

The equality of the steps (in process = pipelined = server) is checked by test_pipelined.py and
test_service_server.py; here: the loop's own contract with any step (progress, cancellation between
chunks, the step closed whatever happens), one writer per format, and a cohort task opening its
slide once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dannucnet.errors import CancelledError
from dannucnet.pipeline import Nucleus, SegmentOptions, SlidePlan
from dannucnet.pipeline.slide import SlideWork, plan_slide, run_slide
from dannucnet.slides import open_image
from dannucnet.slides.synthetic import write_synthetic_slide


class RecordingStep:
    """A step that returns chunk i's core as i + 1 'nuclei' and records what it was asked for."""

    model_mpp = 0.25
    windows = None  # equal pieces

    def __init__(self) -> None:
        self.served: list[int] = []
        self.closed = 0

    def nuclei(self, work: SlideWork):
        try:
            for i, chunk in enumerate(work.plan.chunks):
                self.served.append(i)
                yield [Nucleus(polygon=chunk.core.to_polygon(), probability=1.0) for _ in range(i + 1)]
        finally:
            self.closed += 1


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return write_synthetic_slide(tmp_path_factory.mktemp("runner") / "s.tif", (700, 500), seed=1)


OPTIONS = SegmentOptions(chunk_size=256, margin=64, skip_background=False)


def test_the_loop_reports_progress_and_yields_in_chunk_order(slide):
    step, seen = RecordingStep(), []
    with open_image(slide.path) as src:
        batches = list(run_slide(step, src, options=OPTIONS, progress=lambda *a: seen.append(a)))
    total = len(batches)
    assert total >= 6, "the test needs several chunks"
    assert [len(b) for b in batches] == list(range(1, total + 1))
    assert seen == [(k, total, k * (k + 1) // 2) for k in range(total + 1)]
    assert step.served == list(range(total)) and step.closed == 1


def test_cancel_is_asked_before_every_chunk_and_closes_the_step(slide):
    step, got = RecordingStep(), []
    with open_image(slide.path) as src, pytest.raises(CancelledError):
        for batch in run_slide(step, src, options=OPTIONS, cancel=lambda: len(got) >= 2):
            got.append(batch)
    assert len(got) == 2 and step.served == [0, 1] and step.closed == 1


def test_a_consumer_that_stops_early_closes_the_step(slide):
    step = RecordingStep()
    with open_image(slide.path) as src:
        batches = run_slide(step, src, options=OPTIONS)
        next(batches)
        batches.close()
    assert step.served == [0] and step.closed == 1


def test_an_empty_plan_never_starts_the_step(slide):
    step, seen = RecordingStep(), []
    empty = SlidePlan(chunks=[], downsample=1.0, mpp=0.25, clip=None, skipped_background=3)
    with open_image(slide.path) as src:
        assert list(run_slide(step, src, plan=empty, progress=lambda *a: seen.append(a))) == []
    assert seen == [(0, 0, 0)] and step.served == [] and step.closed == 0


def test_one_writer_per_format_the_caller_picks():
    from dannucnet.formats.geojson import GeoJSONWriter
    from dannucnet.formats.geoparquet import GeoParquetWriter
    from dannucnet.jobs.segment_file import writer_for

    assert writer_for("a.parquet") is GeoParquetWriter and writer_for("A.GEOPARQUET") is GeoParquetWriter
    assert writer_for("a.geojson") is GeoJSONWriter and writer_for("a.geojson.gz") is GeoJSONWriter


def test_a_cohort_task_opens_its_slide_once(tmp_path, monkeypatch):
    """Once for the pixel-size check, the output's metadata, the overlay and the segmentation
    together (it was opened three times: worker, segment_to_geojson, the segmenter)."""
    import dannucnet.jobs.segment_file as segment_file
    import dannucnet.slides as slides
    from dannucnet.cohort.worker import TaskSpec, segment_slide_task
    from dannucnet.formats.geojson import read_features

    small = write_synthetic_slide(tmp_path / "small.tif", 300, seed=2)
    opened: list[Path] = []
    real_open = slides.open_image

    def counting_open(path, mpp=None):
        opened.append(Path(path))
        return real_open(path, mpp=mpp)

    monkeypatch.setattr(slides, "open_image", counting_open)
    monkeypatch.setattr(segment_file, "open_image", counting_open)
    out = tmp_path / "small.geojson.gz"
    spec = TaskSpec(input=str(small.path), output=str(out), model="untrained", device="cpu", batch_size=None,
                    mpp=None, options=SegmentOptions(threshold=0.3, min_area_um2=0), runtime="torch")
    result = segment_slide_task(spec)
    assert result["status"] == "done", result
    assert opened == [small.path]
    assert len(read_features(out)) == result["nuclei"]


@pytest.mark.parametrize(("slide_mpp", "model_mpp", "margin_px"), [
    (0.25, 0.25, 128),  # a 40× slide, the 40× model: 32 µm = 128 px
    (0.5, 0.5, 64),  # a 20× slide, the 20× model: 32 µm = 64 of its pixels, not 128 (64 µm)
    (0.5, 0.25, 64),  # a 20× slide upsampled for the 40× model: 128 model px = 64 slide px
])
def test_chunks_read_32_um_around_their_core_whatever_the_pixel_size(tmp_path, slide_mpp, model_mpp, margin_px):
    made = write_synthetic_slide(tmp_path / "s.tif", (1200, 1000), seed=2, mpp=slide_mpp)
    core = int(512 * model_mpp / slide_mpp)  # 512 model px in slide px
    with open_image(made.path) as src:
        plan = plan_slide(src, model_mpp, options=SegmentOptions(chunk_size=512, skip_background=False))
    left = [c.core.x - c.read.x for c in plan.chunks if c.core.x > 0]  # margins the image border did not clip
    top = [c.core.y - c.read.y for c in plan.chunks if c.core.y > 0]
    assert left and top, "the test needs chunks beside and below others"
    assert set(left) == set(top) == {margin_px}
    assert max(c.core.width for c in plan.chunks) <= core + 1
    with_cells = SegmentOptions(cell_expansion_um=5.0).chunk_margin(model_mpp)
    assert with_cells == round(32 / model_mpp) + round(2 * 5.0 / model_mpp)  # cells add twice their expansion


class _Size:
    """What plan_slide reads of a slide when background is not skipped: its size and pixel size."""

    def __init__(self, width: int, height: int, mpp: float) -> None:
        self.width, self.height, self.mpp = width, height, mpp

    def require_mpp(self) -> float:
        return self.mpp


@pytest.mark.parametrize("slide_mpp", [0.5, 0.25, 0.2525, 0.3, 0.125])
@pytest.mark.parametrize("model_mpp", [0.25, 0.5])
@pytest.mark.parametrize("tile, chunk_size", [(256, 2048), (256, 3072), (512, 3072)])
def test_planned_chunks_fill_the_windows_they_are_cut_into(slide_mpp: float, model_mpp: float, tile: int,
                                                           chunk_size: int) -> None:
    """A chunk read arrives as round(level-0 px / downsample) model px; its windows are what the plan meant.

    Against equal pieces the window-aligned plan never costs more windows, at the model's own
    pixel size or resampled (the read's outward snap to whole pixels is kept spare).
    """
    from dannucnet.engine.tiling import WindowGrid

    grid = WindowGrid(tile, 32)
    options = SegmentOptions(skip_background=False, cell_expansion_um=5.0, chunk_size=chunk_size)
    source = _Size(9000, 5000, slide_mpp)
    equal = plan_slide(source, model_mpp, options=options)  # type: ignore[arg-type]
    aligned = plan_slide(source, model_mpp, options=options, windows=grid)  # type: ignore[arg-type]
    assert aligned.downsample == equal.downsample

    def windows(plan: SlidePlan) -> int:
        total = 0
        for chunk in plan.chunks:
            read = chunk.read.to_int()
            w, h = (max(1, round(side / plan.downsample)) for side in (read.width, read.height))
            total += grid.count(w) * grid.count(h)
            assert chunk.core.width <= options.chunk_size * plan.downsample + 1
        return total

    assert sum(c.core.area for c in aligned.chunks) == 9000 * 5000
    assert windows(aligned) <= windows(equal)
    if aligned.chunks == equal.chunks:
        return  # equal pieces happened to take fewer windows (the planner counts both): nothing aligned to check
    spare = 0.0 if aligned.downsample == 1.0 else 2.0 + -(-2.0 // aligned.downsample)
    for chunk in aligned.chunks:  # each read within the span of the windows it was planned for
        read = chunk.read.to_int()
        for side in (read.width, read.height):
            n = grid.count(max(1, round(side / aligned.downsample)))
            assert side <= (grid.span(n) - spare) * aligned.downsample + 1e-6 or n == 1
