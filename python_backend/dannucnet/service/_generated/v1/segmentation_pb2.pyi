from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "architecture", "pixel_size_microns", "tile_size", "threshold", "device", "server_version", "api_version", "trained", "architecture_config", "max_pixels", "max_message_bytes", "max_polygons", "slide_segmentation_enabled", "window_overlap")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_MICRONS_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    API_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_POLYGONS_FIELD_NUMBER: _ClassVar[int]
    SLIDE_SEGMENTATION_ENABLED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    architecture: str
    pixel_size_microns: float
    tile_size: int
    threshold: float
    device: str
    server_version: str
    api_version: str
    trained: bool
    architecture_config: _struct_pb2.Struct
    max_pixels: int
    max_message_bytes: int
    max_polygons: int
    slide_segmentation_enabled: bool
    window_overlap: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., architecture: _Optional[str] = ..., pixel_size_microns: _Optional[float] = ..., tile_size: _Optional[int] = ..., threshold: _Optional[float] = ..., device: _Optional[str] = ..., server_version: _Optional[str] = ..., api_version: _Optional[str] = ..., trained: _Optional[bool] = ..., architecture_config: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., max_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_polygons: _Optional[int] = ..., slide_segmentation_enabled: _Optional[bool] = ..., window_overlap: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("data", "width", "height")
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    width: int
    height: int
    def __init__(self, data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Rect(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: float
    y: float
    width: float
    height: float
    def __init__(self, x: _Optional[float] = ..., y: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ...) -> None: ...

class SegmentOptions(_message.Message):
    __slots__ = ("threshold", "min_area_microns2", "cell_expansion_microns", "stains")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_AREA_MICRONS2_FIELD_NUMBER: _ClassVar[int]
    CELL_EXPANSION_MICRONS_FIELD_NUMBER: _ClassVar[int]
    STAINS_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    min_area_microns2: float
    cell_expansion_microns: float
    stains: StainVectors
    def __init__(self, threshold: _Optional[float] = ..., min_area_microns2: _Optional[float] = ..., cell_expansion_microns: _Optional[float] = ..., stains: _Optional[_Union[StainVectors, _Mapping]] = ...) -> None: ...

class StainVector(_message.Message):
    __slots__ = ("name", "r", "g", "b")
    NAME_FIELD_NUMBER: _ClassVar[int]
    R_FIELD_NUMBER: _ClassVar[int]
    G_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    name: str
    r: float
    g: float
    b: float
    def __init__(self, name: _Optional[str] = ..., r: _Optional[float] = ..., g: _Optional[float] = ..., b: _Optional[float] = ...) -> None: ...

class StainVectors(_message.Message):
    __slots__ = ("name", "stains", "max_red", "max_green", "max_blue")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STAINS_FIELD_NUMBER: _ClassVar[int]
    MAX_RED_FIELD_NUMBER: _ClassVar[int]
    MAX_GREEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BLUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    stains: _containers.RepeatedCompositeFieldContainer[StainVector]
    max_red: float
    max_green: float
    max_blue: float
    def __init__(self, name: _Optional[str] = ..., stains: _Optional[_Iterable[_Union[StainVector, _Mapping]]] = ..., max_red: _Optional[float] = ..., max_green: _Optional[float] = ..., max_blue: _Optional[float] = ...) -> None: ...

class SegmentRegionRequest(_message.Message):
    __slots__ = ("image", "origin_x", "origin_y", "downsample", "pixel_size_microns", "core", "clip_wkb", "options", "model")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_X_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_Y_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_MICRONS_FIELD_NUMBER: _ClassVar[int]
    CORE_FIELD_NUMBER: _ClassVar[int]
    CLIP_WKB_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    image: Image
    origin_x: float
    origin_y: float
    downsample: float
    pixel_size_microns: float
    core: Rect
    clip_wkb: bytes
    options: SegmentOptions
    model: str
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., origin_x: _Optional[float] = ..., origin_y: _Optional[float] = ..., downsample: _Optional[float] = ..., pixel_size_microns: _Optional[float] = ..., core: _Optional[_Union[Rect, _Mapping]] = ..., clip_wkb: _Optional[bytes] = ..., options: _Optional[_Union[SegmentOptions, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class Nucleus(_message.Message):
    __slots__ = ("id", "polygon_wkb", "probability", "measurements", "cell_wkb")
    class MeasurementsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    POLYGON_WKB_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    CELL_WKB_FIELD_NUMBER: _ClassVar[int]
    id: str
    polygon_wkb: bytes
    probability: float
    measurements: _containers.ScalarMap[str, float]
    cell_wkb: bytes
    def __init__(self, id: _Optional[str] = ..., polygon_wkb: _Optional[bytes] = ..., probability: _Optional[float] = ..., measurements: _Optional[_Mapping[str, float]] = ..., cell_wkb: _Optional[bytes] = ...) -> None: ...

class SegmentRegionResponse(_message.Message):
    __slots__ = ("nuclei", "nucleus_count", "timings_ms", "model", "model_version")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUCLEI_FIELD_NUMBER: _ClassVar[int]
    NUCLEUS_COUNT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    nuclei: _containers.RepeatedCompositeFieldContainer[Nucleus]
    nucleus_count: int
    timings_ms: _containers.ScalarMap[str, float]
    model: str
    model_version: str
    def __init__(self, nuclei: _Optional[_Iterable[_Union[Nucleus, _Mapping]]] = ..., nucleus_count: _Optional[int] = ..., timings_ms: _Optional[_Mapping[str, float]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class SegmentSlideRequest(_message.Message):
    __slots__ = ("path", "region", "roi_wkb", "options", "pixel_size_microns", "model")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ROI_WKB_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_MICRONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    path: str
    region: Rect
    roi_wkb: _containers.RepeatedScalarFieldContainer[bytes]
    options: SegmentOptions
    pixel_size_microns: float
    model: str
    def __init__(self, path: _Optional[str] = ..., region: _Optional[_Union[Rect, _Mapping]] = ..., roi_wkb: _Optional[_Iterable[bytes]] = ..., options: _Optional[_Union[SegmentOptions, _Mapping]] = ..., pixel_size_microns: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelEntry(_message.Message):
    __slots__ = ("name", "version", "pixel_size_microns", "trained", "licence", "metrics", "metrics_split", "is_default", "loaded", "base_filters", "depth", "has_weights")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_MICRONS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    LICENCE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    METRICS_SPLIT_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    BASE_FILTERS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    HAS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    pixel_size_microns: float
    trained: bool
    licence: str
    metrics: _containers.ScalarMap[str, float]
    metrics_split: str
    is_default: bool
    loaded: bool
    base_filters: int
    depth: int
    has_weights: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., pixel_size_microns: _Optional[float] = ..., trained: _Optional[bool] = ..., licence: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., metrics_split: _Optional[str] = ..., is_default: _Optional[bool] = ..., loaded: _Optional[bool] = ..., base_filters: _Optional[int] = ..., depth: _Optional[int] = ..., has_weights: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "default_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelEntry]
    default_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelEntry, _Mapping]]] = ..., default_model: _Optional[str] = ...) -> None: ...

class SegmentSlideResponse(_message.Message):
    __slots__ = ("slide", "progress", "nuclei", "summary")
    SLIDE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    NUCLEI_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    slide: SlideInfo
    progress: Progress
    nuclei: NucleusBatch
    summary: SlideSummary
    def __init__(self, slide: _Optional[_Union[SlideInfo, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., nuclei: _Optional[_Union[NucleusBatch, _Mapping]] = ..., summary: _Optional[_Union[SlideSummary, _Mapping]] = ...) -> None: ...

class SlideInfo(_message.Message):
    __slots__ = ("width", "height", "pixel_size_microns", "pixel_size_source")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_MICRONS_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    pixel_size_microns: float
    pixel_size_source: str
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., pixel_size_microns: _Optional[float] = ..., pixel_size_source: _Optional[str] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("chunks_done", "chunks_total", "nuclei_found", "fraction")
    CHUNKS_DONE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUCLEI_FOUND_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    chunks_done: int
    chunks_total: int
    nuclei_found: int
    fraction: float
    def __init__(self, chunks_done: _Optional[int] = ..., chunks_total: _Optional[int] = ..., nuclei_found: _Optional[int] = ..., fraction: _Optional[float] = ...) -> None: ...

class NucleusBatch(_message.Message):
    __slots__ = ("nuclei",)
    NUCLEI_FIELD_NUMBER: _ClassVar[int]
    nuclei: _containers.RepeatedCompositeFieldContainer[Nucleus]
    def __init__(self, nuclei: _Optional[_Iterable[_Union[Nucleus, _Mapping]]] = ...) -> None: ...

class SlideSummary(_message.Message):
    __slots__ = ("nucleus_count", "seconds")
    NUCLEUS_COUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    nucleus_count: int
    seconds: float
    def __init__(self, nucleus_count: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class PlanRegionRequest(_message.Message):
    __slots__ = ("image_width", "image_height", "image_pixel_width_microns", "image_pixel_height_microns", "pixel_size_microns", "region", "roi_wkb", "chunk_size", "options", "model")
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PIXEL_WIDTH_MICRONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PIXEL_HEIGHT_MICRONS_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_MICRONS_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    ROI_WKB_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    image_width: int
    image_height: int
    image_pixel_width_microns: float
    image_pixel_height_microns: float
    pixel_size_microns: float
    region: Rect
    roi_wkb: bytes
    chunk_size: int
    options: SegmentOptions
    model: str
    def __init__(self, image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., image_pixel_width_microns: _Optional[float] = ..., image_pixel_height_microns: _Optional[float] = ..., pixel_size_microns: _Optional[float] = ..., region: _Optional[_Union[Rect, _Mapping]] = ..., roi_wkb: _Optional[bytes] = ..., chunk_size: _Optional[int] = ..., options: _Optional[_Union[SegmentOptions, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class PlannedChunk(_message.Message):
    __slots__ = ("read", "core", "clip_wkb")
    READ_FIELD_NUMBER: _ClassVar[int]
    CORE_FIELD_NUMBER: _ClassVar[int]
    CLIP_WKB_FIELD_NUMBER: _ClassVar[int]
    read: Rect
    core: Rect
    clip_wkb: bytes
    def __init__(self, read: _Optional[_Union[Rect, _Mapping]] = ..., core: _Optional[_Union[Rect, _Mapping]] = ..., clip_wkb: _Optional[bytes] = ...) -> None: ...

class PlanRegionResponse(_message.Message):
    __slots__ = ("pixel_size_microns", "pixel_size_source", "pixel_size_problem", "downsample", "model_pixel_size_microns", "chunks", "model", "model_version")
    PIXEL_SIZE_MICRONS_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SIZE_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_PIXEL_SIZE_MICRONS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    pixel_size_microns: float
    pixel_size_source: str
    pixel_size_problem: str
    downsample: float
    model_pixel_size_microns: float
    chunks: _containers.RepeatedCompositeFieldContainer[PlannedChunk]
    model: str
    model_version: str
    def __init__(self, pixel_size_microns: _Optional[float] = ..., pixel_size_source: _Optional[str] = ..., pixel_size_problem: _Optional[str] = ..., downsample: _Optional[float] = ..., model_pixel_size_microns: _Optional[float] = ..., chunks: _Optional[_Iterable[_Union[PlannedChunk, _Mapping]]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...
