"""DAN-NucNet nuclei segmentation for digital pathology.

The package is laid out as the pipeline it implements, data flowing one way:
``slides`` (pixels) → ``model``/``engine`` (probabilities) → ``geometry``
(instances, polygons, measurements) → ``pipeline`` (regions and slides) →
``formats`` (QuPath GeoJSON, datasets) → ``service`` / ``qupath`` / ``cli``.
"""

__version__ = "0.1.0"
