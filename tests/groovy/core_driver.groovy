// Test driver for segment_nuclei.groovy's CORE section (no QuPath class in it).
//
// tests/test_qupath_scripts.py puts the script's SETTINGS block and CORE section in front of this
// file and runs the result under the Groovy that npm-groovy-lint bundles, with Gson and JTS (what
// QuPath ships) on the classpath. This file only drives the script's own classes and writes what
// they produced as JSON; the assertions live in the Python test.
//
// args[0]: JSON file with {"mode": "unit"|"server", "out": path, ...}.

import java.util.concurrent.atomic.AtomicInteger
import java.util.function.IntBinaryOperator
import org.locationtech.jts.io.WKTReader

/** Stand-ins with the getters of QuPath's ColorDeconvolutionStains / StainVector that DnnWire.stains calls. */
class FakeVector {

    String name
    double red
    double green
    double blue

}

class FakeStains {

    String name
    List<FakeVector> vectors
    double maxRed
    double maxGreen
    double maxBlue

    FakeVector getStain(int i) {
        return i >= 1 && i <= vectors.size() ? vectors[i - 1] : null
    }

}

Gson gson = new GsonBuilder().serializeNulls().create()
Map cfg = gson.fromJson(new File(args[0]).getText('UTF-8'), Map)
Map out = [:]

String errorOf(Closure c) {
    try {
        c.call()
        return null
    } catch (DnnError e) {
        return e.message
    }
}

Map plainNuclei(List<Map> nuclei) {
    return [nuclei: nuclei.collect { Map n ->
        [id: n.id, nucleus: n.nucleus.toText(), cell: n.cell?.toText(), measurements: n.measurements,
         centroid: [n.nucleus.centroid.x, n.nucleus.centroid.y]]
    }]
}

if (cfg.mode == 'unit') {
    out.configs = cfg.configs.collect { Map c ->
        try {
            return [ok: DnnSettings.parse(c.settings as Map, c.env as Map<String, String>)]
        } catch (DnnError e) {
            return [error: e.message]
        }
    }
    out.shipped = DnnSettings.parse(SETTINGS, [:])
    FakeStains he = new FakeStains(name: 'H&E estimated', maxRed: 241, maxGreen: 236, maxBlue: 250, vectors: [
            new FakeVector(name: 'Hematoxylin', red: 0.651, green: 0.701, blue: 0.29),
            new FakeVector(name: 'Eosin', red: 0.216, green: 0.801, blue: 0.558),
            new FakeVector(name: 'Residual', red: 0.316, green: -0.598, blue: 0.737)])
    Map settings = DnnSettings.parse([threshold: 0.4, chunkSizePx: 1024, pixelSizeMicrons: null], [:])
    Map options = DnnWire.options(settings, DnnWire.stains(he))
    out.options = options
    out.noStains = DnnWire.options(settings, DnnWire.stains(null))
    def roi = new WKTReader().read('POLYGON ((10 10, 300 10, 300 200, 10 10))')
    out.plan = gson.fromJson(gson.toJson(DnnWire.plan(1000, 800, 0.25, 0.26, roi, settings, options)), Map)
    out.planWhole = gson.fromJson(gson.toJson(DnnWire.plan(1000, 800, null, null, null, settings, [:])), Map)
    Map fast = DnnSettings.parse([model: 'auto-fast'], [:])
    out.planFast = gson.fromJson(gson.toJson(DnnWire.plan(1000, 800, 0.5, 0.5, null, fast, [:])), Map)
    java.awt.image.BufferedImage image = javax.imageio.ImageIO.read(new File(cfg.image))
    Map chunk = [read: [x: 10.0, y: 20.0, width: 2.0 * image.width, height: 2.0 * image.height],
                 core: [x: 40.0, y: 50.0, width: 64.0, height: 64.0], clipWkb: 'AQMAAAA=']
    out.segment = gson.fromJson(gson.toJson(DnnWire.segment(image, chunk, 0.25d, options)), Map)
    out.segmentModel = gson.fromJson(gson.toJson(DnnWire.segment(image, chunk, 0.25d, options, 'dannucnet-monuseg-20x')), Map).model
    out.tags = [DnnWire.tag([model: 'm', modelVersion: '2'], 'f'), DnnWire.tag([:], 'f')]
    out.segmentNoClip = gson.fromJson(gson.toJson(DnnWire.segment(image, chunk + [clipWkb: ''], 0.25d, options)), Map).keySet()
    out.parsed = plainNuclei(DnnWire.nuclei(gson.fromJson(new File(cfg.answer).getText('UTF-8'), Map)))
    out.progress = [DnnPool.progress(0, 40, 0, 0.5d), DnnPool.progress(12, 40, 3456, 35d), DnnPool.progress(40, 40, 9999, 120d)]
}

if (cfg.mode == 'server') {
    Map settings = DnnSettings.parse([threshold: cfg.threshold, cellExpansionMicrons: null, chunkSizePx: cfg.chunkPx], [:])
    Map options = DnnWire.options(settings, null)
    DnnClient client = new DnnClient(cfg.serverUrl, cfg.token, 120)
    out.model = client.model()
    out.errors = [
        wrongToken : errorOf { new DnnClient(cfg.serverUrl, 'x' * 32, 30).model() },
        noToken    : errorOf { new DnnClient(cfg.serverUrl, null, 30).model() },
        unreachable: errorOf { new DnnClient(cfg.deadUrl, cfg.token, 30).model() },
        notFound   : errorOf { new DnnClient(cfg.serverUrl + '/nothing-here', cfg.token, 30).model() },
        badOption  : errorOf { client.post('/v1/plan', DnnWire.plan(100, 100, 0.25, 0.25, null, settings, [threshold: 2])) },
    ]
    java.awt.image.BufferedImage image = javax.imageio.ImageIO.read(new File(cfg.image))
    def roi = new WKTReader().read(cfg.roiWkt)
    Map plan = client.post('/v1/plan', DnnWire.plan(image.width, image.height, cfg.mpp, cfg.mpp, roi, settings, options))
    out.plan = plan
    out.uncalibrated = client.post('/v1/plan', DnnWire.plan(image.width, image.height, 352.8d, 352.8d, null, settings, options))
    // The chunks as the script runs them: read (at downsample 1, as the test image is at the model's pixel size), send, parse.
    Closure<List<Map>> send = { Map c ->
        Map r = c.read
        java.awt.image.BufferedImage crop = image.getSubimage(r.x as int, r.y as int, r.width as int, r.height as int)
        DnnWire.nuclei(client.post('/v1/segment?alt=json', DnnWire.segment(crop, c, plan.pixelSizeMicrons as double, options)))
    }
    AtomicInteger running = new AtomicInteger()
    AtomicInteger maxRunning = new AtomicInteger()
    List<Map> found = []
    List<Integer> order = []
    DnnPool.run(plan.chunks.withIndex().collect { c, i -> c + [index: i] }, cfg.parallel as int, { Map c ->
        maxRunning.accumulateAndGet(running.incrementAndGet(), { a, b -> Math.max(a, b) } as IntBinaryOperator)
        try {
            return send(c)
        } finally {
            running.decrementAndGet()
        }
    }) { Map c, List<Map> nuclei, int done ->
        order << done
        found.addAll(plainNuclei(nuclei).nuclei.collect { it + [chunk: c.index] })
    }
    out.chunked = [nuclei: found, maxRunning: maxRunning.get(), order: order]
    // Cells, as the shipped settings ask for them (cellExpansionMicrons 5) with the image's stains: first chunk only.
    Map cellSettings = DnnSettings.parse([threshold: cfg.threshold, cellExpansionMicrons: 5.0, chunkSizePx: cfg.chunkPx], [:])
    Map cellOptions = DnnWire.options(cellSettings, DnnWire.stains(new FakeStains(name: 'H&E default', maxRed: 255,
            maxGreen: 255, maxBlue: 255, vectors: [new FakeVector(name: 'Hematoxylin', red: 0.651, green: 0.701, blue: 0.290),
                                                   new FakeVector(name: 'Eosin', red: 0.216, green: 0.801, blue: 0.558)])))
    Map first = plan.chunks[0]
    Map fr = first.read
    java.awt.image.BufferedImage firstCrop = image.getSubimage(fr.x as int, fr.y as int, fr.width as int, fr.height as int)
    Map cellAnswer = client.post('/v1/segment?alt=json', DnnWire.segment(firstCrop, first, plan.pixelSizeMicrons as double,
            cellOptions, 'auto'))
    out.cells = plainNuclei(DnnWire.nuclei(cellAnswer)).nuclei
    out.cellTag = DnnWire.tag(cellAnswer, 'fallback')
    out.namedModel = errorOf { client.post('/v1/segment?alt=json', DnnWire.segment(firstCrop, first,
            plan.pixelSizeMicrons as double, cellOptions, 'no-such-model')) }
    out.cellOptions = cellOptions
    // "Kill running script": interrupt the waiting thread after the first chunk has come back.
    Thread caller = Thread.currentThread()
    int afterInterrupt = 0
    long interruptAt = 0
    String message = null
    try {
        DnnPool.run(plan.chunks, 1, send) { Map c, List<Map> nuclei, int done ->
            if (interruptAt) {
                afterInterrupt++
            } else {
                interruptAt = System.nanoTime()
                Thread.start { caller.interrupt() }
            }
        }
    } catch (DnnCancelled e) {
        message = e.message
    }
    out.cancel = [message: message, afterInterruptMs: (System.nanoTime() - interruptAt) / 1e6, resultsAfterInterrupt: afterInterrupt,
                  interruptFlagKept: Thread.interrupted()]
}

new File(cfg.out as String).setText(gson.toJson(out), 'UTF-8')
