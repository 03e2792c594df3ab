/*
 * segment_nuclei.groovy — DAN-NucNet nuclei segmentation from inside QuPath (0.5.1 and 0.6.x).
 *
 * Sends the pixels under your annotations to a running `dannucnet serve` (HTTP/JSON gateway, API v1)
 * and adds every nucleus it finds as an editable detection object (class "Nucleus", with measurements)
 * under the annotation it lies in.
 *
 *   1. Start the server:   dannucnet serve            (same machine; see qupath_scripts/README.md for a GPU machine)
 *   2. Open an image, select annotations (or none: then every annotation, or the whole image, is used).
 *   3. Run this script (Automate → Script editor → Run, or "Run for project").
 *
 * Uses only what QuPath bundles (JDK java.net.http, Gson, JTS): no extensions, no extra jars.
 * Edit the settings just below; everything else can stay as it is.
 */

// ============================== SETTINGS (edit here) ==============================
Map SETTINGS = [
    // Where `dannucnet serve` listens (its HTTP port). On a GPU machine: 'http://gpu-host:8765'.
    serverUrl       : 'http://127.0.0.1:8765',
    // Access token the server was started with; '' reads the environment variable named in tokenEnv.
    token           : '',
    tokenEnv        : 'DANNUCNET_TOKEN',
    // Which objects receive nuclei:
    //   'auto'        selected annotations; if none is selected (always so in "Run for project" and
    //                 headless runs) every annotation that is not itself a nucleus; if there is none,
    //                 the whole image
    //   'selected'    only the selected annotations
    //   'annotations' every annotation that is not a nucleus
    //   'image'       the whole image
    //   'class:Tumor' every annotation of class Tumor
    parents         : 'auto',
    // Remove this script's earlier nuclei (detections of class nucleusClass) from a parent before adding new ones.
    replaceNuclei   : true,
    // Probability threshold and smallest nucleus (µm²); null = the model's defaults.
    threshold       : null,
    minAreaMicrons2 : null,
    // Requests sent at the same time (2–4 suits one GPU; more only helps with several servers behind a proxy).
    parallelRequests: 2,
    // Pixel size in µm to use when the image has none (or a wrong one); null = the image's own calibration.
    pixelSizeMicrons: null,
    // Chunk edge and margin in pixels at the model's resolution (the margin must exceed the largest nucleus).
    chunkSizePx     : 2048,
    marginPx        : 128,
    // Seconds to wait for one chunk's answer.
    timeoutSeconds  : 300,
    // Class given to the nuclei.
    nucleusClass    : 'Nucleus',
]

// ==================================================================================
// Nothing below needs editing. The CORE, GSON and JTS sections use no QuPath class, so the
// project's tests run them under plain Groovy against a real server (tests/test_qupath_scripts.py).

// BEGIN CORE
import java.awt.Graphics2D
import java.awt.image.BufferedImage
import java.net.http.HttpClient
import java.net.http.HttpConnectTimeoutException
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.net.http.HttpTimeoutException
import java.nio.charset.StandardCharsets
import java.time.Duration
import java.util.concurrent.CompletionService
import java.util.concurrent.ExecutionException
import java.util.concurrent.ExecutorCompletionService
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import java.util.concurrent.Future
import java.util.concurrent.ThreadFactory
import java.util.concurrent.atomic.AtomicInteger
import javax.imageio.IIOImage
import javax.imageio.ImageIO
import javax.imageio.ImageWriteParam
import javax.imageio.ImageWriter
import javax.imageio.stream.MemoryCacheImageOutputStream

/** A failure the user can fix; the message says how. The script prints it and stops. */
class DnnError extends RuntimeException {

    DnnError(String message) {
        super(message)
    }

}

/** Raised when the run is stopped ("Kill running script"): nothing more is changed. */
class DnnCancelled extends RuntimeException {

    DnnCancelled(String message) {
        super(message)
    }

}

/** JSON text <-> Map/List/Number/String/Boolean/null; Gson inside QuPath, any codec in tests. */
interface DnnJson {

    String write(Object value)

    Object read(String text)

}

/** The validated settings; parsing is strict so that a typo stops the run instead of being ignored. */
class DnnConfig {

    static final List<String> KEYS = ['serverUrl', 'token', 'tokenEnv', 'parents', 'replaceNuclei', 'threshold',
                                      'minAreaMicrons2', 'parallelRequests', 'pixelSizeMicrons', 'chunkSizePx',
                                      'marginPx', 'timeoutSeconds', 'nucleusClass'].asImmutable()
    static final List<String> PARENT_MODES = ['auto', 'selected', 'annotations', 'image', 'class'].asImmutable()

    String serverUrl
    String token
    String parents
    String parentClass
    boolean replaceNuclei
    Double threshold
    Double minAreaMicrons2
    int parallelRequests
    Double pixelSizeMicrons
    int chunkSizePx
    int marginPx
    int timeoutSeconds
    String nucleusClass

    /** Reads the SETTINGS map; env supplies the token when the settings leave it empty. */
    static DnnConfig parse(Map settings, Map<String, String> env) {
        List<String> unknown = settings.keySet().collect { Object k -> String.valueOf(k) }.findAll { String k -> !(k in KEYS) }
        if (unknown) {
            throw new DnnError("Unknown setting(s) ${unknown.join(', ')} in SETTINGS; known settings: ${KEYS.join(', ')}.")
        }
        DnnConfig c = new DnnConfig()
        String url = text(settings, 'serverUrl', 'http://127.0.0.1:8765')
        if (!(url ==~ /(?i)https?:\/\/[^\s\/]+(\/\S*)?/)) {
            throw new DnnError("Setting serverUrl '${url}' is not an http:// or https:// address, e.g. 'http://127.0.0.1:8765'.")
        }
        c.serverUrl = url.replaceAll(/\/+$/, '')
        String tokenEnv = text(settings, 'tokenEnv', 'DANNUCNET_TOKEN')
        String token = text(settings, 'token', '')
        if (!token && env != null && tokenEnv) {
            token = (env.get(tokenEnv) ?: '').trim()
        }
        c.token = token ?: null
        String parents = text(settings, 'parents', 'auto')
        if (parents.toLowerCase().startsWith('class:')) {
            c.parents = 'class'
            c.parentClass = parents.substring(6).trim()
            if (!c.parentClass) {
                throw new DnnError("Setting parents '${parents}' names no class; write e.g. 'class:Tumor'.")
            }
        } else if (parents.toLowerCase() in PARENT_MODES && parents.toLowerCase() != 'class') {
            c.parents = parents.toLowerCase()
        } else {
            throw new DnnError("Setting parents '${parents}' is not one of 'auto', 'selected', 'annotations', 'image' or 'class:<name>'.")
        }
        Object replace = settings.containsKey('replaceNuclei') ? settings.replaceNuclei : true
        if (!(replace instanceof Boolean)) {
            throw new DnnError("Setting replaceNuclei must be true or false, not '${replace}'.")
        }
        c.replaceNuclei = (Boolean) replace
        c.threshold = number(settings, 'threshold', null, 0.0d, 1.0d, false)
        c.minAreaMicrons2 = number(settings, 'minAreaMicrons2', null, 0.0d, 10000.0d, true)
        c.parallelRequests = number(settings, 'parallelRequests', 2.0d, 1.0d, 64.0d, true).intValue()
        c.pixelSizeMicrons = number(settings, 'pixelSizeMicrons', null, 0.05d, 10.0d, true)
        c.chunkSizePx = number(settings, 'chunkSizePx', 2048.0d, 128.0d, 16384.0d, true).intValue()
        c.marginPx = number(settings, 'marginPx', 128.0d, 0.0d, 4096.0d, true).intValue()
        if (c.marginPx * 2 >= c.chunkSizePx) {
            throw new DnnError("Setting marginPx (${c.marginPx}) must be less than half of chunkSizePx (${c.chunkSizePx}).")
        }
        c.timeoutSeconds = number(settings, 'timeoutSeconds', 300.0d, 1.0d, 86400.0d, true).intValue()
        c.nucleusClass = text(settings, 'nucleusClass', 'Nucleus')
        if (!c.nucleusClass) {
            throw new DnnError("Setting nucleusClass must name a class, e.g. 'Nucleus'.")
        }
        return c
    }

    private static String text(Map settings, String key, String fallback) {
        Object v = settings.containsKey(key) ? settings.get(key) : fallback
        return v == null ? '' : String.valueOf(v).trim()
    }

    /** A number within [min, max] (min excluded unless minInclusive); null allowed only when fallback is null. */
    private static Double number(Map settings, String key, Double fallback, double min, double max, boolean minInclusive) {
        Object v = settings.containsKey(key) ? settings.get(key) : fallback
        if (v == null) {
            if (fallback != null) {
                throw new DnnError("Setting ${key} needs a number.")
            }
            return null
        }
        Double d
        if (v instanceof Number) {
            d = ((Number) v).doubleValue()
        } else {
            try {
                d = Double.valueOf(String.valueOf(v).trim())
            } catch (NumberFormatException ignored) {
                throw new DnnError("Setting ${key} must be a number, not '${v}'.")
            }
        }
        boolean low = minInclusive ? d < min : d <= min
        if (low || d > max || d.isNaN()) {
            String range = minInclusive ? "${min} to ${max}" : "above ${min} and at most ${max}"
            throw new DnnError("Setting ${key} = ${v} is out of range (${range}).")
        }
        return d
    }

}

/** An integer rectangle in full-resolution (level-0) pixels; half-open like QuPath's regions. */
class DnnRect {

    final int x
    final int y
    final int width
    final int height

    DnnRect(int x, int y, int width, int height) {
        this.x = x
        this.y = y
        this.width = width
        this.height = height
    }

    /** The pixels touched by a floating-point box, limited to the image; null when nothing is left. */
    static DnnRect covering(double x, double y, double w, double h, int imageWidth, int imageHeight) {
        int x0 = Math.max(0, (int) Math.floor(x))
        int y0 = Math.max(0, (int) Math.floor(y))
        int x1 = Math.min(imageWidth, (int) Math.ceil(x + w))
        int y1 = Math.min(imageHeight, (int) Math.ceil(y + h))
        return (x1 > x0 && y1 > y0) ? new DnnRect(x0, y0, x1 - x0, y1 - y0) : null
    }

    Map<String, Object> toJson() {
        return [x: x, y: y, width: width, height: height] as LinkedHashMap<String, Object>
    }

    @Override
    String toString() {
        return "${width}x${height}+${x}+${y}"
    }

    @Override
    boolean equals(Object o) {
        return o instanceof DnnRect && o.x == x && o.y == y && o.width == width && o.height == height
    }

    @Override
    int hashCode() {
        return Objects.hash(x, y, width, height)
    }

}

/** One request: the pixels read (region) and the nuclei it owns (core: those whose centroid lies inside). */
class DnnChunk {

    final int index
    final DnnRect region
    final DnnRect core

    DnnChunk(int index, DnnRect region, DnnRect core) {
        this.index = index
        this.region = region
        this.core = core
    }

}

/** Resolution and tiling: pure arithmetic, shared by every parent. */
class DnnPlanner {

    /** Pixel sizes outside this range are resolution tags (72/96/300 dpi), not calibrations. */
    static final double MIN_MPP = 0.05d
    static final double MAX_MPP = 10.0d

    static boolean plausibleMpp(Double mpp) {
        return mpp != null && !mpp.isNaN() && mpp >= MIN_MPP && mpp <= MAX_MPP
    }

    /**
     * Downsample that brings the image to the model's pixel size. Never below 1: a coarser image is
     * sent at full resolution and the server upsamples it once. Within 1 % of an integer it is
     * rounded, so that QuPath reads pyramid levels without interpolation.
     */
    static double downsample(double imageMpp, double modelMpp) {
        if (!(imageMpp > 0) || !(modelMpp > 0)) {
            throw new DnnError("Pixel sizes must be positive (image ${imageMpp} µm, model ${modelMpp} µm).")
        }
        double d = modelMpp / imageMpp
        if (d <= 1.0d) {
            return 1.0d
        }
        double r = Math.rint(d)
        return Math.abs(d - r) <= 0.01d * r ? r : d
    }

    /**
     * Tiles a parent's bounding box (level-0) into chunks. Cores are half-open and partition the box;
     * the outermost cores reach one margin beyond it so that a nucleus straddling the box edge is still
     * owned. Regions are cores plus the margin, limited to the image.
     */
    static List<DnnChunk> plan(DnnRect bounds, double downsample, int chunkPx, int marginPx, int imageWidth, int imageHeight) {
        int step = Math.max(1, (int) Math.round(chunkPx * downsample))
        int margin = (int) Math.ceil(marginPx * downsample)
        List<int[]> xs = spans(bounds.x, bounds.width, step, margin, imageWidth)
        List<int[]> ys = spans(bounds.y, bounds.height, step, margin, imageHeight)
        List<DnnChunk> chunks = []
        for (int[] sy : ys) {
            for (int[] sx : xs) {
                DnnRect core = new DnnRect(sx[0], sy[0], sx[1] - sx[0], sy[1] - sy[0])
                DnnRect region = new DnnRect(sx[2], sy[2], sx[3] - sx[2], sy[3] - sy[2])
                chunks << new DnnChunk(chunks.size(), region, core)
            }
        }
        return chunks
    }

    /** [coreStart, coreEnd, regionStart, regionEnd] along one axis. */
    private static List<int[]> spans(int start, int length, int step, int margin, int limit) {
        int n = Math.max(1, (int) Math.ceil(length / (double) step))
        List<int[]> out = []
        for (int i = 0; i < n; i++) {
            int c0 = start + i * step
            int c1 = Math.min(start + length, c0 + step)
            int r0 = Math.max(0, c0 - margin)
            int r1 = Math.min(limit, c1 + margin)
            int k0 = i == 0 ? r0 : c0
            int k1 = i == n - 1 ? r1 : c1
            out << ([k0, k1, r0, r1] as int[])
        }
        return out
    }

}

/** A nucleus as plain data: polygons → rings → flat [x0, y0, x1, y1, ...] in level-0 pixels. */
class DnnNucleus {

    String id
    String className
    List<List<double[]>> polygons = []
    Map<String, Double> measurements = [:]

}

/** What one /v1/segment answer holds. */
class DnnAnswer {

    List<DnnNucleus> nuclei = []
    int skipped
    Map summary = [:]

}

/** The wire format of the HTTP/JSON gateway (docs/DESIGN.md): request building and answer parsing. */
class DnnProtocol {

    static final String API_VERSION = 'v1'

    /** SegmentRegionRequest in proto3 JSON; clipWkb and the options are left out when not set. */
    static Map<String, Object> segmentRequest(byte[] encodedImage, DnnChunk chunk, double downsample, double pixelSizeMicrons,
                                              byte[] clipWkb, Double threshold, Double minAreaMicrons2) {
        Map<String, Object> body = new LinkedHashMap<>()
        body.put('image', [encoded: Base64.encoder.encodeToString(encodedImage)] as LinkedHashMap)
        body.put('originX', chunk.region.x)
        body.put('originY', chunk.region.y)
        body.put('downsample', downsample)
        body.put('pixelSizeMicrons', pixelSizeMicrons)
        body.put('core', chunk.core.toJson())
        if (clipWkb != null) {
            body.put('clipWkb', Base64.encoder.encodeToString(clipWkb))
        }
        Map<String, Object> options = new LinkedHashMap<>()
        if (threshold != null) {
            options.put('threshold', threshold)
        }
        if (minAreaMicrons2 != null) {
            options.put('minAreaMicrons2', minAreaMicrons2)
        }
        if (options) {
            body.put('options', options)
        }
        return body
    }

    /** QuPath GeoJSON FeatureCollection → nuclei; features without a (Multi)Polygon are counted as skipped. */
    static DnnAnswer parseAnswer(Object json) {
        if (!(json instanceof Map) || ((Map) json).get('type') != 'FeatureCollection') {
            throw new DnnError('The server answered with something other than a GeoJSON FeatureCollection; ' +
                               'is serverUrl pointing at `dannucnet serve`?')
        }
        Map fc = (Map) json
        DnnAnswer answer = new DnnAnswer()
        Object summary = fc.get('summary')
        if (summary instanceof Map) {
            answer.summary = (Map) summary
        }
        for (Object f : (fc.get('features') ?: []) as List) {
            DnnNucleus n = parseFeature(f)
            if (n == null) {
                answer.skipped++
            } else {
                answer.nuclei << n
            }
        }
        return answer
    }

    static DnnNucleus parseFeature(Object feature) {
        if (!(feature instanceof Map)) {
            return null
        }
        Map f = (Map) feature
        Map geometry = f.get('geometry') instanceof Map ? (Map) f.get('geometry') : null
        if (geometry == null) {
            return null
        }
        List<List<double[]>> polygons = []
        String type = geometry.get('type')
        List coordinates = geometry.get('coordinates') instanceof List ? (List) geometry.get('coordinates') : null
        if (coordinates == null) {
            return null
        }
        if (type == 'Polygon') {
            polygons << rings(coordinates)
        } else if (type == 'MultiPolygon') {
            for (Object p : coordinates) {
                polygons << rings((List) p)
            }
        } else {
            return null
        }
        polygons.removeAll { List<double[]> p -> p.isEmpty() }
        if (polygons.isEmpty()) {
            return null
        }
        DnnNucleus n = new DnnNucleus()
        n.polygons = polygons
        n.id = f.get('id') == null ? null : String.valueOf(f.get('id'))
        Map props = f.get('properties') instanceof Map ? (Map) f.get('properties') : [:]
        Object cls = props.get('classification')
        if (cls instanceof Map && ((Map) cls).get('name') != null) {
            n.className = String.valueOf(((Map) cls).get('name'))
        }
        n.measurements = measurements(props.get('measurements'))
        return n
    }

    /** Measurements as a dict (current QuPath) or as a list of {name, value} (QuPath before 0.4). */
    static Map<String, Double> measurements(Object m) {
        Map<String, Double> out = new LinkedHashMap<>()
        if (m instanceof Map) {
            ((Map) m).each { k, v ->
                if (v instanceof Number) {
                    out.put(String.valueOf(k), ((Number) v).doubleValue())
                }
            }
        } else if (m instanceof List) {
            for (Object e : (List) m) {
                if (e instanceof Map && ((Map) e).get('value') instanceof Number) {
                    out.put(String.valueOf(((Map) e).get('name')), ((Number) ((Map) e).get('value')).doubleValue())
                }
            }
        }
        return out
    }

    /** GeoJSON rings → closed flat coordinate arrays; rings with fewer than 4 positions are dropped. */
    private static List<double[]> rings(List polygon) {
        List<double[]> out = []
        for (Object r : polygon) {
            List ring = (List) r
            if (ring.size() < 4) {
                // A shell too short to enclose anything drops the polygon; a short hole is just dropped.
                if (out.isEmpty()) {
                    return []
                }
                continue
            }
            double[] xy = new double[ring.size() * 2]
            int i = 0
            for (Object p : ring) {
                List pt = (List) p
                xy[i++] = ((Number) pt.get(0)).doubleValue()
                xy[i++] = ((Number) pt.get(1)).doubleValue()
            }
            out << xy
        }
        return out
    }

    /** Centroid of a polygon's shell (shoelace); used for ownership checks and summaries. */
    static double[] centroid(double[] ring) {
        double a = 0
        double cx = 0
        double cy = 0
        int n = ring.length / 2
        for (int i = 0; i < n - 1; i++) {
            double x0 = ring[2 * i]
            double y0 = ring[2 * i + 1]
            double x1 = ring[2 * i + 2]
            double y1 = ring[2 * i + 3]
            double cross = x0 * y1 - x1 * y0
            a += cross
            cx += (x0 + x1) * cross
            cy += (y0 + y1) * cross
        }
        if (Math.abs(a) < 1e-12) {
            return [ring[0], ring[1]] as double[]
        }
        return [cx / (3 * a), cy / (3 * a)] as double[]
    }

}

/** Talks to `dannucnet serve` over HTTP/JSON; turns every failure into a message that says what to do. */
class DnnClient {

    final String baseUrl
    final String token
    final DnnJson json
    final Duration timeout
    final HttpClient http
    int retries = 3
    long retryDelayMs = 1000

    DnnClient(String baseUrl, String token, DnnJson json, int timeoutSeconds) {
        this.baseUrl = baseUrl.replaceAll(/\/+$/, '')
        this.token = token
        this.json = json
        this.timeout = Duration.ofSeconds(timeoutSeconds)
        this.http = HttpClient.newBuilder()
                .connectTimeout(Duration.ofSeconds(Math.min(10, timeoutSeconds)))
                .version(HttpClient.Version.HTTP_1_1)
                .build()
    }

    /** GET /v1/model with the version handshake; the model's pixel size is what the run is planned on. */
    Map modelInfo() {
        Object info = exchange(request('/v1/model').GET().build(), '/v1/model')
        if (!(info instanceof Map)) {
            throw new DnnError("${baseUrl}/v1/model did not answer with model information; is serverUrl pointing at `dannucnet serve`?")
        }
        Map m = (Map) info
        String api = m.get('apiVersion') == null ? null : String.valueOf(m.get('apiVersion'))
        if (api != DnnProtocol.API_VERSION) {
            String version = m.get('serverVersion') ?: '?'
            throw new DnnError("The server at ${baseUrl} speaks API version ${api ?: '(none)'} (dannucnet ${version}), " +
                    "but this script speaks ${DnnProtocol.API_VERSION}. Use the segment_nuclei.groovy from the same dannucnet " +
                    'release as the server (qupath_scripts/ in its source), or install a server that speaks v1.')
        }
        Object mpp = m.get('pixelSizeMicrons')
        if (!(mpp instanceof Number) || !DnnPlanner.plausibleMpp(((Number) mpp).doubleValue())) {
            throw new DnnError("The server's model reports no usable pixel size (${mpp}); check the model card on the server.")
        }
        return m
    }

    /** POST /v1/segment: one chunk in, the nuclei it owns out. */
    DnnAnswer segment(Map<String, Object> body) {
        HttpRequest req = request('/v1/segment')
                .header('Content-Type', 'application/json')
                .POST(HttpRequest.BodyPublishers.ofString(json.write(body), StandardCharsets.UTF_8))
                .build()
        return DnnProtocol.parseAnswer(exchange(req, '/v1/segment'))
    }

    private HttpRequest.Builder request(String path) {
        HttpRequest.Builder b = HttpRequest.newBuilder(URI.create(baseUrl + path))
                .timeout(timeout)
                .header('Accept', 'application/json')
        if (token) {
            b.header('Authorization', 'Bearer ' + token)
        }
        return b
    }

    /** Sends with retries on 429/503 (server busy); InterruptedException passes through untouched. */
    private Object exchange(HttpRequest req, String what) throws InterruptedException {
        int attempt = 0
        while (true) {
            HttpResponse<String> resp
            try {
                resp = http.send(req, HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8))
            } catch (HttpConnectTimeoutException e) {
                throw unreachable(e)
            } catch (HttpTimeoutException e) {
                throw new DnnError("The server at ${baseUrl} did not answer ${what} within ${timeout.seconds} s. " +
                        'Raise timeoutSeconds or lower chunkSizePx / parallelRequests in the settings, or check the server log.')
            } catch (ConnectException e) {
                throw unreachable(e)
            } catch (IOException e) {
                if (e.cause instanceof ConnectException || e instanceof java.nio.channels.ClosedChannelException) {
                    throw unreachable(e)
                }
                throw new DnnError("Lost the connection to the server at ${baseUrl} during ${what} " +
                        "(${e.class.simpleName}: ${e.message}). " +
                        'Check that `dannucnet serve` is still running (its terminal shows why it stopped).')
            }
            int status = resp.statusCode()
            if (status == 200) {
                try {
                    return json.read(resp.body())
                } catch (Exception e) {
                    throw new DnnError("The server at ${baseUrl} sent an answer to ${what} that is not JSON (${e.message}); " +
                            'is serverUrl pointing at `dannucnet serve`?')
                }
            }
            if ((status == 429 || status == 503) && attempt < retries) {
                attempt++
                Thread.sleep(retryDelayMs * attempt)
                continue
            }
            throw httpError(status, resp.body(), what)
        }
    }

    private DnnError unreachable(Exception e) {
        URI u = URI.create(baseUrl)
        String host = u.host ?: '127.0.0.1'
        int port = u.port > 0 ? u.port : 8765
        String portOption = port == 8765 ? '' : " --http-port ${port}"
        String how = host in ['127.0.0.1', 'localhost', '::1'] ?
                "start it with: dannucnet serve${portOption}" :
                "start it on ${host} with: dannucnet serve --host 0.0.0.0${portOption} --token-file <file with the token>"
        String reason = e.class.simpleName + (e.message ? ': ' + e.message : '')
        return new DnnError("Cannot reach the DAN-NucNet server at ${baseUrl} (${reason}); " +
                "${how} — or set serverUrl in the settings at the top of this script.")
    }

    private DnnError httpError(int status, String body, String what) {
        String message = null
        try {
            Object err = json.read(body)
            if (err instanceof Map && ((Map) err).get('error') instanceof Map) {
                message = ((Map) ((Map) err).get('error')).get('message')
            }
        } catch (Exception ignored) {
            message = null
        }
        message = message ?: (body ?: '').take(200).trim()
        if (status == 401 || status == 403) {
            return new DnnError("The server at ${baseUrl} refused the access token (HTTP ${status}: ${message}). " +
                    'Set token in the settings (or the environment variable DANNUCNET_TOKEN, or the one named in tokenEnv) ' +
                    'to the token the server was started with (its --token or --token-file).')
        }
        if (status == 404) {
            return new DnnError("The server at ${baseUrl} has no ${what} (HTTP 404); " +
                    'serverUrl must be the HTTP port of `dannucnet serve` ' +
                    '(default 8765), not its gRPC port or another service.')
        }
        if (status == 413) {
            return new DnnError("The server refused a chunk as too large (HTTP 413: ${message}); lower chunkSizePx in the settings.")
        }
        if (status == 400) {
            return new DnnError("The server rejected a request (HTTP 400: ${message}). This is a bug if the settings are valid: " +
                    'please report it with the message.')
        }
        return new DnnError("The server failed on ${what} (HTTP ${status}: ${message}); see the server's log.")
    }

}

/** Image encoding without QuPath: QuPath hands over a BufferedImage, the tests one read from a file. */
class DnnImages {

    /** PNG of the RGB pixels (alpha dropped), light deflate: encoding speed matters more than bytes on a LAN. */
    static byte[] png(BufferedImage image) {
        BufferedImage rgb = image
        if (image.type != BufferedImage.TYPE_INT_RGB && image.type != BufferedImage.TYPE_3BYTE_BGR) {
            rgb = new BufferedImage(image.width, image.height, BufferedImage.TYPE_INT_RGB)
            Graphics2D g = rgb.createGraphics()
            try {
                g.drawImage(image, 0, 0, null)
            } finally {
                g.dispose()
            }
        }
        ImageWriter writer = ImageIO.getImageWritersByFormatName('png').next()
        ByteArrayOutputStream bytes = new ByteArrayOutputStream(rgb.width * rgb.height)
        MemoryCacheImageOutputStream out = new MemoryCacheImageOutputStream(bytes)
        try {
            writer.setOutput(out)
            ImageWriteParam param = writer.defaultWriteParam
            if (param.canWriteCompressed()) {
                param.compressionMode = ImageWriteParam.MODE_EXPLICIT
                param.compressionQuality = 0.75f
            }
            writer.write(null, new IIOImage(rgb, null, null), param)
        } finally {
            writer.dispose()
            out.close()
        }
        return bytes.toByteArray()
    }

}

/**
 * Runs jobs on a bounded pool and hands each result to onResult on the calling thread, in completion
 * order. Work starts only when a thread is free, so at most `parallel` chunks of pixels are in memory.
 * An interrupt of the calling thread ("Kill running script") cancels everything and raises DnnCancelled;
 * the first failing job cancels the rest and its DnnError is rethrown.
 */
class DnnRunner {

    private static Future<Object[]> submit(CompletionService<Object[]> done, Closure work, Object job) {
        return done.submit({ [job, work.call(job)] as Object[] } as java.util.concurrent.Callable<Object[]>)
    }

    static int run(List jobs, int parallel, Closure work, Closure onResult) {
        if (jobs.isEmpty()) {
            return 0
        }
        AtomicInteger threadNo = new AtomicInteger()
        ThreadFactory factory = { Runnable r ->
            Thread t = new Thread(r, 'dannucnet-' + threadNo.incrementAndGet())
            t.daemon = true
            return t
        } as ThreadFactory
        ExecutorService pool = Executors.newFixedThreadPool(Math.max(1, Math.min(parallel, jobs.size())), factory)
        CompletionService<Object[]> done = new ExecutorCompletionService<>(pool)
        List<Future<Object[]>> futures = []
        try {
            for (Object job : jobs) {
                // A method call, not a closure over the loop variable: Groovy shares that variable between
                // iterations, so a closure would see whichever job the loop reached last.
                futures << submit(done, work, job)
            }
            for (int i = 0; i < jobs.size(); i++) {
                if (Thread.currentThread().isInterrupted()) {
                    throw new InterruptedException()
                }
                Object[] pair
                try {
                    pair = done.take().get()
                } catch (ExecutionException e) {
                    Throwable cause = e.cause
                    while (cause instanceof ExecutionException && cause.cause != null) {
                        cause = cause.cause
                    }
                    if (cause instanceof InterruptedException) {
                        throw (InterruptedException) cause
                    }
                    if (cause instanceof RuntimeException) {
                        throw (RuntimeException) cause
                    }
                    throw new DnnError("A chunk failed: ${cause}")
                }
                onResult.call(pair[0], pair[1], i + 1, jobs.size())
            }
            return jobs.size()
        } catch (InterruptedException ignored) {
            Thread.currentThread().interrupt()
            throw new DnnCancelled('Stopped on request (Kill running script); ' +
                    'objects whose chunks had not all finished were left as they were.')
        } finally {
            // No waiting here: the interrupt flag may be set, and stray answers are simply dropped.
            futures*.cancel(true)
            pool.shutdownNow()
        }
    }

}

/**
 * Progress: chunks done / total, nuclei so far, elapsed and remaining time. Lines go to the log at most
 * every 5 s; the optional listener (the progress window in the GUI) hears every update.
 */
class DnnProgress {

    final long started = System.nanoTime()
    final Closure log
    final int total
    final Closure listener
    long lastLog = 0

    DnnProgress(int total, Closure log, Closure listener = null) {
        this.total = total
        this.log = log
        this.listener = listener
    }

    static String describe(int done, int total, long nuclei, double elapsed) {
        String eta = done > 0 && done < total ?
                String.format(Locale.ROOT, ', about %.0f s left', elapsed / done * (total - done)) : ''
        return String.format(Locale.ROOT, '%d/%d chunks, %,d nuclei, %.1f s%s', done, total, nuclei, elapsed, eta)
    }

    void update(int done, long nuclei) {
        long now = System.nanoTime()
        double elapsed = (now - started) / 1e9d
        String line = describe(done, total, nuclei, elapsed)
        listener?.call(done, total, line)
        if (done == total || done == 1 || now - lastLog > 5_000_000_000L) {
            lastLog = now
            log.call(line)
        }
    }

}
// END CORE

// BEGIN GSON
import com.google.gson.Gson
import com.google.gson.GsonBuilder

/** Gson (bundled with QuPath) as the JSON codec: numbers come back as Double, objects as Maps. */
class DnnGson implements DnnJson {

    private final Gson gson = new GsonBuilder().disableHtmlEscaping().serializeSpecialFloatingPointValues().create()

    @Override
    String write(Object value) {
        return gson.toJson(value)
    }

    @Override
    Object read(String text) {
        return gson.fromJson(text, Object)
    }

}
// END GSON

// BEGIN JTS
import org.locationtech.jts.geom.Coordinate
import org.locationtech.jts.geom.Envelope
import org.locationtech.jts.geom.Geometry
import org.locationtech.jts.geom.GeometryFactory
import org.locationtech.jts.geom.LinearRing
import org.locationtech.jts.geom.Polygon
import org.locationtech.jts.io.WKBWriter

/** Plain nucleus data ↔ JTS (bundled with QuPath): geometries for ROIs, WKB for the server's clip. */
class DnnGeometry {

    /** Rings → Polygon or MultiPolygon; the rings are closed if the sender left them open. */
    static Geometry toGeometry(GeometryFactory factory, List<List<double[]>> polygons) {
        List<Polygon> parts = polygons.collect { List<double[]> rings ->
            LinearRing shell = factory.createLinearRing(coordinates(rings[0]))
            LinearRing[] holes = rings.drop(1).collect { double[] r -> factory.createLinearRing(coordinates(r)) } as LinearRing[]
            factory.createPolygon(shell, holes)
        }
        return parts.size() == 1 ? parts[0] : factory.createMultiPolygon(parts as Polygon[])
    }

    private static Coordinate[] coordinates(double[] xy) {
        int n = xy.length / 2
        boolean closed = xy[0] == xy[2 * n - 2] && xy[1] == xy[2 * n - 1]
        Coordinate[] c = new Coordinate[closed ? n : n + 1]
        for (int i = 0; i < n; i++) {
            c[i] = new Coordinate(xy[2 * i], xy[2 * i + 1])
        }
        if (!closed) {
            c[n] = new Coordinate(xy[0], xy[1])
        }
        return c
    }

    static byte[] wkb(Geometry geometry) {
        return new WKBWriter(2).write(geometry)
    }

    /**
     * The clip a chunk sends. The server keeps, whole, the nuclei whose centroid lies inside the clip, and
     * the chunk owns those whose centroid lies in its core: so the ROI cut to the core (plus one pixel)
     * decides the same as the whole ROI and stays small, whatever the size of the annotation. Null when
     * the core lies wholly inside the ROI (nothing to clip); an empty geometry when they do not meet
     * (the chunk can own nothing: skip it).
     */
    static Geometry clipFor(Geometry roi, DnnRect core) {
        Envelope env = new Envelope(core.x - 1, core.x + core.width + 1, core.y - 1, core.y + core.height + 1)
        Geometry box = roi.factory.toGeometry(env)
        if (!roi.envelopeInternal.intersects(env) || !roi.intersects(box)) {
            return roi.factory.createPolygon()
        }
        if (roi.contains(box)) {
            return null
        }
        try {
            return roi.intersection(box)
        } catch (RuntimeException ignored) {
            // Self-intersecting annotations (drawn by hand) fail exact overlay; a zero buffer repairs them.
            return roi.buffer(0).intersection(box)
        }
    }

}
// END JTS

// BEGIN GUI
import javafx.application.Platform
import javafx.event.ActionEvent
import javafx.geometry.Insets
import javafx.scene.Scene
import javafx.scene.control.Button
import javafx.scene.control.Label
import javafx.scene.control.ProgressBar
import javafx.scene.layout.VBox
import javafx.stage.Stage
import qupath.lib.gui.QuPathGUI

/**
 * A small progress window with a Stop button, shown only when QuPath's GUI runs (never headless).
 * Stop interrupts the script's thread, exactly like "Kill running script", so the same clean-up runs.
 * Every JavaFX call goes through Platform.runLater: the script itself runs off the FX thread.
 */
class DnnProgressWindow {

    final Thread worker
    final ProgressBar bar = new ProgressBar(0)
    final Label text = new Label('Starting…')
    Stage stage

    private DnnProgressWindow(Thread worker) {
        this.worker = worker
    }

    static DnnProgressWindow openIfGui(String title, Thread worker) {
        QuPathGUI gui = QuPathGUI.getInstance()
        if (gui == null || java.awt.GraphicsEnvironment.isHeadless()) {
            return null
        }
        DnnProgressWindow window = new DnnProgressWindow(worker)
        Platform.runLater { window.show(gui.getStage(), title) }
        return window
    }

    void show(Stage owner, String title) {
        Button stop = new Button('Stop')
        stop.setOnAction { ActionEvent e ->
            text.setText('Stopping…')
            stop.setDisable(true)
            worker.interrupt()
        }
        bar.setMaxWidth(Double.MAX_VALUE)
        VBox box = new VBox(8d, text, bar, stop)
        box.setPadding(new Insets(12d))
        box.setPrefWidth(420d)
        stage = new Stage()
        stage.initOwner(owner)
        stage.setTitle(title)
        stage.setScene(new Scene(box))
        stage.show()
    }

    Closure listener() {
        return { int done, int total, String line ->
            Platform.runLater {
                bar.setProgress(total > 0 ? done / (double) total : 1d)
                text.setText(line)
            }
        }
    }

    void dismiss() {
        Platform.runLater { stage?.close() }
    }

}
// END GUI

// BEGIN QUPATH
import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServer
import qupath.lib.images.servers.PixelCalibration
import qupath.lib.measurements.MeasurementList
import qupath.lib.measurements.MeasurementListFactory
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathObjects
import qupath.lib.objects.classes.PathClass
import qupath.lib.objects.hierarchy.PathObjectHierarchy
import qupath.lib.regions.ImagePlane
import qupath.lib.regions.RegionRequest
import qupath.lib.roi.GeometryTools
import qupath.lib.roi.interfaces.ROI
import qupath.lib.scripting.QP

/** One object that receives nuclei: an annotation, or the hierarchy's root for the whole image. */
class DnnParent {

    PathObject object
    String label
    DnnRect bounds
    Geometry roi
    ImagePlane plane
    List<DnnChunk> chunks = []
    List<PathObject> nuclei = []
    int chunksDone
    boolean wasLocked

}

/** One chunk of one parent, with the clip the server applies (null: the chunk lies inside the parent). */
class DnnJob {

    DnnParent parent
    DnnChunk chunk
    byte[] clipWkb

}

/** Everything that touches QuPath: parents, pixels, objects, hierarchy. */
class DnnQuPath {

    static final Set<String> NUCLEUS_NAMES = ['nucleus', 'nuclei'] as Set

    final DnnConfig config
    final Closure log

    DnnQuPath(DnnConfig config, Closure log) {
        this.config = config
        this.log = log
    }

    void run() {
        ImageData<BufferedImage> imageData = QP.getCurrentImageData()
        if (imageData == null) {
            throw new DnnError('No image is open. Open an image (or use "Run for project") and run the script again.')
        }
        ImageServer<BufferedImage> server = imageData.getServer()
        PathObjectHierarchy hierarchy = imageData.getHierarchy()
        String imageName = QP.getCurrentImageName() ?: server.getPath()
        if (!server.isRGB()) {
            throw new DnnError("${imageName} is not an 8-bit RGB image; DAN-NucNet segments brightfield H&E (RGB) images only.")
        }

        DnnClient client = new DnnClient(config.serverUrl, config.token, new DnnGson(), config.timeoutSeconds)
        Map model = client.modelInfo()
        double modelMpp = ((Number) model.pixelSizeMicrons).doubleValue()
        log.call("Server ${config.serverUrl}: model ${model.name} ${model.version ?: ''} (${modelMpp} µm/px, " +
                "device ${model.device ?: '?'}${model.trained == false ? ', UNTRAINED weights: results are meaningless' : ''})")

        double mpp = pixelSize(server.getPixelCalibration(), imageName)
        double downsample = DnnPlanner.downsample(mpp, modelMpp)
        log.call(String.format(Locale.ROOT, '%s: %.4f µm/px, read at downsample %.3f', imageName, mpp, downsample))

        List<DnnParent> parents = selectParents(hierarchy, server)
        if (parents.isEmpty()) {
            throw new DnnError(config.parents == 'class' ?
                    "No annotation of class '${config.parentClass}' in ${imageName}; check the class name in the parents setting." :
                    'No annotation is selected; select annotations, or set parents to \'auto\' or \'annotations\'.')
        }
        List<DnnJob> jobs = []
        for (DnnParent p : parents) {
            List<DnnChunk> all = DnnPlanner.plan(p.bounds, downsample, config.chunkSizePx, config.marginPx,
                    server.getWidth(), server.getHeight())
            for (DnnChunk c : all) {
                Geometry clip = p.roi == null ? null : DnnGeometry.clipFor(p.roi, c.core)
                if (clip?.isEmpty()) {
                    continue
                }
                p.chunks << c
                jobs << new DnnJob(parent: p, chunk: c, clipWkb: clip == null ? null : DnnGeometry.wkb(clip))
            }
        }
        log.call("${parents.size()} object(s) to fill, ${jobs.size()} chunk(s), ${config.parallelRequests} in parallel")

        PathClass nucleusClass = PathClass.fromString(config.nucleusClass)
        DnnProgressWindow window = DnnProgressWindow.openIfGui("DAN-NucNet: ${imageName}", Thread.currentThread())
        DnnProgress progress = new DnnProgress(jobs.size(), log, window?.listener())
        long count = 0
        parents.each { DnnParent p ->
            p.wasLocked = p.object.isLocked()
            if (p.object.isAnnotation()) {
                p.object.setLocked(true)
            }
        }
        try {
            // Parents none of whose chunks meets their ROI (degenerate shapes) are finished at once.
            parents.findAll { DnnParent p -> p.chunks.isEmpty() }.each { DnnParent p -> attach(hierarchy, p, nucleusClass) }
            Closure<List<PathObject>> work = { DnnJob job -> segmentChunk(client, server, job, downsample, mpp, nucleusClass) }
            DnnRunner.run(jobs, config.parallelRequests, work) { DnnJob job, List<PathObject> found, int done, int total ->
                DnnParent p = job.parent
                p.nuclei.addAll(found)
                count += found.size()
                p.chunksDone++
                if (p.chunksDone == p.chunks.size()) {
                    attach(hierarchy, p, nucleusClass)
                }
                progress.update(done, count)
            }
        } finally {
            parents.each { DnnParent p ->
                if (p.object.isAnnotation()) {
                    p.object.setLocked(p.wasLocked)
                }
            }
            window?.dismiss()
        }
        log.call("Done: ${count} nuclei in ${parents.size()} object(s) of ${imageName}")
    }

    /** Calibration in µm, or the settings' override; implausible values (dpi tags) count as missing. */
    private double pixelSize(PixelCalibration cal, String imageName) {
        if (config.pixelSizeMicrons != null) {
            log.call("Using pixelSizeMicrons = ${config.pixelSizeMicrons} from the settings (the image says " +
                    "${cal.hasPixelSizeMicrons() ? cal.getAveragedPixelSizeMicrons() : 'nothing'})")
            return config.pixelSizeMicrons
        }
        if (!cal.hasPixelSizeMicrons()) {
            throw new DnnError("${imageName} has no pixel size in µm. Set it (Image tab: double-click 'Pixel width' and " +
                    "'Pixel height'), or set pixelSizeMicrons in the settings at the top of this script (e.g. 0.25 for 40x, 0.5 for 20x).")
        }
        double mpp = cal.getAveragedPixelSizeMicrons()
        if (!DnnPlanner.plausibleMpp(mpp)) {
            throw new DnnError("${imageName} reports ${mpp} µm/px, which is a resolution tag (72/96/300 dpi), not a microscope " +
                    'calibration. Set the true pixel size in the Image tab, or pixelSizeMicrons in the settings (e.g. 0.25 for 40x).')
        }
        return mpp
    }

    private List<DnnParent> selectParents(PathObjectHierarchy hierarchy, ImageServer<BufferedImage> server) {
        List<PathObject> chosen = []
        String mode = config.parents
        if (mode == 'auto' || mode == 'selected') {
            chosen = (QP.getSelectedObjects() ?: []).findAll { PathObject o -> o.isAnnotation() && o.getROI()?.isArea() }.toList()
            if (chosen) {
                log.call("Using the ${chosen.size()} selected annotation(s)")
            } else if (mode == 'selected') {
                return []
            }
        }
        if (!chosen && (mode == 'auto' || mode == 'annotations')) {
            chosen = hierarchy.getAnnotationObjects().findAll { PathObject o ->
                o.getROI()?.isArea() && !isNucleusClass(o.getPathClass())
            }.toList()
            if (chosen) {
                log.call("Using all ${chosen.size()} annotation(s) that are not nuclei")
            }
        }
        if (mode == 'class') {
            chosen = hierarchy.getAnnotationObjects().findAll { PathObject o ->
                o.getROI()?.isArea() && o.getPathClass() != null && o.getPathClass().toString() == config.parentClass
            }.toList()
        }
        if (!chosen && (mode == 'auto' || mode == 'image')) {
            log.call('Using the whole image')
            DnnParent whole = new DnnParent(object: hierarchy.getRootObject(), label: 'whole image',
                    bounds: new DnnRect(0, 0, server.getWidth(), server.getHeight()), roi: null,
                    plane: ImagePlane.getDefaultPlane())
            return [whole]
        }
        // A parent inside another chosen parent would get its nuclei twice: keep the outermost.
        Set<PathObject> set = new HashSet<>(chosen)
        List<DnnParent> out = []
        for (PathObject o : chosen) {
            PathObject up = o.getParent()
            boolean nested = false
            while (up != null) {
                if (set.contains(up)) {
                    nested = true
                    break
                }
                up = up.getParent()
            }
            if (nested) {
                log.call("Skipping ${o.getDisplayedName()}: it lies inside another chosen annotation")
                continue
            }
            ROI roi = o.getROI()
            DnnRect bounds = DnnRect.covering(roi.getBoundsX(), roi.getBoundsY(), roi.getBoundsWidth(), roi.getBoundsHeight(),
                    server.getWidth(), server.getHeight())
            if (bounds == null) {
                log.call("Skipping ${o.getDisplayedName()}: it lies outside the image")
                continue
            }
            out << new DnnParent(object: o, label: o.getDisplayedName(), bounds: bounds, roi: roi.getGeometry(),
                    plane: roi.getImagePlane())
        }
        return out
    }

    private boolean isNucleusClass(PathClass pathClass) {
        if (pathClass == null) {
            return false
        }
        String name = pathClass.getName()
        return name == config.nucleusClass || name?.toLowerCase() in NUCLEUS_NAMES
    }

    /** Runs on a pool thread: read pixels, send, turn the answer into detection objects (not yet attached). */
    private List<PathObject> segmentChunk(DnnClient client, ImageServer<BufferedImage> server, DnnJob job,
                                          double downsample, double mpp, PathClass nucleusClass) {
        DnnParent parent = job.parent
        DnnRect r = job.chunk.region
        RegionRequest request = RegionRequest.createInstance(server.getPath(), downsample, r.x, r.y, r.width, r.height,
                parent.plane.getZ(), parent.plane.getT())
        BufferedImage image = server.readRegion(request)
        byte[] png = DnnImages.png(image)
        DnnAnswer answer = client.segment(DnnProtocol.segmentRequest(png, job.chunk, downsample, mpp, job.clipWkb,
                config.threshold, config.minAreaMicrons2))
        List<PathObject> objects = new ArrayList<>(answer.nuclei.size())
        GeometryFactory factory = GeometryTools.getDefaultFactory()
        for (DnnNucleus n : answer.nuclei) {
            Geometry g = DnnGeometry.toGeometry(factory, n.polygons)
            MeasurementList ml = MeasurementListFactory.createMeasurementList(n.measurements.size(),
                    MeasurementList.MeasurementListType.DOUBLE)
            n.measurements.each { String k, Double v -> ml.put(k, v) }
            ml.close()
            PathObject detection = PathObjects.createDetectionObject(GeometryTools.geometryToROI(g, parent.plane), nucleusClass, ml)
            if (n.id) {
                try {
                    detection.setID(UUID.fromString(n.id))
                } catch (IllegalArgumentException ignored) {
                    // Not a UUID: keep the one QuPath made.
                }
            }
            objects << detection
        }
        return objects
    }

    /** Swap earlier nuclei for the new ones in one go, and tell QuPath once. Never resolveHierarchy(). */
    private void attach(PathObjectHierarchy hierarchy, DnnParent p, PathClass nucleusClass) {
        if (config.replaceNuclei) {
            List<PathObject> old = new ArrayList<>(p.object.getChildObjects()).findAll { PathObject c ->
                c.isDetection() && c.getPathClass() != null && c.getPathClass().toString() == nucleusClass.toString()
            }
            if (old) {
                p.object.removeChildObjects(old)
            }
        }
        p.object.addChildObjects(p.nuclei)
        hierarchy.fireHierarchyChangedEvent(this, p.object)
        log.call("${p.label}: ${p.nuclei.size()} nuclei")
    }

}

// ---------------------------------- main ----------------------------------
Closure dnnLog = { String line -> println('[dannucnet] ' + line) }
try {
    new DnnQuPath(DnnConfig.parse(SETTINGS, System.getenv()), dnnLog).run()
} catch (DnnError | DnnCancelled e) {
    dnnLog.call('ERROR: ' + e.message)
    // Rethrown so that QuPath marks the run (and, in "Run for project", this image) as failed.
    throw e
}
// END QUPATH
