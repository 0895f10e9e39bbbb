from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class Rejection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_NONE: _ClassVar[Rejection]
    REJECTION_NO_INK: _ClassVar[Rejection]
    REJECTION_NOT_A_DIGIT: _ClassVar[Rejection]
    REJECTION_UNCERTAIN: _ClassVar[Rejection]
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_FLOAT32: DType
REJECTION_NONE: Rejection
REJECTION_NO_INK: Rejection
REJECTION_NOT_A_DIGIT: Rejection
REJECTION_UNCERTAIN: Rejection

class RawPixels(_message.Message):
    __slots__ = ("width", "height", "dtype", "data")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    dtype: DType
    data: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawPixels
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawPixels, _Mapping]] = ...) -> None: ...

class RecognizeRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("digit", "confidence", "probabilities", "accepted", "rejection")
    DIGIT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    digit: int
    confidence: float
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    accepted: bool
    rejection: Rejection
    def __init__(self, digit: _Optional[int] = ..., confidence: _Optional[float] = ..., probabilities: _Optional[_Iterable[float]] = ..., accepted: _Optional[bool] = ..., rejection: _Optional[_Union[Rejection, str]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RecognizeResponse(_message.Message):
    __slots__ = ("predictions", "model")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model: ModelRef
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x", "y", "width", "height")
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    x: int
    y: int
    width: int
    height: int
    def __init__(self, x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ReadDigit(_message.Message):
    __slots__ = ("prediction", "box")
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    prediction: Prediction
    box: Box
    def __init__(self, prediction: _Optional[_Union[Prediction, _Mapping]] = ..., box: _Optional[_Union[Box, _Mapping]] = ...) -> None: ...

class Reading(_message.Message):
    __slots__ = ("text", "confidence", "accepted", "digits", "rejection")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DIGITS_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    text: str
    confidence: float
    accepted: bool
    digits: _containers.RepeatedCompositeFieldContainer[ReadDigit]
    rejection: Rejection
    def __init__(self, text: _Optional[str] = ..., confidence: _Optional[float] = ..., accepted: _Optional[bool] = ..., digits: _Optional[_Iterable[_Union[ReadDigit, _Mapping]]] = ..., rejection: _Optional[_Union[Rejection, str]] = ...) -> None: ...

class ReadRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class ReadResponse(_message.Message):
    __slots__ = ("readings", "model")
    READINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    readings: _containers.RepeatedCompositeFieldContainer[Reading]
    model: ModelRef
    def __init__(self, readings: _Optional[_Iterable[_Union[Reading, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("id", "image")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: Image
    def __init__(self, id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("id", "prediction", "error", "model")
    ID_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    prediction: Prediction
    error: StreamError
    model: ModelRef
    def __init__(self, id: _Optional[str] = ..., prediction: _Optional[_Union[Prediction, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ReadStreamResponse(_message.Message):
    __slots__ = ("id", "reading", "error", "model")
    ID_FIELD_NUMBER: _ClassVar[int]
    READING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    id: str
    reading: Reading
    error: StreamError
    model: ModelRef
    def __init__(self, id: _Optional[str] = ..., reading: _Optional[_Union[Reading, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...
