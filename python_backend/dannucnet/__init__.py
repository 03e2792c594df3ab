"""DAN-NucNet nuclei segmentation for digital pathology.

The package is laid out as the pipeline it implements, data flowing one way:
``slides`` (pixels) → ``model``/``engine`` (probabilities) → ``geometry``
(instances, polygons, measurements) → ``pipeline`` (regions and slides) →
``formats`` (QuPath GeoJSON, datasets) → ``service`` / ``qupath`` / ``cli``.
"""

import os

__version__ = "0.1.0"

# numpy asks Linux for 2 MB pages ("transparent huge pages", by madvise) for every large array. A slide
# run allocates and frees arrays of tens of MB per chunk (maps, labels, colour conversions), and each
# fresh huge page cost more here than the address lookups it saves: a 4096² 20× slide through the 20×
# model ran at 0.54 MP/s with them and 0.65 without (2-core Xeon VM; benchmarks/bench_hugepages.py).
# NUMPY_MADVISE_HUGEPAGE=1 in the environment gives numpy's default back. numpy reads it when it is first
# imported, so this holds where dannucnet is imported first: the dannucnet command, the server, workers.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
