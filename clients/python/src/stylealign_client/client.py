"""`Client`: the stylealign gRPC API as Python calls."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from typing import Any, Iterable, Iterator, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from ._pb.stylealign.v1 import stylealign_pb2 as pb
from ._pb.stylealign.v1 import stylealign_pb2_grpc as pb_grpc
from .errors import StyleAlignError
from .retry import RetryPolicy
from .types import PRIORITIES, SAMPLERS, SHARE_ATTN, SHARE_NORM, Control, Event, ImageResult, Loras, Models, Session, _event

SERVICE = "stylealign.v1.StyleAlign"

log = logging.getLogger("stylealign_client")

# The official StyleAlignedArgs (PatchModelRequest.advanced), by name: bool or float.
_ADVANCED = {f.name: (bool if f.type == f.TYPE_BOOL else float) for f in pb.OfficialArgs.DESCRIPTOR.fields}
_SIZE_CONDITIONING = [f.name for f in pb.SizeConditioning.DESCRIPTOR.fields]
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def _choice(field: str, value: str, mapping: dict[str, int]) -> int:
    if not isinstance(value, str) or value not in mapping:
        raise ValueError(f"{field}: {value!r} is not one of {', '.join(repr(k) for k in mapping)}")
    return mapping[value]


def _uint(field: str, value: Any, top: int = _U32) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{field}: must be an integer in [0, {top}], got {value!r}")
    return value


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: must be a number, got {value!r}")
    return float(value)


def _text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a string, got {type(value).__name__}")
    return value


def _session_id(session: Session | str) -> str:
    if isinstance(session, Session):
        return session.session_id
    if isinstance(session, str) and session:
        return session
    raise ValueError(f"session: expected a Session or a session id string, got {session!r}")


_ImageInput = (bytes, bytearray, memoryview, str, os.PathLike, Image.Image)


def _image_bytes(value: Any, field: str = "reference_image") -> bytes:
    """An image argument as bytes: bytes as they are, a path read, a PIL image encoded as PNG."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"{field}: cannot read {os.fspath(value)!r}: {e.strerror or e}") from e
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        image = value if value.mode in ("RGB", "RGBA", "L", "LA") else value.convert("RGB")
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"{field}: expected bytes, a path or a PIL.Image, got {type(value).__name__}")


def _init_images(init_images: Any, strength: Any) -> list[pb.InitImage]:
    """`init_images` ({index: image or (image, strength)} or [(index, image[, strength]), ...])
    as InitImage messages, in the order given; `strength` is the default of every entry."""
    if strength is not None:
        strength = _number("strength", strength)
    if isinstance(init_images, Mapping):
        entries = [(index, *(value if isinstance(value, tuple) else (value,))) for index, value in init_images.items()]
    elif isinstance(init_images, (list, tuple)):
        entries = list(init_images)
    else:
        raise ValueError(f"init_images: expected a dict {{index: image}} or a list of (index, image[, strength]), got {type(init_images).__name__}")
    out = []
    for k, entry in enumerate(entries):
        field = f"init_images[{k}]"
        if not isinstance(entry, tuple) or len(entry) not in (2, 3):
            raise ValueError(f"{field}: expected (index, image) or (index, image, strength), got {entry!r}")
        message = pb.InitImage(index=_uint(f"{field}.index", entry[0]), image=_image_bytes(entry[1], f"{field}.image"))
        own = entry[2] if len(entry) == 3 else None
        if own is not None:
            message.strength = _number(f"{field}.strength", own)
        elif strength is not None:
            message.strength = strength
        out.append(message)
    return out


_CONTROL_FIELDS = [f.name for f in dataclasses.fields(Control)]


def _loras(loras: Any) -> list[pb.LoraWeight]:
    """`loras` as a mapping name -> weight, or a list of names (weight 1) and (name, weight) pairs."""
    if loras is None:
        return []
    if isinstance(loras, str):
        raise ValueError(f"loras: expected a mapping name -> weight or a list, got the string {loras!r}")
    items = loras.items() if isinstance(loras, Mapping) else loras
    out = []
    for i, item in enumerate(items):
        name, weight = (item, 1.0) if isinstance(item, str) else item if isinstance(item, (tuple, list)) and len(item) == 2 else (None, None)
        if name is None:
            raise ValueError(f"loras[{i}]: expected a name or a (name, weight) pair, got {item!r}")
        out.append(pb.LoraWeight(name=_text(f"loras[{i}].name", name), weight=_number(f"loras[{i}].weight", weight)))
    return out


def _controls(controls: Any) -> list[pb.Control]:
    """`controls` (a list of `Control` or of dicts with its fields) as Control messages."""
    if not isinstance(controls, (list, tuple)):
        raise ValueError(f"controls: expected a list of Control or dict, got {type(controls).__name__}")
    out = []
    for k, control in enumerate(controls):
        field = f"controls[{k}]"
        if isinstance(control, Mapping):
            unknown = sorted(map(str, set(control) - set(_CONTROL_FIELDS)))
            if unknown:
                raise ValueError(f"{field}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (known: {', '.join(_CONTROL_FIELDS)})")
            if "model" not in control or "images" not in control:
                raise ValueError(f"{field}: needs 'model' and 'images'")
            control = Control(**control)
        elif not isinstance(control, Control):
            raise ValueError(f"{field}: expected a Control or a dict, got {type(control).__name__}")
        images = control.images
        if isinstance(images, _ImageInput):
            images = [images]
        elif not isinstance(images, (list, tuple)):
            raise ValueError(f"{field}.images: expected an image (bytes, a path or a PIL.Image) or a list of them, got {type(images).__name__}")
        message = pb.Control(model=_text(f"{field}.model", control.model), images=[_image_bytes(image, f"{field}.images[{j}]") for j, image in enumerate(images)])
        for name in ("conditioning_scale", "start", "end"):
            value = getattr(control, name)
            if value is not None:
                setattr(message, name, _number(f"{field}.{name}", value))
        out.append(message)
    return out


class Client:
    """A connection to a stylealign server.

        with Client("127.0.0.1:50051") as client:
            session = client.patch_model("tiny", share_norm="group", scale=0.8)
            for event in client.generate(session, ["a fox, linocut print", "a lighthouse, linocut print"], seed=42):
                print(event)

    Args:
        target: ``host:port`` of the gRPC API (any grpcio target string).
        token: bearer token, sent as ``authorization: Bearer <token>`` (servers with auth on).
        client_id: sent as ``x-client-id`` (servers without auth: sessions belong to this id).
        tls: True for TLS with the system's root certificates (or `root_certificates`).
        root_certificates: PEM bytes, or the path of a PEM file; implies TLS.
        credentials: a ready `grpc.ChannelCredentials` (implies TLS; overrides the two above).
        timeout: deadline of each attempt of a unary call, seconds (None: none).
        generate_timeout: deadline of each attempt of Generate, seconds (None: none).
        retry: a `RetryPolicy` for UNAVAILABLE / RESOURCE_EXHAUSTED (default: `RetryPolicy()`).
        max_attempts: shorthand that overrides ``retry.max_attempts``.
        options: extra grpcio channel options, ``[(name, value), ...]``.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        client_id: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = 30.0,
        generate_timeout: float | None = 600.0,
        retry: RetryPolicy | None = None,
        max_attempts: int | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ):
        if not isinstance(target, str) or not target:
            raise ValueError(f"target: expected 'host:port', got {target!r}")
        for name, value in (("timeout", timeout), ("generate_timeout", generate_timeout)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"{name}: must be a positive number of seconds or None, got {value!r}")
        retry = retry if retry is not None else RetryPolicy()
        if not isinstance(retry, RetryPolicy):
            raise ValueError(f"retry: expected a RetryPolicy, got {type(retry).__name__}")
        if max_attempts is not None:
            retry = dataclasses.replace(retry, max_attempts=max_attempts)
        self.retry = retry
        self.timeout = timeout
        self.generate_timeout = generate_timeout

        metadata = []
        if token is not None:
            if not isinstance(token, str) or not token.strip():
                raise ValueError("token: must be a non-empty string")
            metadata.append(("authorization", "Bearer " + token.strip()))
        if client_id is not None:
            if not isinstance(client_id, str) or not client_id.strip():
                raise ValueError("client_id: must be a non-empty string")
            metadata.append(("x-client-id", client_id.strip()))
        self._metadata = tuple(metadata)

        channel_options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 64 << 20), *options]
        if credentials is None and (tls or root_certificates is not None):
            roots = root_certificates
            if isinstance(roots, (str, os.PathLike)):
                try:
                    with open(roots, "rb") as f:
                        roots = f.read()
                except OSError as e:
                    raise ValueError(f"root_certificates: cannot read {os.fspath(root_certificates)!r}: {e.strerror or e}") from e
            credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        if credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        self._stub = pb_grpc.StyleAlignStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel (calls in flight are cancelled)."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------------

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.2) -> None:
        """Waits until grpc.health.v1 reports SERVING overall and for the service (models loaded
        and warmed up). Raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                statuses = [self._health.Check(health_pb2.HealthCheckRequest(service=s), timeout=max(0.1, min(5.0, deadline - time.monotonic()))).status for s in ("", SERVICE)]
                if all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses):
                    return
                last = "status " + ", ".join(health_pb2.HealthCheckResponse.ServingStatus.Name(s) for s in statuses)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() + poll > deadline:
                raise TimeoutError(f"server not SERVING after {timeout:g}s ({last})")
            time.sleep(poll)

    def list_models(self) -> Models:
        """The loaded models, samplers and server limits."""
        return Models._from_pb(self._unary("ListModels", pb.ListModelsRequest()))

    def list_loras(self) -> Loras:
        """The LoRAs of the server's LoRA folder, each with its family, format and the models it fits."""
        return Loras._from_pb(self._unary("ListLoras", pb.ListLorasRequest()))

    def patch_model(
        self,
        model: str,
        share_norm: str = "both",
        share_attn: str = "q+k",
        scale: float = 1.0,
        *,
        window: tuple[float, float] | None = None,
        levels: Mapping[str, Mapping[str, bool | float]] | None = None,
        loras: Mapping[str, float] | Iterable[str | tuple[str, float]] | None = None,
        **advanced: bool | float,
    ) -> Session:
        """Creates a session on `model` with the StyleAligned options.

        `share_norm` (``"both"``, ``"group"``, ``"layer"``, ``"disabled"``), `share_attn`
        (``"q+k"``, ``"q+k+v"``, ``"disabled"``) and `scale` are the ComfyUI node's options.
        Keyword arguments named after the official ``StyleAlignedArgs`` (``share_group_norm``,
        ``share_layer_norm``, ``share_attention``, ``adain_queries``, ``adain_keys``,
        ``adain_values``, ``full_attention_share``: bool; ``shared_score_scale``,
        ``shared_score_shift``, ``only_self_level``: float) select the official semantics
        instead; then the node options must keep their defaults.

        Where and when the patch acts (docs/style-sharing.md), with either flavour: `window`
        ``(start, end)``, fractions of the schedule; `levels` maps a UNet level (``"down.0"``,
        ``"mid"``, ``"up.1"``, ``"out"``, ...) to its options (``enabled``, ``share_group_norm``,
        ``share_attention``: bool; ``gain``: float), e.g. ``{"up.1": {"enabled": False}}``.

        `loras`: LoRAs of the server's LoRA folder (`list_loras()`) applied to every image of the
        session, e.g. ``{"ink": 0.8, "paper": -0.5}`` or ``["ink", ("paper", -0.5)]`` (weight 1
        when left out; weights may be negative).
        """
        request = pb.PatchModelRequest(model=_text("model", model), loras=_loras(loras))
        if window is not None:
            if not isinstance(window, (tuple, list)) or len(window) != 2:
                raise ValueError(f"window: must be (start, end), got {window!r}")
            request.window.start = _number("window.start", window[0])
            request.window.end = _number("window.end", window[1])
        for i, (name, opts) in enumerate((levels or {}).items()):
            level = request.levels.add(name=_text(f"levels[{i}].name", name))
            if not isinstance(opts, Mapping):
                raise ValueError(f"levels[{i}]: the options of {name!r} must be a mapping, got {opts!r}")
            for key, value in opts.items():
                if key == "gain":
                    level.gain = _number(f"levels[{i}].gain", value)
                elif key in ("enabled", "share_group_norm", "share_attention"):
                    if not isinstance(value, bool):
                        raise ValueError(f"levels[{i}].{key}: must be True or False, got {value!r}")
                    setattr(level, key, value)
                else:
                    raise ValueError(f"levels[{i}]: unknown option {key!r} (enabled, gain, share_group_norm, share_attention)")
        unknown = sorted(set(advanced) - set(_ADVANCED))
        if unknown:
            raise TypeError(f"patch_model: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} (node options: share_norm, share_attn, scale; advanced options: {', '.join(_ADVANCED)})")
        if advanced:
            if (share_norm, share_attn, scale) != ("both", "q+k", 1.0):
                raise ValueError("share_norm, share_attn, scale: the node options cannot be combined with advanced (official) options")
            request.advanced.SetInParent()
            for name, value in advanced.items():
                if _ADVANCED[name] is bool:
                    if not isinstance(value, bool):
                        raise ValueError(f"advanced.{name}: must be True or False, got {value!r}")
                    setattr(request.advanced, name, value)
                else:
                    setattr(request.advanced, name, _number(f"advanced.{name}", value))
        else:
            request.share_norm = _choice("share_norm", share_norm, SHARE_NORM)
            request.share_attn = _choice("share_attn", share_attn, SHARE_ATTN)
            request.scale = _number("scale", scale)
        return Session._from_pb(self._unary("PatchModel", request))

    def get_session(self, session: Session | str) -> Session:
        """The session (with its expiry pushed back). NOT_FOUND once released or expired."""
        return Session._from_pb(self._unary("GetSession", pb.GetSessionRequest(session_id=_session_id(session))))

    def release_session(self, session: Session | str) -> None:
        """Drops the session."""
        self._unary("ReleaseSession", pb.ReleaseSessionRequest(session_id=_session_id(session)))

    def generate(
        self,
        session: Session | str,
        prompts: Iterable[str] | str,
        *,
        seed: int | None = None,
        steps: int | None = None,
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        width: int | None = None,
        height: int | None = None,
        sampler: str | None = None,
        count: int | None = None,
        priority: str | None = None,
        reference_image: bytes | str | os.PathLike | Image.Image | None = None,
        reference_caption: str | None = None,
        reference_offset: int | None = None,
        reference_guidance_scale: float | None = None,
        size_conditioning: Mapping[str, int] | None = None,
        init_images: Mapping[int, Any] | list[tuple] | None = None,
        strength: float | None = None,
        controls: list[Control | Mapping[str, Any]] | None = None,
        timeout: float | None = None,
    ) -> Iterator[Event]:
        """Generates one style-aligned set; yields `Queued`, `Started`, `Progress` events, then
        one `ImageResult` per image in prompt order. The first prompt is the style reference
        (unless `reference_image` is given). Unset arguments take the server's defaults.

        `sampler`: ``"ddim"``, ``"euler"``, ``"euler_a"``, ``"dpmpp_2m"``,
        ``"dpmpp_2m_karras"``; `priority`: ``"low"``, ``"normal"``, ``"high"``;
        `reference_image`: PNG/JPEG bytes, a file path or a PIL image; `size_conditioning`
        (SDXL): a dict with any of ``original_width``, ``original_height``, ``crop_top``,
        ``crop_left``, ``target_width``, ``target_height``; `timeout`: deadline of each attempt
        (default: the client's `generate_timeout`).

        `init_images` makes targets img2img (docs/img2img.md): ``{index: image}`` (or
        ``{index: (image, strength)}``) or a list of ``(index, image)`` / ``(index, image,
        strength)``, `index` the target's image index (from 1 when the first prompt is the
        reference, from 0 with `reference_image`); `strength` is the default strength of every
        init image (unset: the server's, 0.8). `controls` puts ControlNets on the targets
        (docs/controlnet.md): a list of `Control` or of dicts with its fields (``model``,
        ``images``: one image for every target or a list of one per target, optional
        ``conditioning_scale``, ``start``, ``end``). Images are PNG/JPEG bytes, file paths or PIL
        images, as `reference_image`.

        The arguments are checked at once (ValueError naming the argument); the call starts
        when iteration starts. Closing the iterator early cancels the call.
        """
        request = pb.GenerateRequest(session_id=_session_id(session))
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            _text(f"prompts[{i}]", p)
        request.prompts.extend(prompts)
        if seed is not None:
            request.seed = _uint("seed", seed, _U64)
        if steps is not None:
            request.steps = _uint("steps", steps)
        if negative_prompt is not None:
            request.negative_prompt = _text("negative_prompt", negative_prompt)
        if guidance_scale is not None:
            request.guidance_scale = _number("guidance_scale", guidance_scale)
        if width is not None:
            request.width = _uint("width", width)
        if height is not None:
            request.height = _uint("height", height)
        if sampler is not None:
            request.sampler = _choice("sampler", sampler, SAMPLERS)
        if count is not None:
            request.count = _uint("count", count)
        if priority is not None:
            request.priority = _choice("priority", priority, PRIORITIES)
        if reference_image is not None:
            request.reference_image = _image_bytes(reference_image)
        if reference_caption is not None:
            request.reference_caption = _text("reference_caption", reference_caption)
        if reference_offset is not None:
            request.reference_offset = _uint("reference_offset", reference_offset)
        if reference_guidance_scale is not None:
            request.reference_guidance_scale = _number("reference_guidance_scale", reference_guidance_scale)
        if size_conditioning is not None:
            if not isinstance(size_conditioning, Mapping):
                raise ValueError(f"size_conditioning: expected a dict with keys {', '.join(_SIZE_CONDITIONING)}")
            unknown = sorted(set(size_conditioning) - set(_SIZE_CONDITIONING))
            if unknown:
                raise ValueError(f"size_conditioning: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} (known: {', '.join(_SIZE_CONDITIONING)})")
            request.size_conditioning.SetInParent()
            for key, value in size_conditioning.items():
                setattr(request.size_conditioning, key, _uint(f"size_conditioning.{key}", value))
        if init_images is not None:
            request.init_images.extend(_init_images(init_images, strength))
        elif strength is not None:
            raise ValueError("strength: only with init_images")
        if controls is not None:
            request.controls.extend(_controls(controls))
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError(f"timeout: must be a positive number of seconds, got {timeout!r}")
        return self._stream(request, timeout if timeout is not None else self.generate_timeout, reference_row=reference_image is None)

    def generate_images(self, session: Session | str, prompts: Iterable[str] | str, **kwargs: Any) -> list[ImageResult]:
        """`generate`, keeping only the images (in prompt order)."""
        return [e for e in self.generate(session, prompts, **kwargs) if isinstance(e, ImageResult)]

    # -- retries --------------------------------------------------------------------------------

    def _log_retry(self, name: str, error: StyleAlignError, attempt: int, delay: float) -> None:
        hint = " (as RetryInfo asks)" if error.retry_delay is not None else ""
        log.info("%s: %s: %s; attempt %d of %d failed, retrying in %.3fs%s", name, error.code.name, error.message, attempt, self.retry.max_attempts, delay, hint)

    def _unary(self, name: str, request):
        method = getattr(self._stub, name)
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, metadata=self._metadata, timeout=self.timeout)
            except grpc.RpcError as e:
                error = StyleAlignError.from_rpc_error(e, attempt)
                delay = self.retry.delay(attempt, error)
                if delay is None:
                    raise error from None
                self._log_retry(name, error, attempt, delay)
            time.sleep(delay)

    def _stream(self, request: pb.GenerateRequest, timeout: float | None, reference_row: bool) -> Iterator[Event]:
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.Generate(request, metadata=self._metadata, timeout=timeout)
            received = False
            try:
                for msg in call:
                    received = True
                    event = _event(msg, reference_row)
                    if event is not None:
                        yield event
                return
            except grpc.RpcError as e:
                error = StyleAlignError.from_rpc_error(e, attempt)
                # Once an event arrived the request was admitted: trying again would run it twice.
                delay = None if received else self.retry.delay(attempt, error)
                if delay is None:
                    raise error from None
                self._log_retry("Generate", error, attempt, delay)
            finally:
                call.cancel()  # a no-op when the call is over; stops it when the caller stops early
            time.sleep(delay)
