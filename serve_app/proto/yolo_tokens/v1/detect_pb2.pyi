from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DetectRequest(_message.Message):
    __slots__ = ("images", "model", "conf", "iou", "max_det")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONF_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    MAX_DET_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    model: str
    conf: float
    iou: float
    max_det: int
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., model: _Optional[str] = ..., conf: _Optional[float] = ..., iou: _Optional[float] = ..., max_det: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("class_id", "class_name", "confidence", "box")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    class_name: str
    confidence: float
    box: Box
    def __init__(self, class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., confidence: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class ImageResult(_message.Message):
    __slots__ = ("width", "height", "detections")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("units", "used", "allocation", "remaining")
    UNITS_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    ALLOCATION_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    units: int
    used: int
    allocation: int
    remaining: int
    def __init__(self, units: _Optional[int] = ..., used: _Optional[int] = ..., allocation: _Optional[int] = ..., remaining: _Optional[int] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode", "admit", "infer", "total")
    DECODE_FIELD_NUMBER: _ClassVar[int]
    ADMIT_FIELD_NUMBER: _ClassVar[int]
    INFER_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    decode: float
    admit: float
    infer: float
    total: float
    def __init__(self, decode: _Optional[float] = ..., admit: _Optional[float] = ..., infer: _Optional[float] = ..., total: _Optional[float] = ...) -> None: ...

class DetectReply(_message.Message):
    __slots__ = ("request_id", "model", "images", "usage", "timing_ms", "idempotent_replayed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENT_REPLAYED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: ModelRef
    images: _containers.RepeatedCompositeFieldContainer[ImageResult]
    usage: Usage
    timing_ms: Timing
    idempotent_replayed: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageResult, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timing_ms: _Optional[_Union[Timing, _Mapping]] = ..., idempotent_replayed: _Optional[bool] = ...) -> None: ...

class ModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "key", "cost_units", "imgsz", "backend", "timeout_s", "status", "message")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    COST_UNITS_FIELD_NUMBER: _ClassVar[int]
    IMGSZ_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    key: str
    cost_units: int
    imgsz: int
    backend: str
    timeout_s: float
    status: str
    message: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., key: _Optional[str] = ..., cost_units: _Optional[int] = ..., imgsz: _Optional[int] = ..., backend: _Optional[str] = ..., timeout_s: _Optional[float] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ModelsReply(_message.Message):
    __slots__ = ("default", "models")
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    default: str
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, default: _Optional[str] = ..., models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("image", "seq", "model", "conf", "iou", "max_det")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONF_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    MAX_DET_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    seq: int
    model: str
    conf: float
    iou: float
    max_det: int
    def __init__(self, image: _Optional[bytes] = ..., seq: _Optional[int] = ..., model: _Optional[str] = ..., conf: _Optional[float] = ..., iou: _Optional[float] = ..., max_det: _Optional[int] = ...) -> None: ...

class FrameError(_message.Message):
    __slots__ = ("code", "message", "retry_after_s", "http_status")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    retry_after_s: float
    http_status: int
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., retry_after_s: _Optional[float] = ..., http_status: _Optional[int] = ...) -> None: ...

class FrameResult(_message.Message):
    __slots__ = ("seq", "result", "error", "ends_session")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ENDS_SESSION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    result: DetectReply
    error: FrameError
    ends_session: bool
    def __init__(self, seq: _Optional[int] = ..., result: _Optional[_Union[DetectReply, _Mapping]] = ..., error: _Optional[_Union[FrameError, _Mapping]] = ..., ends_session: _Optional[bool] = ...) -> None: ...
