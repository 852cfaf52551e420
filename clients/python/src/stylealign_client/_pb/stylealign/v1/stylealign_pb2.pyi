import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ShareNorm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_NORM_UNSPECIFIED: _ClassVar[ShareNorm]
    SHARE_NORM_BOTH: _ClassVar[ShareNorm]
    SHARE_NORM_GROUP: _ClassVar[ShareNorm]
    SHARE_NORM_LAYER: _ClassVar[ShareNorm]
    SHARE_NORM_DISABLED: _ClassVar[ShareNorm]

class ShareAttn(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_ATTN_UNSPECIFIED: _ClassVar[ShareAttn]
    SHARE_ATTN_Q_K: _ClassVar[ShareAttn]
    SHARE_ATTN_Q_K_V: _ClassVar[ShareAttn]
    SHARE_ATTN_DISABLED: _ClassVar[ShareAttn]

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_DDIM: _ClassVar[Sampler]
    SAMPLER_EULER: _ClassVar[Sampler]
    SAMPLER_EULER_A: _ClassVar[Sampler]
    SAMPLER_DPMPP_2M: _ClassVar[Sampler]
    SAMPLER_DPMPP_2M_KARRAS: _ClassVar[Sampler]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]

class Family(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAMILY_UNSPECIFIED: _ClassVar[Family]
    FAMILY_SD1: _ClassVar[Family]
    FAMILY_SD2: _ClassVar[Family]
    FAMILY_SDXL: _ClassVar[Family]
SHARE_NORM_UNSPECIFIED: ShareNorm
SHARE_NORM_BOTH: ShareNorm
SHARE_NORM_GROUP: ShareNorm
SHARE_NORM_LAYER: ShareNorm
SHARE_NORM_DISABLED: ShareNorm
SHARE_ATTN_UNSPECIFIED: ShareAttn
SHARE_ATTN_Q_K: ShareAttn
SHARE_ATTN_Q_K_V: ShareAttn
SHARE_ATTN_DISABLED: ShareAttn
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_DDIM: Sampler
SAMPLER_EULER: Sampler
SAMPLER_EULER_A: Sampler
SAMPLER_DPMPP_2M: Sampler
SAMPLER_DPMPP_2M_KARRAS: Sampler
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority
FAMILY_UNSPECIFIED: Family
FAMILY_SD1: Family
FAMILY_SD2: Family
FAMILY_SDXL: Family

class OfficialArgs(_message.Message):
    __slots__ = ("share_group_norm", "share_layer_norm", "share_attention", "adain_queries", "adain_keys", "adain_values", "full_attention_share", "shared_score_scale", "shared_score_shift", "only_self_level")
    SHARE_GROUP_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARE_LAYER_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARE_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ADAIN_QUERIES_FIELD_NUMBER: _ClassVar[int]
    ADAIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    ADAIN_VALUES_FIELD_NUMBER: _ClassVar[int]
    FULL_ATTENTION_SHARE_FIELD_NUMBER: _ClassVar[int]
    SHARED_SCORE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SHARED_SCORE_SHIFT_FIELD_NUMBER: _ClassVar[int]
    ONLY_SELF_LEVEL_FIELD_NUMBER: _ClassVar[int]
    share_group_norm: bool
    share_layer_norm: bool
    share_attention: bool
    adain_queries: bool
    adain_keys: bool
    adain_values: bool
    full_attention_share: bool
    shared_score_scale: float
    shared_score_shift: float
    only_self_level: float
    def __init__(self, share_group_norm: _Optional[bool] = ..., share_layer_norm: _Optional[bool] = ..., share_attention: _Optional[bool] = ..., adain_queries: _Optional[bool] = ..., adain_keys: _Optional[bool] = ..., adain_values: _Optional[bool] = ..., full_attention_share: _Optional[bool] = ..., shared_score_scale: _Optional[float] = ..., shared_score_shift: _Optional[float] = ..., only_self_level: _Optional[float] = ...) -> None: ...

class PatchModelRequest(_message.Message):
    __slots__ = ("model", "share_norm", "share_attn", "scale", "advanced", "window", "levels", "loras")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARE_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARE_ATTN_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ADVANCED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    share_norm: ShareNorm
    share_attn: ShareAttn
    scale: float
    advanced: OfficialArgs
    window: StepWindow
    levels: _containers.RepeatedCompositeFieldContainer[LevelOptions]
    loras: _containers.RepeatedCompositeFieldContainer[LoraWeight]
    def __init__(self, model: _Optional[str] = ..., share_norm: _Optional[_Union[ShareNorm, str]] = ..., share_attn: _Optional[_Union[ShareAttn, str]] = ..., scale: _Optional[float] = ..., advanced: _Optional[_Union[OfficialArgs, _Mapping]] = ..., window: _Optional[_Union[StepWindow, _Mapping]] = ..., levels: _Optional[_Iterable[_Union[LevelOptions, _Mapping]]] = ..., loras: _Optional[_Iterable[_Union[LoraWeight, _Mapping]]] = ...) -> None: ...

class LoraWeight(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class StepWindow(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: float
    end: float
    def __init__(self, start: _Optional[float] = ..., end: _Optional[float] = ...) -> None: ...

class LevelOptions(_message.Message):
    __slots__ = ("name", "enabled", "gain", "share_group_norm", "share_attention")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    SHARE_GROUP_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARE_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    enabled: bool
    gain: float
    share_group_norm: bool
    share_attention: bool
    def __init__(self, name: _Optional[str] = ..., enabled: _Optional[bool] = ..., gain: _Optional[float] = ..., share_group_norm: _Optional[bool] = ..., share_attention: _Optional[bool] = ...) -> None: ...

class NodeOptions(_message.Message):
    __slots__ = ("share_norm", "share_attn", "scale")
    SHARE_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARE_ATTN_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    share_norm: ShareNorm
    share_attn: ShareAttn
    scale: float
    def __init__(self, share_norm: _Optional[_Union[ShareNorm, str]] = ..., share_attn: _Optional[_Union[ShareAttn, str]] = ..., scale: _Optional[float] = ...) -> None: ...

class ResolvedOfficialArgs(_message.Message):
    __slots__ = ("share_group_norm", "share_layer_norm", "share_attention", "adain_queries", "adain_keys", "adain_values", "full_attention_share", "shared_score_scale", "shared_score_shift", "only_self_level")
    SHARE_GROUP_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARE_LAYER_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARE_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ADAIN_QUERIES_FIELD_NUMBER: _ClassVar[int]
    ADAIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    ADAIN_VALUES_FIELD_NUMBER: _ClassVar[int]
    FULL_ATTENTION_SHARE_FIELD_NUMBER: _ClassVar[int]
    SHARED_SCORE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SHARED_SCORE_SHIFT_FIELD_NUMBER: _ClassVar[int]
    ONLY_SELF_LEVEL_FIELD_NUMBER: _ClassVar[int]
    share_group_norm: bool
    share_layer_norm: bool
    share_attention: bool
    adain_queries: bool
    adain_keys: bool
    adain_values: bool
    full_attention_share: bool
    shared_score_scale: float
    shared_score_shift: float
    only_self_level: float
    def __init__(self, share_group_norm: _Optional[bool] = ..., share_layer_norm: _Optional[bool] = ..., share_attention: _Optional[bool] = ..., adain_queries: _Optional[bool] = ..., adain_keys: _Optional[bool] = ..., adain_values: _Optional[bool] = ..., full_attention_share: _Optional[bool] = ..., shared_score_scale: _Optional[float] = ..., shared_score_shift: _Optional[float] = ..., only_self_level: _Optional[float] = ...) -> None: ...

class Switches(_message.Message):
    __slots__ = ("share_group_norm", "share_layer_norm", "adain_site", "adain_q", "adain_k", "adain_v", "share_attention", "full_attention_share", "score_shift", "gain", "only_self_level")
    SHARE_GROUP_NORM_FIELD_NUMBER: _ClassVar[int]
    SHARE_LAYER_NORM_FIELD_NUMBER: _ClassVar[int]
    ADAIN_SITE_FIELD_NUMBER: _ClassVar[int]
    ADAIN_Q_FIELD_NUMBER: _ClassVar[int]
    ADAIN_K_FIELD_NUMBER: _ClassVar[int]
    ADAIN_V_FIELD_NUMBER: _ClassVar[int]
    SHARE_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    FULL_ATTENTION_SHARE_FIELD_NUMBER: _ClassVar[int]
    SCORE_SHIFT_FIELD_NUMBER: _ClassVar[int]
    GAIN_FIELD_NUMBER: _ClassVar[int]
    ONLY_SELF_LEVEL_FIELD_NUMBER: _ClassVar[int]
    share_group_norm: bool
    share_layer_norm: bool
    adain_site: str
    adain_q: bool
    adain_k: bool
    adain_v: bool
    share_attention: bool
    full_attention_share: bool
    score_shift: float
    gain: float
    only_self_level: float
    def __init__(self, share_group_norm: _Optional[bool] = ..., share_layer_norm: _Optional[bool] = ..., adain_site: _Optional[str] = ..., adain_q: _Optional[bool] = ..., adain_k: _Optional[bool] = ..., adain_v: _Optional[bool] = ..., share_attention: _Optional[bool] = ..., full_attention_share: _Optional[bool] = ..., score_shift: _Optional[float] = ..., gain: _Optional[float] = ..., only_self_level: _Optional[float] = ...) -> None: ...

class PatchOptions(_message.Message):
    __slots__ = ("node", "official", "switches", "window", "levels")
    NODE_FIELD_NUMBER: _ClassVar[int]
    OFFICIAL_FIELD_NUMBER: _ClassVar[int]
    SWITCHES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    node: NodeOptions
    official: ResolvedOfficialArgs
    switches: Switches
    window: StepWindow
    levels: _containers.RepeatedCompositeFieldContainer[LevelOptions]
    def __init__(self, node: _Optional[_Union[NodeOptions, _Mapping]] = ..., official: _Optional[_Union[ResolvedOfficialArgs, _Mapping]] = ..., switches: _Optional[_Union[Switches, _Mapping]] = ..., window: _Optional[_Union[StepWindow, _Mapping]] = ..., levels: _Optional[_Iterable[_Union[LevelOptions, _Mapping]]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "model", "options", "created_at", "expires_at", "idle_ttl_seconds", "loras")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    options: PatchOptions
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    idle_ttl_seconds: int
    loras: _containers.RepeatedCompositeFieldContainer[LoraWeight]
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., options: _Optional[_Union[PatchOptions, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idle_ttl_seconds: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[LoraWeight, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompts", "count", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "sampler", "priority", "reference_image", "reference_caption", "reference_offset", "reference_guidance_scale", "size_conditioning", "init_images", "controls")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_CAPTION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SIZE_CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    count: int
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    sampler: Sampler
    priority: Priority
    reference_image: bytes
    reference_caption: str
    reference_offset: int
    reference_guidance_scale: float
    size_conditioning: SizeConditioning
    init_images: _containers.RepeatedCompositeFieldContainer[InitImage]
    controls: _containers.RepeatedCompositeFieldContainer[Control]
    def __init__(self, session_id: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ..., negative_prompt: _Optional[str] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., priority: _Optional[_Union[Priority, str]] = ..., reference_image: _Optional[bytes] = ..., reference_caption: _Optional[str] = ..., reference_offset: _Optional[int] = ..., reference_guidance_scale: _Optional[float] = ..., size_conditioning: _Optional[_Union[SizeConditioning, _Mapping]] = ..., init_images: _Optional[_Iterable[_Union[InitImage, _Mapping]]] = ..., controls: _Optional[_Iterable[_Union[Control, _Mapping]]] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("model", "images", "conditioning_scale", "start", "end")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_SCALE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    conditioning_scale: float
    start: float
    end: float
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ..., conditioning_scale: _Optional[float] = ..., start: _Optional[float] = ..., end: _Optional[float] = ...) -> None: ...

class InitImage(_message.Message):
    __slots__ = ("index", "image", "strength")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    index: int
    image: bytes
    strength: float
    def __init__(self, index: _Optional[int] = ..., image: _Optional[bytes] = ..., strength: _Optional[float] = ...) -> None: ...

class SizeConditioning(_message.Message):
    __slots__ = ("original_width", "original_height", "crop_top", "crop_left", "target_width", "target_height")
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CROP_TOP_FIELD_NUMBER: _ClassVar[int]
    CROP_LEFT_FIELD_NUMBER: _ClassVar[int]
    TARGET_WIDTH_FIELD_NUMBER: _ClassVar[int]
    TARGET_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    original_width: int
    original_height: int
    crop_top: int
    crop_left: int
    target_width: int
    target_height: int
    def __init__(self, original_width: _Optional[int] = ..., original_height: _Optional[int] = ..., crop_top: _Optional[int] = ..., crop_left: _Optional[int] = ..., target_width: _Optional[int] = ..., target_height: _Optional[int] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position", "queue_depth")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    position: int
    queue_depth: int
    def __init__(self, position: _Optional[int] = ..., queue_depth: _Optional[int] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("batch_rows", "batch_sets", "queue_seconds")
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SETS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    batch_rows: int
    batch_sets: int
    queue_seconds: float
    def __init__(self, batch_rows: _Optional[int] = ..., batch_sets: _Optional[int] = ..., queue_seconds: _Optional[float] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total_steps")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("index", "prompt", "width", "height", "seed", "png", "parameters")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    index: int
    prompt: str
    width: int
    height: int
    seed: int
    png: bytes
    parameters: str
    def __init__(self, index: _Optional[int] = ..., prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., png: _Optional[bytes] = ..., parameters: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("queued", "started", "progress", "image")
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    queued: Queued
    started: Started
    progress: Progress
    image: GeneratedImage
    def __init__(self, queued: _Optional[_Union[Queued, _Mapping]] = ..., started: _Optional[_Union[Started, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., image: _Optional[_Union[GeneratedImage, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReleaseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "native_width", "native_height", "size_multiple", "source", "hash", "max_size", "max_batch_rows", "format", "dtype", "prediction_type", "prediction_type_source", "ema")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    NATIVE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    NATIVE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TYPE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TYPE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    EMA_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: Family
    native_width: int
    native_height: int
    size_multiple: int
    source: str
    hash: str
    max_size: int
    max_batch_rows: int
    format: str
    dtype: str
    prediction_type: str
    prediction_type_source: str
    ema: bool
    def __init__(self, name: _Optional[str] = ..., family: _Optional[_Union[Family, str]] = ..., native_width: _Optional[int] = ..., native_height: _Optional[int] = ..., size_multiple: _Optional[int] = ..., source: _Optional[str] = ..., hash: _Optional[str] = ..., max_size: _Optional[int] = ..., max_batch_rows: _Optional[int] = ..., format: _Optional[str] = ..., dtype: _Optional[str] = ..., prediction_type: _Optional[str] = ..., prediction_type_source: _Optional[str] = ..., ema: _Optional[bool] = ...) -> None: ...

class ControlNetInfo(_message.Message):
    __slots__ = ("name", "family", "source", "hash", "models")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: Family
    source: str
    hash: str
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[_Union[Family, str]] = ..., source: _Optional[str] = ..., hash: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "samplers", "max_prompts", "max_steps", "max_size", "default_steps", "default_guidance_scale", "memory_budget_bytes", "controlnets")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLERS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_STEPS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    samplers: _containers.RepeatedScalarFieldContainer[str]
    max_prompts: int
    max_steps: int
    max_size: int
    default_steps: int
    default_guidance_scale: float
    memory_budget_bytes: int
    controlnets: _containers.RepeatedCompositeFieldContainer[ControlNetInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., samplers: _Optional[_Iterable[str]] = ..., max_prompts: _Optional[int] = ..., max_steps: _Optional[int] = ..., max_size: _Optional[int] = ..., default_steps: _Optional[int] = ..., default_guidance_scale: _Optional[float] = ..., memory_budget_bytes: _Optional[int] = ..., controlnets: _Optional[_Iterable[_Union[ControlNetInfo, _Mapping]]] = ...) -> None: ...

class ListLorasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoraInfo(_message.Message):
    __slots__ = ("name", "family", "format", "rank", "layers", "hash", "size_bytes", "memory_bytes", "models", "problems")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: Family
    format: str
    rank: int
    layers: int
    hash: str
    size_bytes: int
    memory_bytes: int
    models: _containers.RepeatedScalarFieldContainer[str]
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[_Union[Family, str]] = ..., format: _Optional[str] = ..., rank: _Optional[int] = ..., layers: _Optional[int] = ..., hash: _Optional[str] = ..., size_bytes: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class ListLorasResponse(_message.Message):
    __slots__ = ("loras", "cache_budget_bytes")
    LORAS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[LoraInfo]
    cache_budget_bytes: int
    def __init__(self, loras: _Optional[_Iterable[_Union[LoraInfo, _Mapping]]] = ..., cache_budget_bytes: _Optional[int] = ...) -> None: ...
