// Runs the whole segment_nuclei.groovy on real QuPath classes, without the GUI.
//
// Used by tests/test_qupath_scripts.py when QuPath's jars are on the classpath (a QuPath
// installation via PAQUO_QUPATH_DIR, or DANNUCNET_QUPATH_CLASSPATH). It builds an image in memory
// (WrappedBufferedImageServer + pixel calibration), a hierarchy with annotations, makes it QP's
// current image as "Run for project" does (QP.setBatchProjectAndImage), evaluates the script and
// reports what the hierarchy looks like afterwards as JSON. The assertions live in the Python test.
//
// args[0]: JSON {"script": path of the script with test settings, "image": PNG, "mpp": µm/px, "out": path}

import groovy.json.JsonOutput
import groovy.json.JsonSlurper
import java.awt.image.BufferedImage
import javax.imageio.ImageIO
import org.locationtech.jts.io.WKTReader
import qupath.lib.images.ImageData
import qupath.lib.images.servers.ImageServerMetadata
import qupath.lib.images.servers.WrappedBufferedImageServer
import qupath.lib.objects.PathObject
import qupath.lib.objects.PathObjects
import qupath.lib.objects.classes.PathClass
import qupath.lib.regions.ImagePlane
import qupath.lib.roi.GeometryTools
import qupath.lib.scripting.QP

Map cfg = new JsonSlurper().parse(new File(args[0])) as Map
String scriptText = new File(cfg.script as String).getText('UTF-8')
BufferedImage decoded = ImageIO.read(new File(cfg.image as String))
// QuPath's RGB servers hand out TYPE_INT_RGB; WrappedBufferedImageServer calls other types non-RGB.
BufferedImage pixels = new BufferedImage(decoded.width, decoded.height, BufferedImage.TYPE_INT_RGB)
pixels.createGraphics().with { g ->
    g.drawImage(decoded, 0, 0, null)
    g.dispose()
}

ImageData<BufferedImage> newImage(BufferedImage img, Double mpp) {
    WrappedBufferedImageServer server = new WrappedBufferedImageServer('synthetic.png', img)
    if (mpp != null) {
        server.setMetadata(new ImageServerMetadata.Builder(server.getMetadata()).pixelSizeMicrons(mpp, mpp).build())
    }
    return new ImageData<BufferedImage>(server)
}

PathObject annotation(String wkt, String cls) {
    def roi = GeometryTools.geometryToROI(new WKTReader().read(wkt), ImagePlane.getDefaultPlane())
    return PathObjects.createAnnotationObject(roi, cls == null ? null : PathClass.fromString(cls))
}

/** Runs the script as QuPath would for this image; returns the error message or null. */
String runScript(String text, ImageData<BufferedImage> data) {
    QP.setBatchProjectAndImage(null, data)
    try {
        new GroovyShell(this.class.classLoader).evaluate(text, 'segment_nuclei.groovy')
        return null
    } catch (Throwable e) {
        return "${e.class.simpleName}: ${e.message}"
    } finally {
        QP.resetBatchProjectAndImage()
    }
}

Map describe(PathObject o) {
    def roi = o.getROI()
    return [
        name        : o.getName(),
        cls         : o.getPathClass()?.toString(),
        detection   : o.isDetection(),
        annotation  : o.isAnnotation(),
        locked      : o.isAnnotation() ? o.isLocked() : null,
        id          : o.getID().toString(),
        area        : roi?.getArea(),
        centroid    : roi == null ? null : [roi.getCentroidX(), roi.getCentroidY()],
        wkt         : o.isDetection() ? roi.getGeometry().toText() : null,
        measurements: o.getMeasurementList().getMeasurementNames(),
        children    : o.getChildObjects().collect { describe(it) },
    ]
}

Map out = [:]

// 1. Three annotations: a classified polygon (with an object of an earlier run, a Nucleus detection another
//    tool made and a hand-drawn child to keep), a locked rectangle, and a "Nucleus" annotation that must
//    not be treated as a parent.
ImageData<BufferedImage> data = newImage(pixels, cfg.mpp as Double)
def hierarchy = data.getHierarchy()
PathObject tumor = annotation('POLYGON ((10 10, 120 20, 110 120, 15 100, 10 10))', 'Tumor')
tumor.setName('tumor')
PathObject detection(String wkt) {
    return PathObjects.createDetectionObject(GeometryTools.geometryToROI(new WKTReader().read(wkt), ImagePlane.getDefaultPlane()),
            PathClass.fromString('Nucleus'))
}
PathObject oldOurs = detection('POLYGON ((50 50, 60 50, 60 60, 50 60, 50 50))')
oldOurs.setName('dannucnet:untrained@0')
PathObject otherTool = detection('POLYGON ((70 70, 80 70, 80 80, 70 80, 70 70))')
PathObject keep = annotation('POLYGON ((20 20, 30 20, 30 30, 20 30, 20 20))', 'Keep me')
keep.setName('keep')
tumor.addChildObjects([oldOurs, otherTool, keep])
PathObject box = annotation('POLYGON ((140 140, 250 140, 250 250, 140 250, 140 140))', null)
box.setName('box')
box.setLocked(true)
PathObject drawnNucleus = annotation('POLYGON ((200 20, 210 20, 210 30, 200 30, 200 20))', 'Nucleus')
drawnNucleus.setName('drawn nucleus')
[tumor, box, drawnNucleus].each { hierarchy.addObject(it) }
hierarchy.getSelectionModel().setSelectedObject(null)
out.oldOursId = oldOurs.getID().toString()
out.otherToolId = otherTool.getID().toString()

long t0 = System.nanoTime()
out.firstError = runScript(scriptText, data)
out.firstMs = (System.nanoTime() - t0) / 1e6
out.first = describe(hierarchy.getRootObject())

// 2. Again: this script's earlier objects are replaced, not doubled.
out.secondError = runScript(scriptText, data)
out.second = describe(hierarchy.getRootObject())

// 3. Only the selected annotation when one is selected.
hierarchy.getSelectionModel().setSelectedObject(box)
out.selectedError = runScript(scriptText.replace('replacePrevious     : true', 'replacePrevious     : false'), data)
out.selected = describe(hierarchy.getRootObject())
hierarchy.getSelectionModel().setSelectedObject(null)

// 4. No annotation at all: the whole image.
ImageData<BufferedImage> bare = newImage(pixels, cfg.mpp as Double)
out.wholeError = runScript(scriptText, bare)
out.whole = describe(bare.getHierarchy().getRootObject())

// 5. No pixel size: refused with a message, nothing changed.
ImageData<BufferedImage> uncalibrated = newImage(pixels, null)
uncalibrated.getHierarchy().addObject(annotation('POLYGON ((10 10, 100 10, 100 100, 10 100, 10 10))', null))
out.uncalibratedError = runScript(scriptText, uncalibrated)
out.uncalibrated = describe(uncalibrated.getHierarchy().getRootObject())

// 6. "Kill running script": interrupt the script's thread while chunks are on the server.
ImageData<BufferedImage> killed = newImage(pixels, cfg.mpp as Double)
PathObject victim = annotation('POLYGON ((0 0, 256 0, 256 256, 0 256, 0 0))', 'Tumor')
victim.setName('victim')
killed.getHierarchy().addObject(victim)
String killError = null
Thread runner = Thread.start { killError = runScript(scriptText.replace('parallelRequests    : 2', 'parallelRequests    : 1'), killed) }
Thread.sleep((cfg.killAfterMs ?: 1500) as long)
long killAt = System.nanoTime()
runner.interrupt()
runner.join(20000)
out.killMs = (System.nanoTime() - killAt) / 1e6
out.killAlive = runner.isAlive()
out.killError = killError
out.killed = describe(killed.getHierarchy().getRootObject())

new File(cfg.out as String).setText(JsonOutput.toJson(out), 'UTF-8')
