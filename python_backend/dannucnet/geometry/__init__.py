"""Geometry: probabilities → nucleus instances → polygons → cells → measurements.

Also the two rules that keep tiled work consistent: chunk ownership (a nucleus
belongs to the chunk whose half-open core holds its centroid) and QuPath's
pixel convention (pixel (c, r) is the square [c, c+1) × [r, r+1); outlines run
along pixel edges and rasterise back at pixel centres).
"""

from __future__ import annotations

from dannucnet.geometry.cells import cell_margin_px, expand_labels
from dannucnet.geometry.instances import fill_holes, label_nuclei, labels_from_mask
from dannucnet.geometry.measurements import MEASUREMENT_NAMES, measure_nuclei
from dannucnet.geometry.ownership import Chunk, Rect, centroids_of, owned, owned_mask, plan_chunks
from dannucnet.geometry.polygons import labels_to_polygons, largest_polygon, mask_to_polygon
from dannucnet.geometry.qupath_measurements import measure_cells, measurement_names
from dannucnet.geometry.qupath_stains import HE_DEFAULT, Stains, estimate_stains, parse_stains
from dannucnet.geometry.rasterize import rasterize_mask, rasterize_polygons
from dannucnet.geometry.stain import hed_to_rgb, hematoxylin_od, od_to_rgb, rgb_to_hed, rgb_to_od

__all__ = [
    "HE_DEFAULT",
    "Stains",
    "cell_margin_px",
    "estimate_stains",
    "expand_labels",
    "measure_cells",
    "measurement_names",
    "parse_stains",
    "Chunk",
    "MEASUREMENT_NAMES",
    "Rect",
    "centroids_of",
    "fill_holes",
    "hed_to_rgb",
    "hematoxylin_od",
    "label_nuclei",
    "labels_from_mask",
    "labels_to_polygons",
    "largest_polygon",
    "mask_to_polygon",
    "measure_nuclei",
    "od_to_rgb",
    "owned",
    "owned_mask",
    "plan_chunks",
    "rasterize_mask",
    "rasterize_polygons",
    "rgb_to_hed",
    "rgb_to_od",
]
