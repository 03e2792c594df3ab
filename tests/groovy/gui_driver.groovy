// Test driver for segment_nuclei.groovy's GUI section: the progress window, on real JavaFX.
//
// tests/test_qupath_scripts.py joins the script's CORE and GUI sections with this file and runs it
// under a virtual display (Xvfb) with Debian's OpenJFX jars. QuPath's own QuPathGUI class is
// replaced by a two-member stand-in compiled by the test (getInstance(), getStage()), so what runs
// is the script's window code against the JavaFX that QuPath's GUI is built on.

import groovy.json.JsonOutput
import java.util.concurrent.CountDownLatch
import java.util.concurrent.TimeUnit
import javafx.scene.control.Button
import javafx.scene.layout.VBox

Object onFx(Closure work) {
    CountDownLatch done = new CountDownLatch(1)
    Object result = null
    Platform.runLater {
        result = work.call()
        done.countDown()
    }
    if (!done.await(20, TimeUnit.SECONDS)) {
        throw new IllegalStateException('the JavaFX thread did not answer')
    }
    return result
}

CountDownLatch started = new CountDownLatch(1)
Platform.startup { started.countDown() }
started.await(20, TimeUnit.SECONDS)
onFx { QuPathGUI.instance = new QuPathGUI(stage: new Stage()) }

Map out = [:]
Thread worker = new Thread({
    try {
        Thread.sleep(60_000)
        out.workerInterrupted = false
    } catch (InterruptedException ignored) {
        out.workerInterrupted = true
    }
})
worker.start()
DnnProgressWindow window = DnnProgressWindow.openIfGui('DAN-NucNet: synthetic.png', worker)
out.opened = window != null
List<String> logged = []
DnnProgress progress = new DnnProgress(4, { String line -> logged << line }, window.listener())
progress.update(1, 10)
progress.update(3, 25)
out.title = onFx { window.stage.title }
out.showing = onFx { window.stage.showing }
out.ownedByQuPath = onFx { window.stage.owner.is(QuPathGUI.instance.stage) }
out.progress = onFx { window.bar.progress }
out.text = onFx { window.text.text }
out.lastLogged = logged[-1]
onFx { ((VBox) window.stage.scene.root).children.find { it instanceof Button }.fire() }
worker.join(10_000)
out.textAfterStop = onFx { window.text.text }
window.dismiss()
out.showingAfterDismiss = onFx { window.stage.showing }
QuPathGUI.instance = null
out.windowWithoutGui = DnnProgressWindow.openIfGui('headless', Thread.currentThread()) != null
println('RESULT ' + JsonOutput.toJson(out))
Platform.exit()
