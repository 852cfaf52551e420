"""The values the client returns: models, sessions, and the events of a Generate stream."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Union

from PIL import Image

from ._pb.stylealign.v1 import stylealign_pb2 as pb

# Option values as ComfyUI's StyleAlignedBatchAlign node spells them, and the proto's enums.
SHARE_NORM = {"both": pb.SHARE_NORM_BOTH, "group": pb.SHARE_NORM_GROUP, "layer": pb.SHARE_NORM_LAYER, "disabled": pb.SHARE_NORM_DISABLED}
SHARE_ATTN = {"q+k": pb.SHARE_ATTN_Q_K, "q+k+v": pb.SHARE_ATTN_Q_K_V, "disabled": pb.SHARE_ATTN_DISABLED}
SAMPLERS = {"ddim": pb.SAMPLER_DDIM, "euler": pb.SAMPLER_EULER, "euler_a": pb.SAMPLER_EULER_A, "dpmpp_2m": pb.SAMPLER_DPMPP_2M, "dpmpp_2m_karras": pb.SAMPLER_DPMPP_2M_KARRAS}
PRIORITIES = {"low": pb.PRIORITY_LOW, "normal": pb.PRIORITY_NORMAL, "high": pb.PRIORITY_HIGH}


def _enum_name(mapping: dict[str, int], value: int) -> str:
    for name, v in mapping.items():
        if v == value:
            return name
    return str(value)


def _family(value: int) -> str:
    return pb.Family.Name(value).removeprefix("FAMILY_") if value in pb.Family.values() else str(value)


def _timestamp(ts) -> datetime | None:
    return ts.ToDatetime(tzinfo=timezone.utc) if ts.seconds or ts.nanos else None


@dataclass(frozen=True)
class ModelInfo:
    """A model the server has loaded."""

    name: str
    family: str  # "SD1", "SD2" or "SDXL"
    native_width: int
    native_height: int
    size_multiple: int
    source: str
    hash: str  # A1111-style short hash ("" from servers that do not report one)
    # The largest width and height, and the most images of a request, that the server's memory
    # budget admits for this model (0 from servers that do not report them).
    max_size: int = 0
    max_batch_rows: int = 0
    # How it is stored ("diffusers", "single_file", "embedded"), the dtype of its UNet weights as
    # stored ("fp32", "fp16", "bf16"), what the UNet predicts ("epsilon", "v_prediction") and
    # where that comes from ("config", "sidecar", "option", "family_default"); whether a single
    # file's UNet was read from its EMA weights. Empty from servers that do not report them.
    format: str = ""
    dtype: str = ""
    prediction_type: str = ""
    prediction_type_source: str = ""
    ema: bool = False

    @classmethod
    def _from_pb(cls, m: pb.ModelInfo) -> "ModelInfo":
        return cls(
            m.name,
            _family(m.family),
            m.native_width,
            m.native_height,
            m.size_multiple,
            m.source,
            m.hash,
            m.max_size,
            m.max_batch_rows,
            m.format,
            m.dtype,
            m.prediction_type,
            m.prediction_type_source,
            m.ema,
        )


@dataclass(frozen=True)
class LoraInfo:
    """A LoRA of the server's LoRA folder (usable in `patch_model(loras=...)`)."""

    name: str  # the file's stem
    family: str  # "SD1", "SD2", "SDXL" or "UNSPECIFIED"
    format: str  # "kohya" or "peft" ("" when it fits no served model)
    rank: int
    layers: int  # how many layers it adapts
    hash: str  # A1111-style short hash of the file
    size_bytes: int
    memory_bytes: int  # once loaded, counted against the server's LoRA cache budget
    models: list[str]  # the served models it fits
    problems: list[str]  # "model: reason" for the served models it does not fit

    @classmethod
    def _from_pb(cls, l: pb.LoraInfo) -> "LoraInfo":
        return cls(l.name, _family(l.family), l.format, l.rank, l.layers, l.hash, l.size_bytes, l.memory_bytes, list(l.models), list(l.problems))


@dataclass(frozen=True)
class Loras:
    """`ListLoras`: the LoRA folder. Iterating gives the LoRAs; ``"ink" in loras`` tests a name;
    ``loras["ink"]`` gets one by name."""

    loras: list[LoraInfo]
    cache_budget_bytes: int

    @classmethod
    def _from_pb(cls, r: pb.ListLorasResponse) -> "Loras":
        return cls([LoraInfo._from_pb(l) for l in r.loras], r.cache_budget_bytes)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.loras]

    def __iter__(self) -> Iterator[LoraInfo]:
        return iter(self.loras)

    def __len__(self) -> int:
        return len(self.loras)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> LoraInfo:
        for l in self.loras:
            if l.name == name:
                return l
        raise KeyError(f"LoRA {name!r} is not served (served: {', '.join(self.names) or 'none'})")


@dataclass(frozen=True)
class ControlNetInfo:
    """A ControlNet the server serves (usable in `generate(controls=...)`)."""

    name: str
    family: str  # "SD1", "SD2" or "SDXL"
    source: str  # a diffusers folder, a .safetensors file, or "<embedded>"
    hash: str  # A1111-style short hash of its weights file
    models: list[str]  # the served models it fits

    @classmethod
    def _from_pb(cls, c: pb.ControlNetInfo) -> "ControlNetInfo":
        return cls(c.name, _family(c.family), c.source, c.hash, list(c.models))


@dataclass(frozen=True)
class Models:
    """`ListModels`: the loaded models, the samplers, the server's limits and the ControlNets.
    Iterating gives the models; ``"tiny" in models`` tests a name; ``models["tiny"]`` gets one by
    name; ``models.controlnet("tiny-controlnet")`` gets a ControlNet by name."""

    models: list[ModelInfo]
    samplers: list[str]
    max_prompts: int
    max_steps: int
    max_size: int
    default_steps: int
    default_guidance_scale: float
    # The server's memory budget for requests, in bytes (0 from servers that do not report it).
    memory_budget_bytes: int = 0
    # The ControlNets usable in `generate(controls=...)` (empty from servers without any).
    controlnets: list[ControlNetInfo] = field(default_factory=list)

    @classmethod
    def _from_pb(cls, r: pb.ListModelsResponse) -> "Models":
        return cls(
            [ModelInfo._from_pb(m) for m in r.models],
            list(r.samplers),
            r.max_prompts,
            r.max_steps,
            r.max_size,
            r.default_steps,
            r.default_guidance_scale,
            r.memory_budget_bytes,
            [ControlNetInfo._from_pb(c) for c in r.controlnets],
        )

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __getitem__(self, name: str) -> ModelInfo:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"model {name!r} is not loaded (loaded: {', '.join(self.names) or 'none'})")

    @property
    def controlnet_names(self) -> list[str]:
        return [c.name for c in self.controlnets]

    def controlnet(self, name: str) -> ControlNetInfo:
        """The served ControlNet called `name` (KeyError when there is none)."""
        for c in self.controlnets:
            if c.name == name:
                return c
        raise KeyError(f"ControlNet {name!r} is not served (served: {', '.join(self.controlnet_names) or 'none'})")


@dataclass(frozen=True)
class Control:
    """A ControlNet on the targets of a set (`generate(controls=[...])`).

    `model`: a ControlNet of `Models.controlnets` that fits the session's model; `images`: one
    control image for every target, or a list of one per target in target order (each PNG/JPEG
    bytes, a file path or a PIL image); `conditioning_scale` (default 1.0), `start` and `end`
    (fractions of the schedule, default 0 and 1): unset takes the server's defaults.
    """

    model: str
    images: Any
    conditioning_scale: float | None = None
    start: float | None = None
    end: float | None = None


@dataclass(frozen=True)
class Session:
    """A session (`PatchModel`): a model plus resolved StyleAligned options.

    `options` is ``{"flavour": "node", "share_norm": "both", "share_attn": "q+k", "scale": 1.0}``
    (option values spelled as the ComfyUI node spells them) or ``{"flavour": "official", ...}``
    with every official argument; `switches` is what the patch executes. `window` is the step
    window ``(start, end)`` and `levels` every UNet level of the model with what the patch does
    there (``{"down.0": {"enabled": True, "gain": 1.0, "share_group_norm": True,
    "share_attention": True}, ...}``).
    """

    session_id: str
    model: str
    options: dict[str, Any]
    switches: dict[str, Any]
    created_at: datetime | None
    expires_at: datetime | None
    idle_ttl_seconds: int
    window: tuple[float, float] = (0.0, 1.0)
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The session's LoRAs: name -> weight, in the order given.
    loras: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.session_id

    @classmethod
    def _from_pb(cls, s: pb.Session) -> "Session":
        flavour = s.options.WhichOneof("flavour")
        if flavour == "node":
            n = s.options.node
            options = {"flavour": "node", "share_norm": _enum_name(SHARE_NORM, n.share_norm), "share_attn": _enum_name(SHARE_ATTN, n.share_attn), "scale": n.scale}
        elif flavour == "official":
            options = {"flavour": "official", **_fields(s.options.official)}
        else:
            options = {"flavour": None}
        window = (s.options.window.start, s.options.window.end) if s.options.HasField("window") else (0.0, 1.0)
        levels = {lv.name: {k: v for k, v in _fields(lv).items() if k != "name"} for lv in s.options.levels}
        return cls(
            s.session_id,
            s.model,
            options,
            _fields(s.options.switches),
            _timestamp(s.created_at),
            _timestamp(s.expires_at),
            s.idle_ttl_seconds,
            window,
            levels,
            {l.name: l.weight for l in s.loras},
        )


def _fields(msg) -> dict[str, Any]:
    """Every field of a flat message by name, defaults included."""
    return {f.name: getattr(msg, f.name) for f in msg.DESCRIPTOR.fields}


@dataclass(frozen=True)
class Queued:
    """Waiting in the admission queue: `position` requests ahead, `queue_depth` in all."""

    position: int
    queue_depth: int


@dataclass(frozen=True)
class Started:
    """The set joined a UNet batch of `batch_rows` images from `batch_sets` requests."""

    batch_rows: int
    batch_sets: int
    queue_seconds: float


@dataclass(frozen=True)
class Progress:
    """Denoising step `step` of `total_steps` is done."""

    step: int
    total_steps: int


@dataclass(frozen=True, eq=False)
class ImageResult:
    """One generated image.

    `image` is the decoded PIL image; its ``.info`` holds the PNG's text chunks (``parameters``,
    and ``stylealign`` on servers that write one). `metadata` is the image's JSON parameters as a
    dict: from the ``stylealign`` chunk, else from ``parameters`` when that chunk is JSON (older
    servers); None when the PNG has neither. `infotext` is the ``parameters`` chunk when it is an
    A1111-style infotext rather than JSON. `png` is the PNG bytes as received.
    """

    index: int
    prompt: str
    seed: int
    width: int
    height: int
    is_reference: bool
    png: bytes = field(repr=False)
    image: Image.Image = field(repr=False)
    metadata: dict[str, Any] | None = field(repr=False)
    infotext: str | None = field(repr=False)
    parameters: str = field(repr=False)  # the message's `parameters` field, as sent

    @property
    def text(self) -> dict[str, str]:
        """The PNG's text chunks."""
        return {k: v for k, v in self.image.info.items() if isinstance(v, str)}

    def save(self, path) -> None:
        """Writes the PNG bytes as received (metadata included)."""
        with open(path, "wb") as f:
            f.write(self.png)

    @classmethod
    def _from_pb(cls, m: pb.GeneratedImage, is_reference: bool) -> "ImageResult":
        png = bytes(m.png)
        image = Image.open(io.BytesIO(png))
        image.load()  # also reads text chunks stored after the image data
        metadata = _json_object(image.info.get("stylealign"))
        parameters_chunk = image.info.get("parameters")
        parameters_json = _json_object(parameters_chunk)
        if metadata is None:
            metadata = parameters_json
        infotext = parameters_chunk if isinstance(parameters_chunk, str) and parameters_json is None else None
        return cls(m.index, m.prompt, m.seed, m.width, m.height, is_reference, png, image, metadata, infotext, m.parameters)


def _json_object(text) -> dict[str, Any] | None:
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


Event = Union[Queued, Started, Progress, ImageResult]


def _event(msg: pb.GenerateResponse, reference_row: bool) -> Event | None:
    kind = msg.WhichOneof("event")
    if kind == "queued":
        return Queued(msg.queued.position, msg.queued.queue_depth)
    if kind == "started":
        return Started(msg.started.batch_rows, msg.started.batch_sets, msg.started.queue_seconds)
    if kind == "progress":
        return Progress(msg.progress.step, msg.progress.total_steps)
    if kind == "image":
        return ImageResult._from_pb(msg.image, reference_row and msg.image.index == 0)
    return None  # an event kind newer than these stubs

