"""QuPath scripts: lint them, and run their QuPath-independent parts under real Groovy against a real server.

QuPath itself is not installable here, so ``segment_nuclei.groovy`` keeps everything that needs no
QuPath class (settings, downsample, chunk planning, HTTP/JSON exchange, answer parsing, the bounded
pool and its cancellation) in marked sections. This module cuts those sections out of the very file a
user drops into QuPath, appends ``tests/groovy/core_driver.groovy`` and runs the result with the
Groovy 4 that npm-groovy-lint bundles, against ``dannucnet serve`` started on a free loopback port.
Gson and JTS (what QuPath bundles) come from Debian's libgoogle-gson-java / libjts-java when
installed; without them the driver uses groovy-json and skips the JTS checks, and says so.
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
from shapely.geometry import Point, Polygon, box
from shapely.ops import unary_union

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "qupath_scripts"
MAIN_SCRIPT = SCRIPTS / "segment_nuclei.groovy"
DRIVER = REPO / "tests" / "groovy" / "core_driver.groovy"
LINTER = REPO / "node_modules" / "npm-groovy-lint"
GROOVY_LIB = LINTER / "lib" / "java" / "groovy" / "lib"
# QuPath 0.5.1 bundles Gson 2.10.1 and JTS 1.19: Debian bookworm ships the same versions.
OPTIONAL_JARS = {"GSON": Path("/usr/share/java/gson.jar"), "JTS": Path("/usr/share/java/jts-core.jar")}
TOKEN = "qupath-script-test-token-0123456789"
THRESHOLD = 0.45  # the untrained network's probabilities hover near 0.45: this gives a dozen shapes per 256² tile
SECTION = re.compile(r"^// BEGIN (\w+)\n(.*?)^// END \1$", re.S | re.M)
ALLOWED_IMPORTS = {
    "CORE": ("java.", "javax."),
    "GSON": ("com.google.gson.",),
    "JTS": ("org.locationtech.jts.",),
    "GUI": ("javafx.", "qupath.lib.gui."),
    "QUPATH": ("qupath.lib.",),
}

pytestmark = pytest.mark.timeout(600)


# ---- tooling -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tooling() -> dict[str, str]:
    """java and npm-groovy-lint (with its Groovy); installs the latter like `make groovy` when missing."""
    java, npm = shutil.which("java"), shutil.which("npm")
    if java is None or npm is None:
        pytest.skip("needs java and npm (npm-groovy-lint bundles the Groovy the scripts are run with)")
    if not GROOVY_LIB.is_dir():
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=REPO, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not GROOVY_LIB.is_dir():
            pytest.fail(f"`npm ci` (what `make groovy` runs) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return {"java": java, "npm": npm}


def sections(path: Path = MAIN_SCRIPT) -> dict[str, str]:
    return {name: body for name, body in SECTION.findall(path.read_text(encoding="utf-8"))}


def settings_block(path: Path = MAIN_SCRIPT) -> str:
    """The user-editable part above the CORE section (the SETTINGS map)."""
    return path.read_text(encoding="utf-8").split("// BEGIN CORE", 1)[0]


def run_driver(tooling: dict[str, str], tmp_path: Path, config: dict, *, with_settings: bool = False) -> dict:
    """Concatenate the script's sections with the driver, run it under Groovy, return what it wrote."""
    parts = sections()
    jars = [str(GROOVY_LIB / "*")]
    code = settings_block() if with_settings else ""
    code += parts["CORE"]
    for name, jar in OPTIONAL_JARS.items():
        if jar.is_file():
            code += parts[name]
            jars.append(str(jar))
    script = tmp_path / f"run_{config['mode']}.groovy"
    script.write_text(code + DRIVER.read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / f"out_{config['mode']}.json"
    cfg = tmp_path / f"cfg_{config['mode']}.json"
    cfg.write_text(json.dumps({**config, "out": str(out)}), encoding="utf-8")
    cmd = [tooling["java"], "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp", os.pathsep.join(jars),
           "groovy.ui.GroovyMain", str(script), str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"groovy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text(encoding="utf-8"))


def synthetic_png(path: Path, size: int, seed: int) -> Path:
    from dannucnet.slides.synthetic import make_synthetic_he

    image = make_synthetic_he(size, size, seed=seed, mpp=0.25)
    assert cv2.imwrite(str(path), cv2.cvtColor(image.rgb, cv2.COLOR_RGB2BGR))
    return path


def ring(flat: list[float]) -> list[tuple[float, float]]:
    return list(zip(flat[0::2], flat[1::2]))


def shape(nucleus: dict) -> Polygon:
    parts = [Polygon(ring(p[0]), [ring(h) for h in p[1:]]) for p in nucleus["polygons"]]
    return unary_union(parts) if len(parts) > 1 else parts[0]


def rect(r: dict):
    return box(r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"])


# ---- static checks -------------------------------------------------------------
def lint_command(npm: str) -> list[str]:
    # --noserver: no CodeNarc server left running after the tests.
    return [npm, "exec", "--no", "--", "npm-groovy-lint", "--noserver", "--path", str(SCRIPTS), "--files", "**/*.groovy",
            "--config", str(SCRIPTS / ".groovylintrc.json"), "--output", "json", "--failon", "warning"]


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


def test_sections_use_only_what_their_environment_has():
    """CORE runs without QuPath, GSON/JTS only need their jar, and nothing outside QuPath's bundle is used."""
    for script in sorted(SCRIPTS.glob("*.groovy")):
        text = script.read_text(encoding="utf-8")
        assert "@Grab" not in text and "JsonSlurper" not in text and "io.grpc" not in text, script.name
        assert not re.search(r"\.resolveHierarchy\s*\(", text), f"{script.name} calls resolveHierarchy()"
    parts = sections()
    assert list(parts) == ["CORE", "GSON", "JTS", "GUI", "QUPATH"]
    assert "qupath.lib.gui" not in parts["QUPATH"]  # GUI classes only where the GUI section guards them
    for name, body in parts.items():
        for imp in re.findall(r"^import\s+([\w.]+)", body, re.M):
            assert imp.startswith(ALLOWED_IMPORTS[name]), f"{name} imports {imp}"
    # Outside the sections there is only the SETTINGS map (and comments): the tests see all other code.
    rest = SECTION.sub("", MAIN_SCRIPT.read_text(encoding="utf-8"))
    code = [ln.strip() for ln in rest.splitlines() if ln.strip() and not ln.strip().startswith(("//", "/*", "*"))]
    assert code[0] == "Map SETTINGS = [" and code[-1] == "]", code
    assert all(re.match(r"^\w+\s*:", ln) for ln in code[1:-1]), code


# ---- QuPath-independent core under Groovy -------------------------------------
@pytest.fixture(scope="module")
def unit_results(tooling, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groovy_unit")
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
             "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [20, 10], [20, 20], [10, 20], [10, 10]],
                                                             [[12, 12], [14, 12], [14, 14], [12, 12]]]},
             "properties": {"objectType": "detection", "classification": {"name": "Nucleus", "color": [200, 0, 0]},
                            "measurements": {"Area µm^2": 6.0, "Detection probability": 0.9}}},
            {"type": "Feature",
             "geometry": {"type": "MultiPolygon", "coordinates": [[[[30, 30], [40, 30], [40, 40], [30, 30]]],
                                                                  [[[50, 50], [60, 50], [60, 60], [50, 50]]]]},
             "properties": {"objectType": "detection", "measurements": [{"name": "Old style", "value": 1.5}]}},
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}},
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 1], [2, 2], [1, 1]]]},
             "properties": {}},
        ],
        "summary": {"nuclei": 2, "timingsMs": {"total": 3.5}},
    }
    (tmp / "answer.json").write_text(json.dumps(fc, ensure_ascii=False), encoding="utf-8")
    config = {
        "mode": "unit",
        "geojson": str(tmp / "answer.json"),
        "image": str(synthetic_png(tmp / "he.png", 96, seed=3)),
        "configs": [
            {"settings": {}, "env": {"DANNUCNET_TOKEN": " from-env "}},
            {"settings": {"token": "from-settings", "parents": "class: Tumor stroma", "threshold": 0.4,
                          "serverUrl": "https://gpu-box:9000/", "parallelRequests": "3", "replaceNuclei": False},
             "env": {"DANNUCNET_TOKEN": "from-env"}},
            {"settings": {"tokenEnv": "MY_TOKEN", "parents": "Selected"}, "env": {"MY_TOKEN": "mine", "DANNUCNET_TOKEN": "x"}},
            {"settings": {"threshhold": 0.5}, "env": {}},
            {"settings": {"threshold": 1.5}, "env": {}},
            {"settings": {"serverUrl": "127.0.0.1:8765"}, "env": {}},
            {"settings": {"parents": "everything"}, "env": {}},
            {"settings": {"parents": "class:"}, "env": {}},
            {"settings": {"pixelSizeMicrons": 352.8}, "env": {}},
            {"settings": {"chunkSizePx": 256, "marginPx": 128}, "env": {}},
            {"settings": {"replaceNuclei": "yes"}, "env": {}},
            {"settings": {"parallelRequests": "many"}, "env": {}},
        ],
        "downsamples": [[0.25, 0.25], [0.2505, 0.25], [0.1245, 0.25], [0.1, 0.25], [0.5, 0.25], [0.2, 0.25], [0.0625, 0.25]],
        "plausible": [0.25, 0.05, 10.0, 352.8, 0.01, None],
        "plans": [
            {"bounds": [10.5, 20.2, 5000, 3000], "downsample": 2.0, "chunkPx": 1024, "marginPx": 64,
             "imageWidth": 4000, "imageHeight": 4000},
            {"bounds": [0, 0, 300, 200], "downsample": 1.0, "chunkPx": 2048, "marginPx": 128,
             "imageWidth": 300, "imageHeight": 200},
            {"bounds": [1000.7, 999.2, 777.1, 333.3], "downsample": 1.25, "chunkPx": 256, "marginPx": 32,
             "imageWidth": 100000, "imageHeight": 80000},
            {"bounds": [5000, 5000, 10, 10], "downsample": 1.0, "chunkPx": 256, "marginPx": 32,
             "imageWidth": 400, "imageHeight": 400},
        ],
        "badAnswers": ['{"error": {"code": 500}}', "[1, 2]", '{"type": "Feature"}'],
        "clipWkt": "POLYGON ((0 0, 100 0, 100 100, 0 100, 0 0))",
        "clipRegions": [[10, 10, 20, 20], [200, 200, 10, 10], [90, 90, 50, 50]],
    }
    return run_driver(tooling, tmp, config, with_settings=True), config


def test_settings_are_parsed_strictly(unit_results):
    out, _ = unit_results
    ok = [c.get("ok") for c in out["configs"]]
    errors = [c.get("error") for c in out["configs"]]
    assert ok[0] == {
        "serverUrl": "http://127.0.0.1:8765", "token": "from-env", "parents": "auto", "parentClass": None,
        "replaceNuclei": True, "threshold": None, "minAreaMicrons2": None, "parallelRequests": 2,
        "pixelSizeMicrons": None, "chunkSizePx": 2048, "marginPx": 128, "timeoutSeconds": 300, "nucleusClass": "Nucleus",
    }
    assert ok[1]["token"] == "from-settings" and ok[1]["serverUrl"] == "https://gpu-box:9000"
    assert (ok[1]["parents"], ok[1]["parentClass"]) == ("class", "Tumor stroma")
    assert ok[1]["threshold"] == 0.4 and ok[1]["parallelRequests"] == 3 and ok[1]["replaceNuclei"] is False
    assert ok[2]["token"] == "mine" and ok[2]["parents"] == "selected"
    assert "threshhold" in errors[3] and "threshold" in errors[3]  # typo named, known keys listed
    assert "threshold" in errors[4] and "out of range" in errors[4]
    assert "http://" in errors[5]
    assert "'everything'" in errors[6] and "class:<name>" in errors[6]
    assert "names no class" in errors[7]
    assert "pixelSizeMicrons" in errors[8]
    assert "marginPx" in errors[9] and "half of chunkSizePx" in errors[9]
    assert "true or false" in errors[10]
    assert "parallelRequests must be a number" in errors[11]


def test_shipped_settings_block_is_valid(unit_results):
    out, _ = unit_results
    assert out["shipped"]["ok"]["serverUrl"] == "http://127.0.0.1:8765"
    assert out["shipped"]["ok"]["parents"] == "auto"


def test_downsample_rounds_within_one_percent_and_never_upsamples(unit_results):
    out, _ = unit_results
    assert out["downsamples"] == pytest.approx([1.0, 1.0, 2.0, 2.5, 1.0, 1.25, 4.0])
    assert out["plausible"] == [True, True, True, False, False, False]


def test_chunk_plans_partition_the_parent_and_keep_a_margin(unit_results):
    out, config = unit_results
    for plan, spec in zip(out["plans"], config["plans"]):
        x, y, w, h = spec["bounds"]
        iw, ih = spec["imageWidth"], spec["imageHeight"]
        if x >= iw or y >= ih:
            assert plan is None  # a parent outside the image has nothing to read
            continue
        bounds = box(max(0, int(np.floor(x))), max(0, int(np.floor(y))), min(iw, int(np.ceil(x + w))), min(ih, int(np.ceil(y + h))))
        margin = int(np.ceil(spec["marginPx"] * spec["downsample"]))
        cores = [rect(c["core"]) for c in plan]
        regions = [rect(c["region"]) for c in plan]
        image = box(0, 0, iw, ih)
        # Cores tile the box exactly (half-open: they only touch), and reach one margin beyond it, within the image.
        assert sum(c.area for c in cores) == pytest.approx(unary_union(cores).area)
        assert unary_union(cores).equals(bounds.buffer(margin, join_style=2).intersection(image))
        for core, region in zip(cores, regions):
            assert region.contains(core) and image.contains(region)
            # A nucleus owned by a core (centroid inside, radius < margin) lies wholly inside the region read.
            need = core.intersection(bounds).buffer(margin, join_style=2).intersection(image)
            assert region.equals(need)
        step = int(round(spec["chunkPx"] * spec["downsample"]))
        assert all(c["core"]["width"] <= step + margin and c["core"]["height"] <= step + margin for c in plan)
        assert [c["index"] for c in plan] == list(range(len(plan)))
    assert len(out["plans"][1]) == 1  # a small parent is one request
    assert len(out["plans"][0]) == 4


def test_answers_become_plain_nuclei(unit_results):
    out, _ = unit_results
    parsed = out["parsed"]
    assert parsed["skipped"] == 2  # a Point and a degenerate polygon
    assert parsed["summary"]["nuclei"] == 2
    first, second = parsed["nuclei"]
    assert first["id"] == "1b4e28ba-2fa1-11d2-883f-0016d3cca427" and first["className"] == "Nucleus"
    assert first["measurements"] == {"Area µm^2": 6.0, "Detection probability": 0.9}
    assert shape(first).area == pytest.approx(100 - 2)  # shell minus the triangular hole
    assert first["centroid"] == pytest.approx([15, 15])
    assert len(second["polygons"]) == 2 and second["measurements"] == {"Old style": 1.5}
    assert all("FeatureCollection" in e for e in out["parseErrors"])


def test_request_follows_the_gateway_contract(unit_results):
    out, config = unit_results
    req = out["request"]
    assert set(req) == {"image", "originX", "originY", "downsample", "pixelSizeMicrons", "core", "clipWkb", "options"}
    assert (req["originX"], req["originY"], req["downsample"], req["pixelSizeMicrons"]) == (10, 20, 2.0, 0.25)
    assert req["core"] == {"x": 15, "y": 25, "width": 20, "height": 30}
    assert req["options"] == {"threshold": 0.4}  # minAreaMicrons2 left to the server
    from shapely import wkb

    assert wkb.loads(base64.b64decode(req["clipWkb"])).equals(Polygon([(0, 0), (5, 0), (5, 5)]))
    png = base64.b64decode(req["image"]["encoded"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    sent = cv2.imdecode(np.frombuffer(Path(out["png"]).read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    source = cv2.imread(config["image"], cv2.IMREAD_UNCHANGED)
    assert sent.shape == source.shape == (96, 96, 3)
    assert np.array_equal(sent, source)  # lossless, no alpha, no channel swap


def test_jts_section_builds_valid_geometries_and_clips(unit_results):
    out, _ = unit_results
    if not out["jts"]:
        pytest.skip("JTS jar not found (Debian: apt-get install libjts-java); the JTS section was not run")
    assert [g["type"] for g in out["geometries"]] == ["Polygon", "MultiPolygon"]
    assert all(g["valid"] for g in out["geometries"])
    assert out["geometries"][0]["area"] == pytest.approx(98.0)
    inside, outside, partial = out["clips"]
    assert (inside, outside) == ("inside", "outside")
    from shapely import wkt

    assert wkt.loads(partial).equals(box(89, 89, 100, 100))
    from shapely import wkb

    assert wkb.loads(bytes.fromhex(out["wkbHex"])).equals(box(0, 0, 100, 100))
    assert out["codec"] == "DnnGson"


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
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "dannucnet", "serve", "--port", "0", "--http-port", str(port), "--model", "untrained",
           "--device", "cpu", "--token", TOKEN, "--grace", "1"]
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tooling, background_server):
    proc, url, log = background_server
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"dannucnet serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"dannucnet serve did not answer within 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def served(tooling, server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groovy_server")
    config = {
        "mode": "server",
        "serverUrl": server,
        "token": TOKEN,
        "deadUrl": f"http://127.0.0.1:{free_port()}",
        "image": str(synthetic_png(tmp / "he.png", 256, seed=11)),
        "mpp": 0.25,
        "chunkPx": 128,
        "marginPx": 64,  # the largest allowed (half a chunk): the untrained network draws big blobs
        "parallel": 2,
        "threshold": THRESHOLD,
        "clipPolygon": [[20, 30], [230, 60], [200, 240], [40, 200]],
    }
    return run_driver(tooling, tmp, config), config


def test_handshake_reads_the_model(served):
    out, _ = served
    model = out["model"]
    assert model["apiVersion"] == "v1" and model["pixelSizeMicrons"] == pytest.approx(0.25)
    assert model["trained"] is False and out["downsample"] == 1.0


def test_failures_say_what_to_do(served):
    out, config = served
    errors = out["errors"]
    assert "refused the access token" in errors["wrongToken"] and "HTTP 401" in errors["wrongToken"]
    assert "refused the access token" in errors["noToken"] and "DANNUCNET_TOKEN" in errors["noToken"]
    assert "Cannot reach the DAN-NucNet server" in errors["unreachable"]
    assert "start it with: dannucnet serve --http-port " + config["deadUrl"].rsplit(":", 1)[1] in errors["unreachable"]
    assert "HTTP 404" in errors["notFound"] and "HTTP port" in errors["notFound"]


def test_one_request_maps_nuclei_to_level0(served):
    out, _ = served
    nuclei = out["single"]["nuclei"]
    assert out["single"]["summary"]["nuclei"] == len(nuclei) > 0
    image = box(0, 0, 256, 256)
    for n in nuclei:
        s = shape(n)
        assert s.is_valid and s.area > 0 and image.buffer(1e-6).contains(s)
        assert n["className"] == "Nucleus" and "Nucleus: Area" in n["measurements"]  # QuPath Cell detection names (issue 17)


def test_chunked_run_owns_each_nucleus_once(served):
    out, config = served
    run = out["chunked"]
    assert len(run["chunks"]) == 4  # 256² at 128 px chunks
    assert run["maxRunning"] == config["parallel"]  # the pool is used, and bounded
    assert run["progress"][-1].startswith("4/4 chunks")
    # the GUI window hears every chunk, in order, with the same text as the log
    assert [h[:2] for h in run["heard"]] == [[i, 4] for i in range(1, 5)]
    assert run["heard"][-1][2] == run["progress"][-1] and "left" in run["heard"][0][2]
    assert sorted(run["done"]) == [0, 1, 2, 3]  # every chunk sent, and answered, exactly once
    chunks = {c["index"]: c for c in run["chunks"]}
    seen = []
    for n in run["nuclei"]:
        chunk = chunks[n["chunk"]]
        s = shape(n)
        # The server's coordinates come back in level-0 pixels: inside what was read, owned by the core.
        assert rect(chunk["region"]).buffer(1e-6).contains(s)
        cx, cy = n["centroid"]
        core = chunk["core"]
        assert core["x"] <= cx < core["x"] + core["width"] and core["y"] <= cy < core["y"] + core["height"]
        seen.append(s)
    assert len(seen) > 0
    # Ownership promises one copy of every object smaller than the margin (the margin must exceed the
    # largest nucleus). The untrained network also draws blobs larger than this test's 64 px margin,
    # which two chunks may each see cut differently; those are outside the promise.
    small = [s for s in seen if max(s.bounds[2] - s.bounds[0], s.bounds[3] - s.bounds[1]) <= config["marginPx"]]
    assert len(small) >= 5
    for i, a in enumerate(small):  # no nucleus came back twice
        for b in small[i + 1:]:
            assert a.intersection(b).area < 0.5 * min(a.area, b.area)


def test_clip_keeps_the_nuclei_centred_in_the_annotation(served):
    """The server keeps whole nuclei whose centroid lies inside the clip (it does not cut them)."""
    out, config = served
    clip = Polygon(config["clipPolygon"])
    clipped = out["clipped"]["nuclei"]
    assert clipped, "the clip polygon covers most of the image: some shapes must remain"
    for n in clipped:
        assert clip.contains(shape(n).centroid)
    key = lambda n: json.dumps(n["polygons"])  # noqa: E731
    expected = {key(n) for n in out["single"]["nuclei"] if clip.contains(shape(n).centroid)}
    assert {key(n) for n in clipped} == expected


def test_interrupt_stops_promptly_and_drops_late_answers(served):
    out, _ = served
    cancel = out["cancel"]
    assert cancel["message"] and "Stopped on request" in cancel["message"]
    assert cancel["resultsAfterInterrupt"] == 0
    assert cancel["afterInterruptMs"] < 2000  # not waiting for the chunk still on the server
    assert cancel["interruptFlagKept"] is True  # QuPath's batch loop sees the interrupt too


# ---- the GUI section on real JavaFX ----------------------------------------------
FX_JARS = [Path(f"/usr/share/java/javafx-{m}.jar") for m in ("base", "controls", "graphics")]
FX_NATIVE = Path("/usr/lib/x86_64-linux-gnu/jni")
QUPATH_GUI_STAND_IN = """package qupath.lib.gui;
import javafx.stage.Stage;
/** Stand-in for QuPath's GUI class: only the two members the script calls. */
public class QuPathGUI {
    public static QuPathGUI instance;
    public Stage stage;
    public static QuPathGUI getInstance() { return instance; }
    public Stage getStage() { return stage; }
}
"""


def test_progress_window_shows_progress_and_stop_interrupts(tooling, tmp_path):
    """The GUI section's window on Debian's OpenJFX under Xvfb: owned by QuPath's stage, follows the
    progress, Stop interrupts the script thread, it closes; no window when there is no GUI."""
    xvfb, javac = shutil.which("xvfb-run"), shutil.which("javac")
    if not all(j.is_file() for j in FX_JARS) or xvfb is None or javac is None:
        pytest.skip("needs OpenJFX, Xvfb and javac (Debian: libopenjfx-java libopenjfx-jni xvfb xauth, a JDK)")
    fx = os.pathsep.join(str(j) for j in FX_JARS)
    src = tmp_path / "src" / "qupath" / "lib" / "gui" / "QuPathGUI.java"
    src.parent.mkdir(parents=True)
    src.write_text(QUPATH_GUI_STAND_IN, encoding="utf-8")
    classes = tmp_path / "classes"
    subprocess.run([javac, "-cp", fx, "-d", str(classes), str(src)], check=True, capture_output=True, timeout=120)
    parts = sections()
    script = tmp_path / "gui_test.groovy"
    script.write_text(parts["CORE"] + parts["GUI"] + (REPO / "tests" / "groovy" / "gui_driver.groovy").read_text(
        encoding="utf-8"), encoding="utf-8")
    proc = subprocess.run(
        [xvfb, "-a", tooling["java"], f"-Djava.library.path={FX_NATIVE}", "-cp",
         os.pathsep.join([str(GROOVY_LIB / "*"), fx, str(classes)]), "groovy.ui.GroovyMain", str(script)],
        capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["opened"] and res["showing"] and res["ownedByQuPath"]
    assert res["title"] == "DAN-NucNet: synthetic.png"
    assert res["progress"] == pytest.approx(0.75) and res["text"].startswith("3/4 chunks, 25 nuclei")
    assert res["lastLogged"].startswith("1/4 chunks")  # the log is rate-limited, the window is not
    assert res["workerInterrupted"] is True and res["textAfterStop"] == "Stopping…"
    assert res["showingAfterDismiss"] is False
    assert res["windowWithoutGui"] is False


# ---- lint (collected last: it ran in the background meanwhile) ------------------
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


NO_GUI = """// BEGIN GUI
class DnnProgressWindow {
    static DnnProgressWindow openIfGui(String title, Thread worker) { null }
    Closure listener() { null }
    void dismiss() { }
}
// END GUI"""


def test_whole_script_on_qupath_classes(tooling, server, tmp_path):
    found = qupath_java_and_classpath()
    if found is None:
        pytest.skip("needs QuPath's jars: set PAQUO_QUPATH_DIR to a QuPath 0.5/0.6 installation "
                    "(or DANNUCNET_QUPATH_CLASSPATH to qupath-core and its dependencies)")
    java, classpath = found
    text = MAIN_SCRIPT.read_text(encoding="utf-8")
    for old, new in [
        ("serverUrl       : 'http://127.0.0.1:8765'", f"serverUrl       : '{server}'"),
        ("token           : ''", f"token           : '{TOKEN}'"),
        ("threshold       : null", f"threshold       : {THRESHOLD}"),
        ("chunkSizePx     : 2048", "chunkSizePx     : 128"),
        ("marginPx        : 128", "marginPx        : 32"),
    ]:
        assert old in text
        text = text.replace(old, new)
    if not os.environ.get("PAQUO_QUPATH_DIR") and os.environ.get("DANNUCNET_QUPATH_CLASSPATH"):
        # qupath-core alone has no GUI (no JavaFX, no qupath-gui-fx): run the script as headless QuPath
        # would, where QuPathGUI.getInstance() is null and no window opens.
        text = SECTION.sub(lambda m: NO_GUI if m.group(1) == "GUI" else m.group(0), text)
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

    def nuclei(obj):
        return [c for c in obj["children"] if c["detection"]]

    rois = {"tumor": Polygon([(10, 10), (120, 20), (110, 120), (15, 100)]),
            "box": box(140, 140, 250, 250)}
    assert res["firstError"] is None and res["secondError"] is None
    first, second = annotations(res["first"]), annotations(res["second"])
    assert not nuclei(res["first"])  # nothing lands on the root when annotations exist
    assert not first["drawn nucleus"]["children"]  # nucleus annotations are not parents
    assert first["box"]["locked"] is True and first["tumor"]["locked"] is False  # lock state restored
    assert "keep" in annotations(first["tumor"])  # other children survive
    assert res["oldId"] not in {n["id"] for n in nuclei(first["tumor"])}  # earlier nuclei replaced
    total = 0
    for name, roi in rois.items():
        for n in nuclei(first[name]):
            assert n["cls"] == "Nucleus" and len(n["measurements"]) >= 5
            assert roi.contains(Point(n["centroid"]))  # kept because centred inside
            total += 1
        # Running again replaces this script's nuclei instead of adding to them.
        assert sorted(n["wkt"] for n in nuclei(second[name])) == sorted(n["wkt"] for n in nuclei(first[name]))
    assert total > 0
    # With one annotation selected only it is filled; replaceNuclei false keeps the earlier ones.
    assert res["selectedError"] is None
    selected = annotations(res["selected"])
    assert len(nuclei(selected["box"])) == 2 * len(nuclei(second["box"]))
    assert nuclei(selected["tumor"]) == nuclei(second["tumor"])
    # No annotation: the whole image, nuclei under the root, none twice.
    assert res["wholeError"] is None
    whole = nuclei(res["whole"])
    assert whole and len({n["wkt"] for n in whole}) == len(whole)
    # No pixel size: refused, nothing touched.
    assert "no pixel size" in res["uncalibratedError"]
    assert not res["uncalibrated"]["children"][0]["children"]
    # Kill running script: stops within a second or two, the annotation is as it was.
    assert "Stopped on request" in res["killError"] and res["killAlive"] is False and res["killMs"] < 2000
    victim = annotations(res["killed"])["victim"]
    assert not victim["children"] and victim["locked"] is False
