"""QuPath scripts: lint them, and run their QuPath-independent part under real Groovy against a real server.

QuPath itself is not installable here, so ``segment_nuclei.groovy`` keeps everything that needs no
QuPath class (settings, the HTTP/JSON exchange with its error messages, request bodies, answer
parsing, the bounded pool and its cancellation) in its ``CORE`` section. This module cuts the
SETTINGS block and that section out of the very file a user drops into QuPath, appends
``tests/groovy/core_driver.groovy`` and runs the result with the Groovy 4 that npm-groovy-lint
bundles and the Gson and JTS that QuPath ships (Debian's libgoogle-gson-java / libjts-java, or the
same versions from a local Maven repository), against ``dannucnet serve`` on a free loopback port.
The chunk plan itself is the server's (tests/test_service_plan.py holds it to the pipeline's).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from google.protobuf import json_format
from shapely import wkt
from shapely.geometry import MultiPolygon, Point, Polygon, box

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "qupath_scripts"
MAIN_SCRIPT = SCRIPTS / "segment_nuclei.groovy"
DRIVER = REPO / "tests" / "groovy" / "core_driver.groovy"
LINTER = REPO / "node_modules" / "npm-groovy-lint"
GROOVY_LIB = LINTER / "lib" / "java" / "groovy" / "lib"
M2 = Path.home() / ".m2" / "repository"
# What QuPath ships (0.5.1: Gson 2.10.1, JTS 1.19; 0.6.0: Gson 2.13.1, JTS 1.20): Debian bookworm's
# packages, else the same libraries from a local Maven repository.
JARS = {
    "Gson": [Path("/usr/share/java/gson.jar"), *sorted(M2.glob("com/google/code/gson/gson/2.1[0-3]*/gson-*.jar"))],
    "JTS": [Path("/usr/share/java/jts-core.jar"), *sorted(M2.glob("org/locationtech/jts/jts-core/1.*/jts-core-*.jar"))],
}
TOKEN = "qupath-script-test-token-0123456789"
THRESHOLD = 0.45  # the untrained network's probabilities hover near 0.45: this gives a few shapes per 256² tile
SECTION = re.compile(r"^// BEGIN (\w+)\n(.*?)^// END \1$", re.S | re.M)
ALLOWED_IMPORTS = {
    "CORE": ("java.", "javax.", "com.google.gson.", "org.locationtech.jts."),
    "QUPATH": ("qupath.lib.",),
}
MAX_LINES = 600  # issue 17: well under half of the former 1,245 lines

pytestmark = pytest.mark.timeout(600)


# ---- tooling -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tooling() -> dict[str, str]:
    """java, npm-groovy-lint (with its Groovy; installed like `make groovy` when missing), Gson and JTS."""
    java, npm = shutil.which("java"), shutil.which("npm")
    if java is None or npm is None:
        pytest.skip("needs java and npm (npm-groovy-lint bundles the Groovy the scripts are run with)")
    if not GROOVY_LIB.is_dir():
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO, capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0 or not GROOVY_LIB.is_dir():
            pytest.fail(f"`npm ci` (what `make groovy` runs) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    jars = {name: next((j for j in options if j.is_file()), None) for name, options in JARS.items()}
    missing = [name for name, jar in jars.items() if jar is None]
    if missing:
        pytest.skip(f"needs {' and '.join(missing)} as QuPath ships them "
                    "(Debian: apt-get install libgoogle-gson-java libjts-java)")
    return {"java": java, "npm": npm, "classpath": os.pathsep.join([str(GROOVY_LIB / "*"), *map(str, jars.values())])}


def sections(path: Path = MAIN_SCRIPT) -> dict[str, str]:
    return {name: body for name, body in SECTION.findall(path.read_text(encoding="utf-8"))}


def settings_block(path: Path = MAIN_SCRIPT) -> str:
    """The user-editable part above the CORE section (the SETTINGS map)."""
    return path.read_text(encoding="utf-8").split("// BEGIN CORE", 1)[0]


def run_driver(tooling: dict[str, str], tmp_path: Path, config: dict) -> dict:
    """SETTINGS + CORE + the driver, run under Groovy; returns what the driver wrote."""
    script = tmp_path / f"run_{config['mode']}.groovy"
    code = settings_block() + sections()["CORE"]
    script.write_text(code + DRIVER.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / f"out_{config['mode']}.json"
    cfg = tmp_path / f"cfg_{config['mode']}.json"
    cfg.write_text(json.dumps({**config, "out": str(out)}), encoding="utf-8")
    cmd = [tooling["java"], "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp", tooling["classpath"],
           "groovy.ui.GroovyMain", str(script), str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"groovy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text(encoding="utf-8"))


def synthetic_png(path: Path, size: int, seed: int) -> Path:
    from dannucnet.slides.synthetic import make_synthetic_he

    image = make_synthetic_he(size, size, seed=seed, mpp=0.25)
    assert cv2.imwrite(str(path), cv2.cvtColor(image.rgb, cv2.COLOR_RGB2BGR))
    return path


def rect(r: dict):
    return box(r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"])


# ---- static checks -------------------------------------------------------------
def lint_command(npm: str) -> list[str]:
    # --noserver: no CodeNarc server left running after the tests.
    return [npm, "exec", "--no", "--", "npm-groovy-lint", "--noserver", "--path", str(SCRIPTS),
            "--files", "**/*.groovy", "--config", str(SCRIPTS / ".groovylintrc.json"),
            "--output", "json", "--failon", "warning"]


@pytest.fixture(scope="module", autouse=True)
def background_lint(tmp_path_factory):
    """Starts the linter first so that its JVM overlaps the other tests; test_lint_every_script collects it."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("java") is None or not LINTER.is_dir():
        yield None
        return
    out = tmp_path_factory.mktemp("lint") / "report.txt"
    with open(out, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(lint_command(npm), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_script_is_short_and_uses_only_what_qupath_ships():
    """CORE needs no QuPath class; nothing outside QuPath's bundle; SETTINGS on top; short."""
    text = MAIN_SCRIPT.read_text(encoding="utf-8")
    assert len(text.splitlines()) < MAX_LINES
    for script in sorted(SCRIPTS.glob("*.groovy")):
        body = script.read_text(encoding="utf-8")
        assert "@Grab" not in body and "JsonSlurper" not in body and "groovy.json" not in body, script.name
        assert not re.search(r"\.resolveHierarchy\s*\(", body), f"{script.name} calls resolveHierarchy()"
    parts = sections()
    assert list(parts) == ["CORE", "QUPATH"]
    for name, body in parts.items():
        for imp in re.findall(r"^import\s+([\w.]+)", body, re.M):
            assert imp.startswith(ALLOWED_IMPORTS[name]), f"{name} imports {imp}"
    # Outside the sections there is only the SETTINGS map (and comments): the tests see all other code.
    code = [ln.strip() for ln in SECTION.sub("", text).splitlines()
            if ln.strip() and not ln.strip().startswith(("//", "/*", "*"))]
    assert code[0] == "Map SETTINGS = [" and code[-1] == "]", code
    assert all(re.match(r"^\w+\s*:", ln) for ln in code[1:-1]), code
    # No planner or pixel-size rule of its own: those are the server's (POST /v1/plan).
    assert "/v1/plan" in parts["CORE"] + parts["QUPATH"]
    assert not re.search(r"\b(0\.05|10\.0)d?\b", parts["CORE"] + parts["QUPATH"])  # no plausible-µm/px bounds here
    assert "marginPx" not in text


# ---- CORE under Groovy, no server ------------------------------------------------
def proto_answer(path: Path) -> Path:
    """A SegmentRegionResponse in proto JSON, as `POST /v1/segment?alt=json` sends it; the second nucleus has a
    cell (``cellWkb``, the field h17-cells adds), the first a hole."""
    from dannucnet.pipeline.types import Nucleus
    from dannucnet.service._generated.v1 import segmentation_pb2 as pb
    from dannucnet.service.convert import nuclei_to_proto

    holed = Polygon([(10, 10), (20, 10), (20, 20), (10, 20)], [[(12, 12), (14, 12), (14, 14), (12, 12)]])
    two = MultiPolygon([box(30, 30, 40, 40), box(50, 50, 60, 60)])
    nuclei = [Nucleus(polygon=holed, probability=0.9, measurements={"Nucleus: Area": 6.0},
                      id="1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
              Nucleus(polygon=two, probability=0.7, measurements={"Nucleus: Area": 12.5, "Detection probability": 0.5},
                      id="x")]
    answer = json_format.MessageToDict(pb.SegmentRegionResponse(nuclei=nuclei_to_proto(nuclei), nucleus_count=2),
                                       always_print_fields_with_no_presence=True)
    answer["nuclei"][1]["cellWkb"] = base64.b64encode(shapely.to_wkb(box(25, 25, 65, 65))).decode()
    path.write_text(json.dumps(answer), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def unit_results(tooling, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groovy_unit")
    config = {
        "mode": "unit",
        "answer": str(proto_answer(tmp / "answer.json")),
        "image": str(synthetic_png(tmp / "he.png", 96, seed=3)),
        "configs": [
            {"settings": {}, "env": {"DANNUCNET_TOKEN": " from-env "}},
            {"settings": {"token": "from-settings", "parents": "class: Tumor stroma", "threshold": "0.4",
                          "serverUrl": "https://gpu-box:9000/", "parallelRequests": 3, "replacePrevious": False,
                          "cellExpansionMicrons": 0},
             "env": {"DANNUCNET_TOKEN": "from-env"}},
            {"settings": {"parents": "Selected", "className": ""}, "env": {}},
            {"settings": {"threshhold": 0.5}, "env": {}},
            {"settings": {"serverUrl": "127.0.0.1:8765"}, "env": {}},
            {"settings": {"parents": "everything"}, "env": {}},
            {"settings": {"parents": "class:"}, "env": {}},
            {"settings": {"replacePrevious": "yes"}, "env": {}},
            {"settings": {"parallelRequests": "many"}, "env": {}},
            {"settings": {"parallelRequests": 0}, "env": {}},
        ],
    }
    return run_driver(tooling, tmp, config), config


def test_settings_are_parsed_strictly(unit_results):
    out, _ = unit_results
    ok = [c.get("ok") for c in out["configs"]]
    errors = [c.get("error") for c in out["configs"]]
    assert ok[0]["serverUrl"] == "http://127.0.0.1:8765" and ok[0]["token"] == "from-env"
    assert ok[0]["model"] == "auto"
    assert ok[0]["cellExpansionMicrons"] == 5.0 and ok[0]["parents"] == "auto" and ok[0]["replacePrevious"] is True
    assert ok[0]["threshold"] is None and ok[0]["chunkSizePx"] is None and ok[0]["className"] == "Nucleus"
    assert ok[1]["token"] == "from-settings" and ok[1]["serverUrl"] == "https://gpu-box:9000"
    assert (ok[1]["parents"], ok[1]["parentClass"]) == ("class", "Tumor stroma")
    assert ok[1]["threshold"] == 0.4 and ok[1]["parallelRequests"] == 3 and ok[1]["replacePrevious"] is False
    assert ok[1]["cellExpansionMicrons"] == 0
    assert ok[2]["token"] is None and ok[2]["parents"] == "selected" and ok[2]["className"] == ""
    assert "threshhold" in errors[3] and "cellExpansionMicrons" in errors[3]  # the typo named, the settings listed
    assert "http://" in errors[4]
    assert "'everything'" in errors[5] and "class:NAME" in errors[5]
    assert "class:NAME" in errors[6]
    assert "true or false" in errors[7]
    assert "parallelRequests must be a number" in errors[8]
    assert "at least 1" in errors[9]
    assert out["shipped"]["serverUrl"] == "http://127.0.0.1:8765" and out["shipped"]["cellExpansionMicrons"] == 5.0


def test_requests_follow_the_gateway_contract(unit_results):
    out, config = unit_results
    stains = {"name": "H&E estimated", "maxRed": 241.0, "maxGreen": 236.0, "maxBlue": 250.0,
              "stains": [{"name": "Hematoxylin", "r": 0.651, "g": 0.701, "b": 0.29},
                         {"name": "Eosin", "r": 0.216, "g": 0.801, "b": 0.558},
                         {"name": "Residual", "r": 0.316, "g": -0.598, "b": 0.737}]}
    assert out["options"] == {"threshold": 0.4, "cellExpansionMicrons": 5.0, "stains": stains}
    assert out["noStains"] == {"threshold": 0.4, "cellExpansionMicrons": 5.0}  # no stains set: the server's default
    plan = out["plan"]
    assert set(plan) == {"imageWidth", "imageHeight", "imagePixelWidthMicrons", "imagePixelHeightMicrons", "chunkSize",
                         "roiWkb", "options"}
    assert (plan["imageWidth"], plan["imageHeight"], plan["chunkSize"]) == (1000, 800, 1024)
    assert (plan["imagePixelWidthMicrons"], plan["imagePixelHeightMicrons"]) == (0.25, 0.26)
    assert shapely.from_wkb(base64.b64decode(plan["roiWkb"])).equals(Polygon([(10, 10), (300, 10), (300, 200)]))
    assert plan["options"] == out["options"]
    assert set(out["planWhole"]) == {"imageWidth", "imageHeight", "chunkSize", "options"}  # uncalibrated, whole image
    assert out["planFast"]["model"] == "auto-fast" and "model" not in plan  # 'auto' sends none: the server's default
    seg = out["segment"]
    assert set(seg) == {"image", "originX", "originY", "downsample", "pixelSizeMicrons", "core", "clipWkb", "options"}
    assert out["segmentModel"] == "dannucnet-monuseg-20x"  # a named model travels; 'auto' (above): the server's choice
    assert out["tags"] == ["dannucnet:m@2", "f"]
    assert (seg["originX"], seg["originY"], seg["downsample"], seg["pixelSizeMicrons"]) == (10, 20, 2.0, 0.25)
    assert seg["core"] == {"x": 40, "y": 50, "width": 64, "height": 64} and seg["clipWkb"] == "AQMAAAA="
    assert "clipWkb" not in out["segmentNoClip"]
    png = base64.b64decode(seg["image"]["encoded"])
    sent = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and np.array_equal(sent, cv2.imread(config["image"], cv2.IMREAD_UNCHANGED))


def test_answers_become_nuclei_and_cells(unit_results):
    out, _ = unit_results
    first, second = out["parsed"]["nuclei"]
    assert first["id"] == "1b4e28ba-2fa1-11d2-883f-0016d3cca427" and first["cell"] is None
    assert first["measurements"] == {"Nucleus: Area": 6.0, "Detection probability": pytest.approx(0.9)}
    assert wkt.loads(first["nucleus"]).area == pytest.approx(100 - 2)  # shell minus the triangular hole
    assert wkt.loads(second["nucleus"]).geom_type == "MultiPolygon"
    assert wkt.loads(second["cell"]).equals(box(25, 25, 65, 65))
    assert second["measurements"]["Detection probability"] == 0.5  # the server's own value is kept


def test_progress_lines(unit_results):
    out, _ = unit_results
    assert out["progress"] == ["0/40 chunks, 0 nuclei, 0.5 s", "12/40 chunks, 3,456 nuclei, 35.0 s, about 82 s left",
                               "40/40 chunks, 9,999 nuclei, 120.0 s"]


# ---- against a real `dannucnet serve` ----------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def background_server(tmp_path_factory):
    """`dannucnet serve` on a free loopback port, started at module start so that its model load
    overlaps the Groovy runs that need no server; the `server` fixture waits until it answers."""
    if shutil.which("java") is None or shutil.which("npm") is None:
        yield None  # every test that needs the server skips for want of Groovy
        return
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # Port 0 for both: the server picks free ports (no race with other processes) and prints them.
    cmd = [sys.executable, "-m", "dannucnet", "serve", "--port", "0", "--http-port", "0", "--model", "untrained",
           "--device", "cpu", "--token", TOKEN, "--grace", "1",
           # one tile per forward pass: a tile's probabilities then never depend on which other request's tiles
           # shared its batch (batch 1 vs 2 differ by ~3e-7 on CPU), so two doors can be compared exactly
           "--max-batch", "1"]
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield proc, log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def addresses(tooling, background_server) -> dict[str, str]:
    """The HTTP URL and gRPC address the server printed, once it answers /healthz."""
    proc, log = background_server
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"dannucnet serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        printed = dict(re.findall(r"^(HTTP|gRPC)\s+(\S+)", log.read_text(encoding="utf-8"), re.M))
        try:
            if "HTTP" in printed:
                with urllib.request.urlopen(printed["HTTP"] + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return {"http": printed["HTTP"].rstrip("/"), "grpc": printed["gRPC"]}
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"dannucnet serve did not answer within 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(addresses) -> str:
    return addresses["http"]


@pytest.fixture(scope="module")
def served(tooling, server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groovy_server")
    config = {
        "mode": "server",
        "serverUrl": server,
        "token": TOKEN,
        "deadUrl": f"http://127.0.0.1:{free_port()}",
        "image": str(synthetic_png(tmp / "he.png", 512, seed=11)),
        "mpp": 0.25,
        "chunkPx": 256,  # the smallest the server plans: 2 × 2 chunks of this image
        "parallel": 2,
        "threshold": THRESHOLD,
        "roiWkt": "POLYGON ((20 30, 480 60, 440 490, 60 420, 20 30))",
    }
    return run_driver(tooling, tmp, config), config


def test_handshake_and_failures_say_what_to_do(served):
    out, config = served
    assert out["model"]["apiVersion"] == "v1" and out["model"]["trained"] is False
    errors = out["errors"]
    assert "refused the access token" in errors["wrongToken"] and "HTTP 401" in errors["wrongToken"]
    assert "refused the access token" in errors["noToken"] and "DANNUCNET_TOKEN" in errors["noToken"]
    assert "Cannot reach the DAN-NucNet server" in errors["unreachable"]
    assert "start it with: dannucnet serve --http-port " + config["deadUrl"].rsplit(":", 1)[1] in errors["unreachable"]
    assert "HTTP 404" in errors["notFound"] and "HTTP port" in errors["notFound"]
    assert "HTTP 400" in errors["badOption"] and "options.threshold" in errors["badOption"]  # the server judges ranges


def test_the_plan_comes_from_the_server(served):
    """The script's plan is the server's (the pipeline's): same chunks as plan_slide would make."""
    out, config = served
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.pipeline.slide import plan_slide
    from dannucnet.service.plan import _Extent

    roi = wkt.loads(config["roiWkt"])
    expected = plan_slide(_Extent(512, 512, 0.25), out["model"]["pixelSizeMicrons"], rois=[roi],
                          options=SegmentOptions(chunk_size=config["chunkPx"], skip_background=False))
    plan = out["plan"]
    assert plan["pixelSizeMicrons"] == 0.25 and plan["downsample"] == 1.0 and plan["pixelSizeProblem"] == ""
    assert [(rect(c["read"]).bounds, rect(c["core"]).bounds) for c in plan["chunks"]] == [
        (c.read.to_int().to_polygon().bounds, c.core.to_polygon().bounds) for c in expected.chunks]
    assert len(plan["chunks"]) == 4
    assert "72 dpi" in out["uncalibrated"]["pixelSizeProblem"] and not out["uncalibrated"].get("chunks")


def test_chunked_run_owns_each_nucleus_once(served):
    out, config = served
    run = out["chunked"]
    chunks = out["plan"]["chunks"]
    assert run["maxRunning"] == config["parallel"] and run["order"] == [1, 2, 3, 4]  # bounded pool, every chunk once
    roi = wkt.loads(config["roiWkt"])
    seen = []
    for n in run["nuclei"]:
        chunk = chunks[n["chunk"]]
        s = wkt.loads(n["nucleus"])
        assert s.is_valid and s.area > 0 and n["cell"] is None  # no cells asked for (cellExpansionMicrons null)
        # level-0 coordinates, inside what was read, owned by the core and centred in the annotation
        assert rect(chunk["read"]).buffer(1e-6).contains(s)
        cx, cy = n["centroid"]
        core = chunk["core"]
        assert core["x"] <= cx < core["x"] + core["width"] and core["y"] <= cy < core["y"] + core["height"]
        assert roi.contains(Point(cx, cy)) and "Detection probability" in n["measurements"]
        seen.append(s)
    # One copy of every object smaller than the margin (128 px); the untrained network also draws
    # larger blobs, which two chunks may each see cut differently: those are outside the promise.
    small = [s for s in seen if max(s.bounds[2] - s.bounds[0], s.bounds[3] - s.bounds[1]) <= 128]
    assert len(small) >= 5
    for i, a in enumerate(small):
        for b in small[i + 1:]:
            assert a.intersection(b).area < 0.5 * min(a.area, b.area)


def test_cells_through_the_real_server(served):
    """The shipped setting (cellExpansionMicrons 5) with the image's stains: the server answers cells the script turns
    into cell objects: each cell holds its nucleus, cells never overlap, QuPath's Cell detection names come back."""
    out, _ = served
    assert out["cellOptions"]["cellExpansionMicrons"] == 5.0 and len(out["cellOptions"]["stains"]["stains"]) == 2
    assert out["cellTag"] == "dannucnet:untrained@0"  # the answer names the model that ran
    assert "HTTP 400" in out["namedModel"] and "no-such-model" in out["namedModel"]
    cells = out["cells"]
    assert len(cells) >= 3
    shapes = []
    for n in cells:
        nucleus, cell = wkt.loads(n["nucleus"]), wkt.loads(n["cell"])
        assert cell.is_valid and nucleus.is_valid and cell.buffer(1e-6).contains(nucleus) and cell.area > nucleus.area
        m = n["measurements"]
        for name in ("Nucleus: Area", "Cell: Area", "Cytoplasm: Hematoxylin OD mean", "Nucleus/Cell area ratio"):
            assert name in m, name
        assert m["Nucleus/Cell area ratio"] == pytest.approx(m["Nucleus: Area"] / m["Cell: Area"], rel=1e-3)
        shapes.append(cell)
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            assert a.intersection(b).area < 1e-6


def test_python_door_gives_the_same_nuclei(served, addresses):
    """`dannucnet batch` through a server (segment_image_via_server) finds what the script finds: same plan,
    same pixels, same nuclei and measurements."""
    out, config = served
    from dannucnet.client import DanNucNetClient, segment_image_via_server
    from dannucnet.pipeline import SegmentOptions
    from dannucnet.slides import open_image

    options = SegmentOptions(threshold=THRESHOLD, chunk_size=config["chunkPx"], skip_background=False)
    with DanNucNetClient(addresses["grpc"], token=TOKEN, retries=0) as client, \
            open_image(config["image"], mpp=config["mpp"]) as source:
        python = [n for batch in segment_image_via_server(client, source, options=options,
                                                          rois=[wkt.loads(config["roiWkt"])]) for n in batch]
    groovy = out["chunked"]["nuclei"]
    assert len(python) == len(groovy) > 0
    by_centroid = {(round(n.polygon.centroid.x, 3), round(n.polygon.centroid.y, 3)): n for n in python}
    for n in groovy:
        match = by_centroid[(round(n["centroid"][0], 3), round(n["centroid"][1], 3))]
        assert shapely.normalize(wkt.loads(n["nucleus"])).equals_exact(shapely.normalize(match.polygon), 1e-6)
        expected = {**match.measurements, "Detection probability": match.probability}
        assert n["measurements"] == pytest.approx(expected)


def test_interrupt_stops_promptly_and_drops_late_answers(served):
    out, _ = served
    cancel = out["cancel"]
    assert cancel["message"] and "Stopped on request" in cancel["message"]
    assert cancel["resultsAfterInterrupt"] == 0
    assert cancel["afterInterruptMs"] < 2000  # not waiting for the chunk still on the server
    assert cancel["interruptFlagKept"] is True  # QuPath's batch loop sees the interrupt too


# ---- lint (collected late: it ran in the background meanwhile) ------------------
def test_lint_every_script(tooling, background_lint):
    scripts = sorted(SCRIPTS.glob("*.groovy"))
    assert MAIN_SCRIPT in scripts
    if background_lint is None:  # the linter was installed by `tooling` just now
        proc = subprocess.run(lint_command(tooling["npm"]), cwd=REPO, capture_output=True, text=True, timeout=500)
        returncode, text = proc.returncode, proc.stdout + proc.stderr
    else:
        proc, out = background_lint
        returncode = proc.wait(timeout=500)
        text = out.read_text(encoding="utf-8")
    start = text.find('{"summary"')
    assert start >= 0, f"npm-groovy-lint printed no report:\n{text[-3000:]}"
    report, _ = json.JSONDecoder().raw_decode(text[start:])
    found = {Path(f).name: v["errors"] for f, v in report["files"].items()}
    assert sorted(found) == [p.name for p in scripts]
    problems = {f: [f"{e['line']}: {e['rule']} {e['msg']}" for e in errs if e["severity"] in ("error", "warning")]
                for f, errs in found.items()}
    assert not any(problems.values()), problems
    assert returncode == 0, text[-3000:]


# ---- the whole script on real QuPath classes (when QuPath's jars are available) ----------
def qupath_java_and_classpath() -> tuple[str, list[str]] | None:
    """QuPath's jars: DANNUCNET_QUPATH_CLASSPATH (qupath-core + its dependencies, without Groovy), or the
    app folder of the installation in PAQUO_QUPATH_DIR (with its own Groovy and Java runtime)."""
    explicit = os.environ.get("DANNUCNET_QUPATH_CLASSPATH")
    if explicit:
        return shutil.which("java") or "java", [*explicit.split(os.pathsep), str(GROOVY_LIB / "*")]
    root = os.environ.get("PAQUO_QUPATH_DIR")
    if root:
        jars = sorted(Path(root).rglob("qupath-core-processing-*.jar"))
        if jars:
            runtimes = sorted(Path(root).rglob("bin/java"))
            return str(runtimes[0]) if runtimes else (shutil.which("java") or "java"), [str(jars[0].parent / "*")]
    return None


def test_whole_script_on_qupath_classes(tooling, server, tmp_path):
    found = qupath_java_and_classpath()
    if found is None:
        pytest.skip("needs QuPath's jars: set PAQUO_QUPATH_DIR to a QuPath 0.5/0.6 installation "
                    "(or DANNUCNET_QUPATH_CLASSPATH to qupath-core and its dependencies)")
    java, classpath = found
    text = MAIN_SCRIPT.read_text(encoding="utf-8")
    for old, new in [
        ("serverUrl           : 'http://127.0.0.1:8765'", f"serverUrl           : '{server}'"),
        ("token               : ''", f"token               : '{TOKEN}'"),
        ("threshold           : null", f"threshold           : {THRESHOLD}"),
        ("chunkSizePx         : null", "chunkSizePx         : 256"),
        # the server of this branch may not know cells yet: nucleus detections (cells need options.cellExpansionMicrons)
        ("cellExpansionMicrons: 5.0,", "cellExpansionMicrons: null,"),
    ]:
        assert old in text
        text = text.replace(old, new)
    script = tmp_path / "segment_nuclei.groovy"
    script.write_text(text, encoding="utf-8")
    out = tmp_path / "out.json"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"script": str(script), "image": str(synthetic_png(tmp_path / "he.png", 256, seed=11)),
                               "mpp": 0.25, "out": str(out)}), encoding="utf-8")
    proc = subprocess.run([java, "-XX:TieredStopAtLevel=1", "-cp", os.pathsep.join(classpath), "groovy.ui.GroovyMain",
                           str(REPO / "tests" / "groovy" / "qupath_harness.groovy"), str(cfg)],
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    res = json.loads(out.read_text(encoding="utf-8"))
    assert "Done:" in proc.stdout and "[dannucnet]" in proc.stdout

    def annotations(root):
        return {c["name"]: c for c in root["children"] if c["annotation"]}

    def ours(obj):
        return [c for c in obj["children"] if c["detection"] and (c["name"] or "").startswith("dannucnet:")]

    rois = {"tumor": Polygon([(10, 10), (120, 20), (110, 120), (15, 100)]), "box": box(140, 140, 250, 250)}
    assert res["firstError"] is None and res["secondError"] is None
    first, second = annotations(res["first"]), annotations(res["second"])
    assert not ours(res["first"])  # nothing lands on the root when annotations exist
    assert not first["drawn nucleus"]["children"]  # nucleus annotations are not parents
    assert first["box"]["locked"] is True and first["tumor"]["locked"] is False  # lock state restored
    assert "keep" in annotations(first["tumor"])  # other children survive
    ids = {c["id"] for c in first["tumor"]["children"]}
    assert res["oldOursId"] not in ids  # our earlier object replaced ...
    assert res["otherToolId"] in ids  # ... a detection another tool (or a person) made is kept
    total = 0
    for name, roi in rois.items():
        for n in ours(first[name]):
            assert n["cls"] == "Nucleus" and len(n["measurements"]) >= 5 and n["name"] == "dannucnet:untrained@0"
            assert roi.contains(Point(n["centroid"]))  # kept because centred inside
            total += 1
        # Running again replaces this script's objects instead of adding to them.
        assert sorted(n["wkt"] for n in ours(second[name])) == sorted(n["wkt"] for n in ours(first[name]))
    assert total > 0
    # With one annotation selected only it is filled; replacePrevious false keeps the earlier ones.
    assert res["selectedError"] is None
    selected = annotations(res["selected"])
    assert len(ours(selected["box"])) == 2 * len(ours(second["box"]))
    assert ours(selected["tumor"]) == ours(second["tumor"])
    # No annotation: the whole image, objects under the root, none twice.
    assert res["wholeError"] is None
    whole = ours(res["whole"])
    assert whole and len({n["wkt"] for n in whole}) == len(whole)
    # No pixel size: refused, nothing touched.
    assert "no usable pixel size" in res["uncalibratedError"]
    assert not res["uncalibrated"]["children"][0]["children"]
    # Kill running script: stops within a second or two, the annotation is as it was.
    assert "Stopped on request" in res["killError"] and res["killAlive"] is False and res["killMs"] < 2000
    victim = annotations(res["killed"])["victim"]
    assert not victim["children"] and victim["locked"] is False
