from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("item_id", "behavior", "timestamp")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    behavior: str
    timestamp: int
    def __init__(self, item_id: _Optional[str] = ..., behavior: _Optional[str] = ..., timestamp: _Optional[int] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "recent_events", "exclude_item_ids", "include_seen", "category", "request_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RECENT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    recent_events: _containers.RepeatedCompositeFieldContainer[Event]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_seen: bool
    category: str
    request_id: str
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., recent_events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_seen: _Optional[bool] = ..., category: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "recall_score", "channel", "title", "category")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RECALL_SCORE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    recall_score: float
    channel: str
    title: str
    category: str
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., recall_score: _Optional[float] = ..., channel: _Optional[str] = ..., title: _Optional[str] = ..., category: _Optional[str] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("recall_us", "rank_us", "total_us")
    RECALL_US_FIELD_NUMBER: _ClassVar[int]
    RANK_US_FIELD_NUMBER: _ClassVar[int]
    TOTAL_US_FIELD_NUMBER: _ClassVar[int]
    recall_us: int
    rank_us: int
    total_us: int
    def __init__(self, recall_us: _Optional[int] = ..., rank_us: _Optional[int] = ..., total_us: _Optional[int] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "model_version", "index_version", "timings", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    index_version: str
    timings: StageTimings
    request_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...
