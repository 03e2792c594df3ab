"""File formats: QuPath GeoJSON, the instance dataset folder, MoNuSeg XML."""
