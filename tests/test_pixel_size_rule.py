"""One pixel-size plausibility rule (``dannucnet.slides.mpp``), and every door applies it.

The range used to be written three times (slides/mpp.py, service/limits.py, the QuPath script). Now
the slide reader, ``--mpp``, the server's requests and its chunk plans all take it from
``slides.mpp``; the QuPath script keeps no bound of its own and asks the server (``/v1/plan``).
Values just inside and just outside each bound, and the dpi-tag values that motivated the rule,
must get the same verdict from every door.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from dannucnet.errors import InputError
from dannucnet.service._generated.v1 import segmentation_pb2 as pb
from dannucnet.service.limits import check_mpp
from dannucnet.service.plan import pixel_size_verdict
from dannucnet.service.status import ServiceError
from dannucnet.slides.mpp import MPP_MAX, MPP_MIN, combine_xy, is_plausible, mpp_from_dpi, validate_given_mpp

SCRIPT = Path(__file__).resolve().parents[1] / "qupath_scripts" / "segment_nuclei.groovy"
NUDGE = 1e-9  # relative: far below any real calibration's precision, far above float rounding at these sizes
VALUES = [
    MPP_MIN * (1 - NUDGE), MPP_MIN, MPP_MIN * (1 + NUDGE), 0.25, 0.5,
    MPP_MAX * (1 - NUDGE), MPP_MAX, MPP_MAX * (1 + NUDGE),
    25400 / 72, 25400 / 300, 0.0, -0.25, math.inf, math.nan,
]


def test_the_rule_itself():
    assert (MPP_MIN, MPP_MAX) == (0.05, 10.0)  # module docstring of slides/mpp.py: why these two
    assert [is_plausible(v) for v in VALUES] == [False, True, True, True, True, True, True, False,
                                                 False, False, False, False, False, False]
    assert not is_plausible(None)


@pytest.mark.parametrize("value", VALUES, ids=lambda v: f"{v:.10g}")
def test_every_door_gives_the_rule_s_verdict(value):
    plausible = is_plausible(value)
    # the slide reader (metadata of a file) and PIL's dpi fields
    assert (combine_xy(value, value, "test")[0] is not None) == plausible
    if value > 0 and math.isfinite(value):
        assert (mpp_from_dpi((25400 / value, 25400 / value), "PNG")[0] is not None) == plausible
    # --mpp typed by a user
    try:
        validate_given_mpp(value)
        accepted = True
    except InputError:
        accepted = False
    assert accepted == plausible
    # a request's pixelSizeMicrons (SegmentRegion, SegmentSlide)
    try:
        check_mpp(value)
        accepted = True
    except ServiceError:
        accepted = False
    assert accepted == plausible
    # PlanRegion, as the QuPath script asks it: the user's override, then the image's calibration
    override = pb.PlanRegionRequest(image_width=100, image_height=100, pixel_size_microns=value)
    calibrated = pb.PlanRegionRequest(image_width=100, image_height=100, image_pixel_width_microns=value,
                                      image_pixel_height_microns=value)
    assert (pixel_size_verdict(override)[0] is not None) == plausible
    assert (pixel_size_verdict(calibrated)[0] is not None) == plausible


def _groovy_code(text: str) -> str:
    """The script without its comments (what runs)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def test_the_qupath_script_keeps_no_bound_of_its_own():
    """No literal equal to either bound: neither as a double (0.05, 10.0d, 1e1) nor compared with anything."""
    code = _groovy_code(SCRIPT.read_text(encoding="utf-8"))
    number = r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
    doubles = re.findall(rf"(?<![\w.])({number})[dDfFgG]?(?![\w.])", code)
    floats = [float(n) for n in doubles if re.search(r"[.eE]", n)]
    suffixed = [float(m) for m in re.findall(rf"(?<![\w.])({number})[dDfF](?![\w.])", code)]
    compared = [float(m) for m in re.findall(rf"[<>]=?\s*({number})(?![\w.])", code)]
    compared += [float(m) for m in re.findall(rf"(?<![\w.])({number})\s*[<>]", code)]
    for bound in (MPP_MIN, MPP_MAX):
        assert bound not in floats + suffixed + compared, f"the QuPath script holds the pixel-size bound {bound}"
    assert "/v1/plan" in code  # it asks the server, which applies the rule (pixel_size_verdict above)
