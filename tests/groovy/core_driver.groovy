// Test driver for segment_nuclei.groovy's QuPath-independent sections.
//
// tests/test_qupath_scripts.py concatenates the script's CORE section (plus its GSON and JTS
// sections when those jars are on the classpath) with this file and runs the result under the
// Groovy that npm-groovy-lint bundles. This file only drives the script's own classes and writes
// what they produced as JSON; the assertions live in the Python test, which checks the output
// against the running server with shapely.
//
// args[0]: JSON file with {"mode": "unit"|"server", "out": path, ...}.

import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.concurrent.atomic.AtomicInteger

/** groovy-json as codec when Gson is absent (QuPath itself uses DnnGson). */
class SlurperJson implements DnnJson {

    @Override
    String write(Object value) {
        return JsonOutput.toJson(value)
    }

    @Override
    Object read(String text) {
        return new JsonSlurper().parseText(text)
    }

}

/** Little-endian WKB of a single-ring polygon, so that clipping is testable without JTS. */
static byte[] polygonWkb(List<List<Number>> ring) {
    List<List<Number>> closed = ring[0] == ring[-1] ? ring : ring + [ring[0]]
    ByteBuffer b = ByteBuffer.allocate(1 + 4 + 4 + 4 + closed.size() * 16).order(ByteOrder.LITTLE_ENDIAN)
    b.put((byte) 1).putInt(3).putInt(1).putInt(closed.size())
    closed.each { b.putDouble(it[0].doubleValue()).putDouble(it[1].doubleValue()) }
    return b.array()
}

static Class<?> optionalClass(Object script, String name) {
    try {
        return script.class.classLoader.loadClass(name)
    } catch (ClassNotFoundException ignored) {
        return null
    }
}

static Map nucleusJson(DnnNucleus n, Integer chunk) {
    double[] c = DnnProtocol.centroid(n.polygons[0][0])
    return [id: n.id, chunk: chunk, className: n.className, centroid: [c[0], c[1]],
            polygons: n.polygons.collect { p -> p.collect { r -> r as List } }, measurements: n.measurements]
}

static String errorOf(Closure c) {
    try {
        c.call()
        return null
    } catch (DnnError e) {
        return e.message
    }
}

Map cfg = new JsonSlurper().parse(new File(args[0])) as Map
Map out = [:]
Class<?> gsonCodec = optionalClass(this, 'DnnGson')
Class<?> geometry = optionalClass(this, 'DnnGeometry')
DnnJson codec = gsonCodec ? (DnnJson) gsonCodec.getDeclaredConstructor().newInstance() : new SlurperJson()
out.codec = codec.class.simpleName
out.jts = geometry != null

if (cfg.mode == 'unit') {
    out.configs = cfg.configs.collect { Map c ->
        try {
            DnnConfig p = DnnConfig.parse(c.settings as Map, c.env as Map<String, String>)
            return [ok: [serverUrl: p.serverUrl, token: p.token, parents: p.parents, parentClass: p.parentClass,
                         replaceNuclei: p.replaceNuclei, threshold: p.threshold, minAreaMicrons2: p.minAreaMicrons2,
                         parallelRequests: p.parallelRequests, pixelSizeMicrons: p.pixelSizeMicrons, chunkSizePx: p.chunkSizePx,
                         marginPx: p.marginPx, timeoutSeconds: p.timeoutSeconds, nucleusClass: p.nucleusClass]]
        } catch (DnnError e) {
            return [error: e.message]
        }
    }
    try {
        out.shipped = [ok: DnnConfig.parse(SETTINGS, [:]).properties.findAll { k, v -> k != 'class' }]
    } catch (MissingPropertyException ignored) {
        out.shipped = null
    }
    out.downsamples = cfg.downsamples.collect { List<Number> d -> DnnPlanner.downsample(d[0].doubleValue(), d[1].doubleValue()) }
    out.plausible = cfg.plausible.collect { DnnPlanner.plausibleMpp(it == null ? null : ((Number) it).doubleValue()) }
    out.plans = cfg.plans.collect { Map p ->
        DnnRect b = DnnRect.covering(p.bounds[0], p.bounds[1], p.bounds[2], p.bounds[3], p.imageWidth, p.imageHeight)
        if (b == null) {
            return null
        }
        DnnPlanner.plan(b, p.downsample, p.chunkPx, p.marginPx, p.imageWidth, p.imageHeight).collect { DnnChunk c ->
            [index: c.index, region: c.region.toJson(), core: c.core.toJson()]
        }
    }
    String text = new File(cfg.geojson).getText('UTF-8')
    DnnAnswer answer = DnnProtocol.parseAnswer(codec.read(text))
    out.parsed = [skipped: answer.skipped, summary: answer.summary, nuclei: answer.nuclei.collect { nucleusJson(it, null) }]
    out.parseErrors = cfg.badAnswers.collect { String t -> errorOf { DnnProtocol.parseAnswer(codec.read(t)) } }
    byte[] png = DnnImages.png(javax.imageio.ImageIO.read(new File(cfg.image)))
    File pngFile = new File(cfg.out + '.png')
    pngFile.bytes = png
    out.png = pngFile.path
    Map req = DnnProtocol.segmentRequest(png, new DnnChunk(0, new DnnRect(10, 20, 30, 40), new DnnRect(15, 25, 20, 30)),
            2.0d, 0.25d, polygonWkb([[0, 0], [5, 0], [5, 5]]), 0.4d, null)
    out.request = codec.read(codec.write(req))
    if (geometry != null) {
        def factory = optionalClass(this, 'org.locationtech.jts.geom.GeometryFactory').getDeclaredConstructor().newInstance()
        out.geometries = answer.nuclei.collect { DnnNucleus n ->
            def g = geometry.toGeometry(factory, n.polygons)
            [valid: g.isValid(), area: g.getArea(), type: g.getGeometryType()]
        }
        def reader = optionalClass(this, 'org.locationtech.jts.io.WKTReader').getDeclaredConstructor().newInstance()
        def roi = reader.read(cfg.clipWkt)
        out.clips = cfg.clipRegions.collect { List<Integer> r ->
            def clip = geometry.clipFor(roi, new DnnRect(r[0], r[1], r[2], r[3]))
            clip == null ? 'inside' : (clip.isEmpty() ? 'outside' : clip.toText())
        }
        out.wkbHex = geometry.wkb(roi).encodeHex().toString()
    }
}

if (cfg.mode == 'server') {
    DnnClient client = new DnnClient(cfg.serverUrl, cfg.token, codec, 120)
    Map info = client.modelInfo()
    out.model = info
    out.errors = [
        wrongToken : errorOf { new DnnClient(cfg.serverUrl, 'x' * 32, codec, 30).modelInfo() },
        noToken    : errorOf { new DnnClient(cfg.serverUrl, null, codec, 30).modelInfo() },
        unreachable: errorOf { new DnnClient(cfg.deadUrl, cfg.token, codec, 30).modelInfo() },
        notFound   : errorOf { new DnnClient(cfg.serverUrl + '/nothing-here', cfg.token, codec, 30).modelInfo() },
    ]
    java.awt.image.BufferedImage image = javax.imageio.ImageIO.read(new File(cfg.image))
    double modelMpp = ((Number) info.pixelSizeMicrons).doubleValue()
    double d = DnnPlanner.downsample(cfg.mpp as double, modelMpp)
    out.downsample = d
    if (d != 1.0d) {
        throw new IllegalStateException("test image must be at the model's pixel size, got downsample ${d}")
    }
    DnnRect whole = new DnnRect(0, 0, image.width, image.height)
    Closure<DnnAnswer> send = { DnnChunk c, byte[] clip ->
        java.awt.image.BufferedImage crop = image.getSubimage(c.region.x, c.region.y, c.region.width, c.region.height)
        client.segment(DnnProtocol.segmentRequest(DnnImages.png(crop), c, d, cfg.mpp as double, clip, cfg.threshold as Double, null))
    }
    // One request for the whole image: the reference the chunked run is compared with.
    long t0 = System.nanoTime()
    DnnAnswer single = send(new DnnChunk(0, whole, whole), null)
    out.single = [ms: (System.nanoTime() - t0) / 1e6, summary: single.summary, skipped: single.skipped,
                  nuclei: single.nuclei.collect { nucleusJson(it, 0) }]
    // Chunked, as the script runs it: planner + bounded pool.
    List<DnnChunk> chunks = DnnPlanner.plan(whole, d, cfg.chunkPx as int, cfg.marginPx as int, image.width, image.height)
    AtomicInteger running = new AtomicInteger()
    AtomicInteger maxRunning = new AtomicInteger()
    List<Map> chunked = []
    List<Integer> answered = []
    List<Map> progressLines = []
    List<List> heard = []  // what the GUI progress window would be told, every update
    DnnProgress progress = new DnnProgress(chunks.size(), { String line -> progressLines << line },
            { int done, int total, String line -> heard << [done, total, line] })
    long count = 0
    t0 = System.nanoTime()
    DnnRunner.run(chunks, cfg.parallel as int, { DnnChunk c ->
        int now = running.incrementAndGet()
        maxRunning.accumulateAndGet(now, { a, b -> Math.max(a, b) } as java.util.function.IntBinaryOperator)
        try {
            return send(c, null)
        } finally {
            running.decrementAndGet()
        }
    }, { DnnChunk c, DnnAnswer a, int done, int total ->
        answered << c.index
        chunked.addAll(a.nuclei.collect { nucleusJson(it, c.index) })
        count += a.nuclei.size()
        progress.update(done, count)
    })
    out.chunked = [ms: (System.nanoTime() - t0) / 1e6, maxRunning: maxRunning.get(), progress: progressLines,
                   heard: heard, done: answered,
                   chunks: chunks.collect { [index: it.index, region: it.region.toJson(), core: it.core.toJson()] },
                   nuclei: chunked]
    // Clipped to a polygon (as an annotation ROI would be).
    byte[] clipWkb = polygonWkb(cfg.clipPolygon as List<List<Number>>)
    DnnAnswer clipped = send(new DnnChunk(0, whole, whole), clipWkb)
    out.clipped = [nuclei: clipped.nuclei.collect { nucleusJson(it, 0) }]
    // "Kill running script": interrupt the waiting thread after the first chunk has come back.
    Thread caller = Thread.currentThread()
    int resultsAfterInterrupt = 0
    boolean interrupted = false
    long interruptAt = 0
    String cancelMessage = null
    try {
        DnnRunner.run(chunks, 1, { DnnChunk c -> send(c, null) }, { DnnChunk c, DnnAnswer a, int done, int total ->
            if (interrupted) {
                resultsAfterInterrupt++
            }
            if (!interrupted) {
                // Interrupt from another thread while the caller waits for the next chunk, as QuPath does.
                interrupted = true
                Thread.start {
                    Thread.sleep(50)
                    interruptAt = System.nanoTime()
                    caller.interrupt()
                }
            }
        })
    } catch (DnnCancelled e) {
        cancelMessage = e.message
    }
    out.cancel = [message: cancelMessage, afterInterruptMs: (System.nanoTime() - interruptAt) / 1e6,
                  resultsAfterInterrupt: resultsAfterInterrupt, chunks: chunks.size(),
                  interruptFlagKept: Thread.interrupted()]
}

new File(cfg.out as String).setText(JsonOutput.toJson(out), 'UTF-8')
