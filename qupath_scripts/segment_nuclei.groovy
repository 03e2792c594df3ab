/*
 * segment_nuclei.groovy: DAN-NucNet nuclei and cells from inside QuPath 0.5.1 and 0.6.x.
 *
 * Sends the pixels under your annotations to a running `dannucnet serve` and adds what it finds
 * under each annotation: cell objects (nucleus + cell, as Analyze > Cell detection makes them) or,
 * with cellExpansionMicrons = 0, nucleus detections; with QuPath's measurement names.
 *
 *   1. Start the server:  dannucnet serve       (a GPU machine elsewhere: see qupath_scripts/README.md)
 *   2. Open an image; select annotations (or none: every annotation, or else the whole image).
 *   3. Run this script (Automate > Script editor > Run, or Run for project).
 *
 * The server plans the chunks and judges the pixel size; this script reads pixels and adds objects.
 * It uses only what QuPath ships (the JDK's HTTP client, Gson, JTS). Edit SETTINGS; nothing else.
 */

// ================================ SETTINGS (edit here) ================================
Map SETTINGS = [
    // Address of `dannucnet serve` (its HTTP port), e.g. 'http://gpu-host:8765'.
    serverUrl           : 'http://127.0.0.1:8765',
    // The server's access token; '' reads the environment variable DANNUCNET_TOKEN.
    token               : '',
    // Which objects get nuclei: 'auto' (the selected annotations; none selected: every annotation
    // that is not a nucleus; no annotation: the whole image), 'selected', 'annotations', 'image',
    // or 'class:Tumor' (every annotation of class Tumor).
    parents             : 'auto',
    // Model: 'auto' lets the server choose (by default the installed model that suits the image's
    // pixel size: `dannucnet models`); 'auto-fast' the same, then its fastest network (the lite
    // models: 2.3-2.6x faster on a CPU, up to about 1 point of PQ lower); or a name it lists,
    // e.g. 'dannucnet-monuseg-20x'.
    model               : 'auto',
    // Cells: each nucleus grown by this many µm (QuPath's Cell detection default is 5);
    // 0 gives nucleus detections only.
    cellExpansionMicrons: 5.0,
    // Probability threshold (0-1) and smallest nucleus (µm²); null = the server's defaults.
    threshold           : null,
    minAreaMicrons2     : null,
    // µm per pixel when the image has no (or a wrong) calibration; null = the image's own.
    pixelSizeMicrons    : null,
    // Chunk side in pixels at the model's resolution; null = the server's default.
    chunkSizePx         : null,
    // Chunks in flight at once (2-4 suit one GPU), and seconds to wait for one.
    parallelRequests    : 2,
    timeoutSeconds      : 600,
    // Class of the new objects ('' = none).
    className           : 'Nucleus',
    // Remove this script's earlier objects (named dannucnet:MODEL@VERSION) from a parent first.
    replacePrevious     : true,
]

// =======================================================================================
// CORE uses no QuPath class: tests/test_qupath_scripts.py runs it under plain Groovy against a
// real server. QUPATH is the part that reads pixels and adds objects.

// BEGIN CORE
import com.google.gson.Gson
import com.google.gson.GsonBuilder
import java.awt.image.BufferedImage
import java.net.http.HttpClient
import java.net.http.HttpConnectTimeoutException
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.net.http.HttpTimeoutException
import java.time.Duration
import java.util.concurrent.Callable
import java.util.concurrent.ExecutionException
import java.util.concurrent.ExecutorCompletionService
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import javax.imageio.ImageIO
import org.locationtech.jts.geom.Geometry
import org.locationtech.jts.io.WKBReader
import org.locationtech.jts.io.WKBWriter

/** A problem the user can fix; the message says how. The run stops and nothing more changes. */
class DnnError extends RuntimeException {

    DnnError(String message) {
        super(message)
    }

}

/** "Kill running script": objects whose chunks had not all come back are left as they were. */
class DnnCancelled extends RuntimeException {

    DnnCancelled() {
        super('Stopped on request (Kill running script); parents not yet finished were left as they were.')
    }

}

/** SETTINGS, checked strictly so that a typo stops the run. Ranges are the server's to judge. */
class DnnSettings {

    static final Map<String, Object> DEFAULTS = [
        serverUrl: 'http://127.0.0.1:8765', token: '', parents: 'auto', model: 'auto', cellExpansionMicrons: 5.0d, threshold: null,
        minAreaMicrons2: null, pixelSizeMicrons: null, chunkSizePx: null, parallelRequests: 2, timeoutSeconds: 600,
        className: 'Nucleus', replacePrevious: true,
    ].asImmutable()
    static final List<String> NUMBERS = ['cellExpansionMicrons', 'threshold', 'minAreaMicrons2', 'pixelSizeMicrons',
                                         'chunkSizePx', 'parallelRequests', 'timeoutSeconds'].asImmutable()

    static Map parse(Map settings, Map<String, String> env) {
        Collection unknown = settings.keySet().findAll { k -> !DEFAULTS.containsKey(k) }
        if (unknown) {
            throw new DnnError("Unknown setting(s) ${unknown.join(', ')}; the settings are ${DEFAULTS.keySet().join(', ')}.")
        }
        Map s = DEFAULTS + settings
        NUMBERS.each { String k -> s[k] = number(k, s[k]) }
        ['parallelRequests', 'timeoutSeconds'].each { String k ->
            if (s[k] == null || s[k] < 1) {
                throw new DnnError("Setting ${k} must be a whole number of at least 1, not ${s[k]}.")
            }
            s[k] = (s[k] as double).intValue()
        }
        s.serverUrl = String.valueOf(s.serverUrl).trim().replaceAll('/+$', '')
        if (!(s.serverUrl ==~ '(?i)https?://[^\\s/]+(/\\S*)?')) {
            throw new DnnError("Setting serverUrl '${s.serverUrl}' is not an http:// or https:// address, e.g. 'http://127.0.0.1:8765'.")
        }
        s.token = (s.token ?: env?.get('DANNUCNET_TOKEN') ?: '').trim() ?: null
        String parents = String.valueOf(s.parents).trim()
        s.parentClass = parents.toLowerCase().startsWith('class:') ? parents.substring(6).trim() : null
        s.parents = s.parentClass == null ? parents.toLowerCase() : 'class'
        if (!(s.parents in ['auto', 'selected', 'annotations', 'image']) && !s.parentClass) {
            throw new DnnError("Setting parents '${parents}' is not 'auto', 'selected', 'annotations', 'image' or 'class:NAME'.")
        }
        if (!(s.replacePrevious instanceof Boolean)) {
            throw new DnnError("Setting replacePrevious must be true or false, not '${s.replacePrevious}'.")
        }
        s.className = s.className ? String.valueOf(s.className).trim() : ''
        s.model = s.model ? String.valueOf(s.model).trim() : 'auto'
        return s
    }

    private static Double number(String key, Object v) {
        if (v == null || v instanceof Number) {
            return v == null || !Double.isFinite(v as double) ? null : (v as double)
        }
        try {
            return Double.valueOf(String.valueOf(v).trim())
        } catch (NumberFormatException ignored) {
            throw new DnnError("Setting ${key} must be a number or null, not '${v}'.")
        }
    }

}

/** The HTTP/JSON gateway of `dannucnet serve` (API v1); every failure becomes a message that says what to do. */
class DnnClient {

    static final String API_VERSION = 'v1'
    final String url
    final String token
    final Duration timeout
    final HttpClient http
    final Gson gson = new GsonBuilder().disableHtmlEscaping().create()

    DnnClient(String url, String token, int timeoutSeconds) {
        this.url = url
        this.token = token
        this.timeout = Duration.ofSeconds(timeoutSeconds)
        this.http = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(Math.min(10, timeoutSeconds)))
                .version(HttpClient.Version.HTTP_1_1).build()
    }

    /** GET /v1/model, with the API version handshake. */
    Map model() {
        Map m = exchange(request('/v1/model').GET(), '/v1/model')
        if (m.apiVersion != API_VERSION) {
            throw new DnnError("The server at ${url} speaks API ${m.apiVersion ?: '(none)'} (dannucnet ${m.serverVersion ?: '?'}), " +
                    "this script speaks ${API_VERSION}: use the segment_nuclei.groovy of the server's dannucnet release.")
        }
        return m
    }

    Map post(String path, Map body) {
        return exchange(request(path).header('Content-Type', 'application/json')
                .POST(HttpRequest.BodyPublishers.ofString(gson.toJson(body))), path.replaceAll('\\?.*', ''))
    }

    private HttpRequest.Builder request(String path) {
        HttpRequest.Builder b = HttpRequest.newBuilder(URI.create(url + path)).timeout(timeout).header('Accept', 'application/json')
        return token ? b.header('Authorization', 'Bearer ' + token) : b
    }

    /** Sends, retrying three times on 429/503 (busy); an interrupt passes through untouched. */
    private Map exchange(HttpRequest.Builder builder, String what) throws InterruptedException {
        HttpRequest req = builder.build()
        for (int attempt = 1; ; attempt++) {
            HttpResponse<String> resp
            try {
                resp = http.send(req, HttpResponse.BodyHandlers.ofString())
            } catch (HttpConnectTimeoutException | ConnectException e) {
                throw unreachable(e)
            } catch (HttpTimeoutException ignored) {
                throw new DnnError("The server at ${url} did not answer ${what} within ${timeout.seconds} s: raise timeoutSeconds, " +
                        'or lower chunkSizePx or parallelRequests.')
            } catch (IOException e) {
                throw e.cause instanceof ConnectException ? unreachable(e) : new DnnError("Lost the connection to ${url} " +
                        "during ${what} (${e.class.simpleName}: ${e.message}); the server's terminal says why it stopped.")
            }
            if (resp.statusCode() == 200) {
                Object answer = parse(resp.body())
                if (!(answer instanceof Map)) {
                    throw new DnnError("The server at ${url} did not answer ${what} with JSON (${answer}); " +
                            'is serverUrl the HTTP port of `dannucnet serve`?')
                }
                return (Map) answer
            }
            if (resp.statusCode() in [429, 503] && attempt <= 3) {
                Thread.sleep(1000L * attempt)
                continue
            }
            throw httpError(resp.statusCode(), resp.body(), what)
        }
    }

    /** The JSON value, or a string saying why the text is not JSON. */
    private Object parse(String text) {
        try {
            return gson.fromJson(text, Object)
        } catch (RuntimeException e) {
            return "not JSON (${e.message})".toString()
        }
    }

    private DnnError unreachable(Exception e) {
        URI u = URI.create(url)
        String port = u.port > 0 && u.port != 8765 ? " --http-port ${u.port}" : ''
        String how = u.host in ['127.0.0.1', 'localhost', '::1'] ? "start it with: dannucnet serve${port}" :
                "start it on ${u.host} with: dannucnet serve --host 0.0.0.0${port} --token-file FILE"
        return new DnnError("Cannot reach the DAN-NucNet server at ${url} (${e.class.simpleName}); ${how}, or set serverUrl in SETTINGS.")
    }

    private DnnError httpError(int status, String body, String what) {
        Object err = parse(body)
        String message = err instanceof Map && err.error instanceof Map ? err.error.message : (body ?: '').take(200)
        switch (status) {
            case [401, 403]:
                return new DnnError("The server at ${url} refused the access token (HTTP ${status}: ${message}); set token in " +
                        'SETTINGS, or DANNUCNET_TOKEN, to the token the server was started with.')
            case 404:
                return new DnnError("The server at ${url} has no ${what} (HTTP 404); serverUrl must be the HTTP port of " +
                        '`dannucnet serve` (default 8765), not its gRPC port or another service.')
            case 413:
                return new DnnError("The server refused a chunk as too large (HTTP 413: ${message}); lower chunkSizePx.")
            case 400:
                return new DnnError("The server refused the request (HTTP 400: ${message}); check SETTINGS.")
            default:
                return new DnnError("The server failed on ${what} (HTTP ${status}: ${message}); see the server's log.")
        }
    }

}

/** The JSON bodies of /v1/plan and /v1/segment, and the objects in the answers (docs/http-api.md). */
class DnnWire {

    /** SegmentOptions: only what SETTINGS (and the image) set; the rest is the server's default. */
    static Map options(Map s, Map stains) {
        Map o = [threshold: s.threshold, minAreaMicrons2: s.minAreaMicrons2, cellExpansionMicrons: s.cellExpansionMicrons,
                 stains: stains ?: null]
        return o.findAll { k, v -> v != null }
    }

    /**
     * QuPath's ColorDeconvolutionStains as JSON (options.stains, proto StainVectors): {name, stains: [{name, r, g, b}, ...],
     * maxRed, maxGreen, maxBlue}; r, g, b are each stain's optical-density vector as QuPath stores it (getStain(1..3)),
     * max* the background (white) values.
     */
    static Map stains(Object s) {
        if (s == null) {
            return [:]
        }
        List vectors = (1..3).collect { int i -> s.getStain(i) }.findAll { v -> v != null }.collect { v ->
            [name: v.getName(), r: v.getRed(), g: v.getGreen(), b: v.getBlue()]
        }
        return [name: s.getName(), stains: vectors, maxRed: s.getMaxRed(), maxGreen: s.getMaxGreen(), maxBlue: s.getMaxBlue()]
    }

    /** PlanRegionRequest for one parent: image size and calibration, the parent's ROI (null: whole image). */
    static Map plan(int width, int height, Double pixelWidth, Double pixelHeight, Geometry roi, Map s, Map options) {
        Map body = [imageWidth: width, imageHeight: height, imagePixelWidthMicrons: pixelWidth, imagePixelHeightMicrons: pixelHeight,
                    pixelSizeMicrons: s.pixelSizeMicrons, chunkSize: s.chunkSizePx == null ? null : (s.chunkSizePx as int),
                    roiWkb: roi == null ? null : new WKBWriter(2).write(roi).encodeBase64().toString(), options: options,
                    model: s.model && s.model != 'auto' ? s.model : null]
        return body.findAll { k, v -> v != null }
    }

    /** SegmentRegionRequest for one planned chunk read into `image`. */
    static Map segment(BufferedImage image, Map chunk, double pixelSizeMicrons, Map options, String model = 'auto') {
        ByteArrayOutputStream png = new ByteArrayOutputStream()
        ImageIO.write(image, 'png', png)
        Map read = chunk.read
        Map body = [image: [encoded: png.toByteArray().encodeBase64().toString()], originX: read.x, originY: read.y,
                    downsample: (read.width as double) / image.width, pixelSizeMicrons: pixelSizeMicrons, core: chunk.core,
                    options: options]
        if (model && model != 'auto') {
            body.model = model
        }
        return chunk.clipWkb ? body + [clipWkb: chunk.clipWkb] : body
    }

    /** What our objects are named: the model that made them (the answer says), else the server's default. */
    static String tag(Map answer, String fallback) {
        return answer.model ? "dannucnet:${answer.model}@${answer.modelVersion ?: ''}".toString() : fallback
    }

    /** SegmentRegionResponse (proto JSON) -> [id, nucleus, cell (null without), measurements] per nucleus. */
    static List<Map> nuclei(Map answer) {
        WKBReader reader = new WKBReader()
        return (answer.nuclei ?: []).collect { Map n ->
            Map<String, Double> m = (n.measurements ?: [:]).collectEntries { k, v -> [k, v as double] }
            if (n.probability != null) {
                m.putIfAbsent('Detection probability', n.probability as double)
            }
            [id: n.id, nucleus: reader.read(n.polygonWkb.decodeBase64()), measurements: m,
             cell: n.cellWkb ? reader.read(n.cellWkb.decodeBase64()) : null]
        }
    }

}

/** Runs work(job) on a bounded pool: at most `parallel` chunks are read and in flight at once. */
class DnnPool {

    /**
     * onResult(job, result, done) runs on the calling thread in completion order. The first failure, or an interrupt
     * of the calling thread (Kill running script), cancels the rest; late answers are dropped.
     */
    static void run(List jobs, int parallel, Closure work, Closure onResult) {
        ExecutorService pool = Executors.newFixedThreadPool(Math.max(1, Math.min(parallel, jobs.size())))
        ExecutorCompletionService<Object[]> done = new ExecutorCompletionService<>(pool)
        try {
            jobs.each { job -> done.submit({ [job, work.call(job)] as Object[] } as Callable<Object[]>) }
            for (int i = 1; i <= jobs.size(); i++) {
                Object[] r
                try {
                    r = done.take().get()
                } catch (ExecutionException e) {
                    throw e.cause instanceof RuntimeException ? e.cause : new DnnError("A chunk failed: ${e.cause}")
                }
                onResult.call(r[0], r[1], i)
            }
        } catch (InterruptedException ignored) {
            Thread.currentThread().interrupt()  // QuPath's "Run for project" loop sees it too
            throw new DnnCancelled()
        } finally {
            pool.shutdownNow()
        }
    }

    /** '12/40 chunks, 3,456 nuclei, 35.0 s, about 80 s left' */
    static String progress(int done, int total, long nuclei, double seconds) {
        String left = done > 0 && done < total ? String.format(Locale.ROOT, ', about %.0f s left', seconds / done * (total - done)) : ''
        return String.format(Locale.ROOT, '%d/%d chunks, %,d nuclei, %.1f s%s', done, total, nuclei, seconds, left)
    }

}
// END CORE

// BEGIN QUPATH
import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServer
import qupath.lib.images.servers.PixelCalibration
import qupath.lib.measurements.MeasurementList
import qupath.lib.measurements.MeasurementListFactory
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathObjects
import qupath.lib.objects.classes.PathClass
import qupath.lib.regions.ImagePlane
import qupath.lib.regions.RegionRequest
import qupath.lib.roi.GeometryTools
import qupath.lib.roi.interfaces.ROI
import qupath.lib.scripting.QP

/** Everything that touches QuPath: parents, pixels, objects. */
class DnnQuPath {

    static final String TAG_PREFIX = 'dannucnet:'  // as `dannucnet batch` names its objects
    final Map s
    final Closure log
    Map options

    DnnQuPath(Map settings, Closure log) {
        this.s = settings
        this.log = log
    }

    void run() {
        ImageData<BufferedImage> data = QP.getCurrentImageData()
        if (data == null) {
            throw new DnnError('No image is open: open one (or use Run for project).')
        }
        ImageServer<BufferedImage> server = data.getServer()
        String name = QP.getCurrentImageName() ?: server.getPath()
        if (!server.isRGB()) {
            throw new DnnError("${name} is not an 8-bit RGB image; DAN-NucNet segments brightfield H&E.")
        }
        DnnClient client = new DnnClient(s.serverUrl, s.token, s.timeoutSeconds)
        Map model = client.model()
        String tag = "${TAG_PREFIX}${model.name}@${model.version}"
        log.call("Server ${s.serverUrl}: ${model.name} ${model.version} on ${model.device}" +
                (model.trained == false ? ': UNTRAINED weights, results are meaningless' : ''))
        options = DnnWire.options(s, DnnWire.stains(data.getColorDeconvolutionStains()))
        log.call(options.stains ? "Stains: ${options.stains.name}" : 'No stain vectors set: the server uses H&E default')

        PixelCalibration cal = server.getPixelCalibration()
        boolean calibrated = cal.hasPixelSizeMicrons()
        List<Map> parents = selectParents(data)
        List<Map> jobs = []
        for (Map p : parents) {
            Map plan = client.post('/v1/plan', DnnWire.plan(server.getWidth(), server.getHeight(),
                    calibrated ? cal.getPixelWidthMicrons() : null, calibrated ? cal.getPixelHeightMicrons() : null,
                    p.roi?.getGeometry(), s, options))
            if (plan.pixelSizeProblem) {
                throw new DnnError("${name} has no usable pixel size (${plan.pixelSizeProblem}). Set it in the Image tab " +
                        '(Pixel width/height), or pixelSizeMicrons in SETTINGS (e.g. 0.25 for 40x, 0.5 for 20x).')
            }
            p.mpp = plan.pixelSizeMicrons
            p.downsample = plan.downsample
            p.model = plan.model ?: s.model  // the model the server planned for: every chunk is sent to it
            p.chunks = plan.chunks ?: []
            p.chunks.each { Map c -> jobs << [parent: p, chunk: c] }
            if (p.is(parents[0])) {
                log.call(String.format(Locale.ROOT, '%s: %.4f µm/px (%s), read at downsample %.3f%s',
                        name, plan.pixelSizeMicrons, plan.pixelSizeSource, plan.downsample,
                        plan.model ? " for model ${plan.model}".toString() : ''))
            }
        }
        log.call("${parents.size()} parent(s), ${jobs.size()} chunk(s), ${s.parallelRequests} at a time")
        PathClass pathClass = s.className ? PathClass.fromString(s.className) : null
        parents.each { Map p -> p.wasLocked = p.object.isLocked() }
        parents.findAll { Map p -> p.object.isAnnotation() }.each { Map p -> p.object.setLocked(true) }
        long found = 0
        long started = System.nanoTime()
        long lastLog = 0
        try {
            parents.findAll { Map p -> p.chunks.isEmpty() }.each { Map p -> attach(data, p, tag) }
            DnnPool.run(jobs, s.parallelRequests, { Map job -> segmentChunk(client, server, job, pathClass, tag) }) {
                Map job, List<PathObject> objects, int done ->
                Map p = job.parent
                p.objects.addAll(objects)
                found += objects.size()
                if (++p.done == p.chunks.size()) {
                    attach(data, p, tag)
                }
                if (done == jobs.size() || System.nanoTime() - lastLog > 5e9) {
                    lastLog = System.nanoTime()
                    log.call(DnnPool.progress(done, jobs.size(), found, (lastLog - started) / 1e9d))
                }
            }
        } finally {
            parents.findAll { Map p -> p.object.isAnnotation() }.each { Map p -> p.object.setLocked(p.wasLocked) }
        }
        log.call("Done: ${found} ${s.cellExpansionMicrons ? 'cells' : 'nuclei'} in ${parents.size()} parent(s) of ${name}")
    }

    /** The objects to fill: annotations (outermost only, so none gets nuclei twice), or the whole image. */
    private List<Map> selectParents(ImageData<BufferedImage> data) {
        Collection<PathObject> areas = data.getHierarchy().getAnnotationObjects().findAll { PathObject o -> o.getROI()?.isArea() }
        List<PathObject> chosen = []
        if (s.parents in ['auto', 'selected']) {
            chosen = (QP.getSelectedObjects() ?: []).findAll { PathObject o -> o in areas }
        }
        if (!chosen && s.parents in ['auto', 'annotations']) {
            chosen = areas.findAll { PathObject o -> !(o.getPathClass()?.getName()?.toLowerCase() in ['nucleus', 'nuclei', 'cell']) }
        }
        if (s.parents == 'class') {
            chosen = areas.findAll { PathObject o -> o.getPathClass()?.toString() == s.parentClass }
        }
        if (!chosen && s.parents in ['auto', 'image']) {
            log.call('Using the whole image')
            return [[object: data.getHierarchy().getRootObject(), roi: null, plane: ImagePlane.getDefaultPlane(), objects: [], done: 0]]
        }
        if (!chosen) {
            throw new DnnError(s.parents == 'class' ? "No annotation of class '${s.parentClass}'; check parents in SETTINGS." :
                    "No annotation is selected; select some, or set parents to 'auto' or 'annotations'.")
        }
        Set<PathObject> set = chosen as Set
        return chosen.findAll { PathObject o -> !set.any { PathObject up -> !up.is(o) && isAncestor(up, o) } }.collect { PathObject o ->
            [object: o, roi: o.getROI(), plane: o.getROI().getImagePlane(), objects: [], done: 0]
        }
    }

    private boolean isAncestor(PathObject up, PathObject o) {
        for (PathObject p = o.getParent(); p != null; p = p.getParent()) {
            if (p.is(up)) {
                return true
            }
        }
        return false
    }

    /** On a pool thread: read the chunk's pixels, send them, make the objects (not yet attached). */
    private List<PathObject> segmentChunk(DnnClient client, ImageServer<BufferedImage> server, Map job, PathClass pathClass, String tag) {
        Map p = job.parent
        Map r = job.chunk.read
        RegionRequest request = RegionRequest.createInstance(server.getPath(), p.downsample as double, r.x as int, r.y as int,
                r.width as int, r.height as int, p.plane.getZ(), p.plane.getT())
        BufferedImage pixels = server.readRegion(request)
        Map answer = client.post('/v1/segment?alt=json', DnnWire.segment(pixels, job.chunk, p.mpp as double, options, p.model as String))
        return DnnWire.nuclei(answer).collect { Map n -> toObject(n, p.plane, pathClass, DnnWire.tag(answer, tag)) }
    }

    private PathObject toObject(Map n, ImagePlane plane, PathClass pathClass, String tag) {
        MeasurementList ml = MeasurementListFactory.createMeasurementList(n.measurements.size(), MeasurementList.MeasurementListType.DOUBLE)
        n.measurements.each { String k, Double v -> ml.put(k, v) }
        ml.close()
        ROI nucleus = GeometryTools.geometryToROI(n.nucleus, plane)
        PathObject o = n.cell == null ? PathObjects.createDetectionObject(nucleus, pathClass, ml) :
                PathObjects.createCellObject(GeometryTools.geometryToROI(n.cell, plane), nucleus, pathClass, ml)
        o.setName(tag)
        try {
            o.setID(UUID.fromString(String.valueOf(n.id)))
        } catch (IllegalArgumentException ignored) {
            // not a UUID: keep the id QuPath made
        }
        return o
    }

    /** Swap this script's earlier objects for the new ones in one go; QuPath is told once (no resolveHierarchy). */
    private void attach(ImageData<BufferedImage> data, Map p, String tag) {
        PathObject parent = p.object
        if (s.replacePrevious) {
            Collection<PathObject> ours = parent.getChildObjects().findAll { PathObject c ->
                c.isDetection() && c.getName()?.startsWith(TAG_PREFIX)
            }
            parent.removeChildObjects(new ArrayList<PathObject>(ours))
        }
        parent.addChildObjects(p.objects)
        data.getHierarchy().fireHierarchyChangedEvent(this, parent)
        log.call("${parent.isRootObject() ? 'Whole image' : parent.getDisplayedName()}: ${p.objects.size()} objects (${tag})")
    }

}

Closure dnnLog = { String line -> println('[dannucnet] ' + line) }
try {
    new DnnQuPath(DnnSettings.parse(SETTINGS, System.getenv()), dnnLog).run()
} catch (DnnError | DnnCancelled e) {
    dnnLog.call('ERROR: ' + e.message)
    throw e  // so that QuPath marks the run (in Run for project: this image) as failed
}
// END QUPATH
