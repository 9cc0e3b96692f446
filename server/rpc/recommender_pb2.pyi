from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("item_id", "behavior", "timestamp", "user_id", "category_id")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_ID_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    behavior: str
    timestamp: int
    user_id: str
    category_id: str
    def __init__(self, item_id: _Optional[str] = ..., behavior: _Optional[str] = ..., timestamp: _Optional[int] = ..., user_id: _Optional[str] = ..., category_id: _Optional[str] = ...) -> None: ...

class LogEventsRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class LogEventsResponse(_message.Message):
    __slots__ = ("accepted", "unknown_items")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_ITEMS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    unknown_items: int
    def __init__(self, accepted: _Optional[int] = ..., unknown_items: _Optional[int] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("changed", "model_version", "index_version")
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    model_version: str
    index_version: str
    def __init__(self, changed: _Optional[bool] = ..., model_version: _Optional[str] = ..., index_version: _Optional[str] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "k", "recent_events", "exclude_item_ids", "include_seen", "category", "request_id", "head_weights", "explain")
    class HeadWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    RECENT_EVENTS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SEEN_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    k: int
    recent_events: _containers.RepeatedCompositeFieldContainer[Event]
    exclude_item_ids: _containers.RepeatedScalarFieldContainer[str]
    include_seen: bool
    category: str
    request_id: str
    head_weights: _containers.ScalarMap[str, float]
    explain: bool
    def __init__(self, user_id: _Optional[str] = ..., k: _Optional[int] = ..., recent_events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., exclude_item_ids: _Optional[_Iterable[str]] = ..., include_seen: _Optional[bool] = ..., category: _Optional[str] = ..., request_id: _Optional[str] = ..., head_weights: _Optional[_Mapping[str, float]] = ..., explain: _Optional[bool] = ...) -> None: ...

class AttendedBehavior(_message.Message):
    __slots__ = ("item_id", "behavior", "timestamp", "weight", "effect")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOR_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    behavior: str
    timestamp: int
    weight: float
    effect: float
    def __init__(self, item_id: _Optional[str] = ..., behavior: _Optional[str] = ..., timestamp: _Optional[int] = ..., weight: _Optional[float] = ..., effect: _Optional[float] = ...) -> None: ...

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score", "recall_score", "channel", "title", "category", "because", "head_scores")
    class HeadScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RECALL_SCORE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    BECAUSE_FIELD_NUMBER: _ClassVar[int]
    HEAD_SCORES_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    recall_score: float
    channel: str
    title: str
    category: str
    because: _containers.RepeatedCompositeFieldContainer[AttendedBehavior]
    head_scores: _containers.ScalarMap[str, float]
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ..., recall_score: _Optional[float] = ..., channel: _Optional[str] = ..., title: _Optional[str] = ..., category: _Optional[str] = ..., because: _Optional[_Iterable[_Union[AttendedBehavior, _Mapping]]] = ..., head_scores: _Optional[_Mapping[str, float]] = ...) -> None: ...

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
    __slots__ = ("items", "model_version", "index_version", "timings", "request_id", "basis")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    model_version: str
    index_version: str
    timings: StageTimings
    request_id: str
    basis: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., model_version: _Optional[str] = ..., index_version: _Optional[str] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., request_id: _Optional[str] = ..., basis: _Optional[str] = ...) -> None: ...
