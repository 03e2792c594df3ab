"""File formats: QuPath GeoJSON, the instance dataset folder, MoNuSeg XML, NuInsSeg and GBM40 folders."""
