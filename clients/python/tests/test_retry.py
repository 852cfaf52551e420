"""Retries and error details, against a small in-test gRPC server that fails on purpose."""

from __future__ import annotations

import datetime
import io
import json
import random
import threading
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image, PngImagePlugin

from stylealign_client import Client, ImageResult, Queued, RetryPolicy, StyleAlignError
from stylealign_client._pb.stylealign.v1 import stylealign_pb2 as pb
from stylealign_client._pb.stylealign.v1 import stylealign_pb2_grpc as pb_grpc


def rich_status(code: int, message: str, *details) -> grpc.Status:
    status = status_pb2.Status(code=code, message=message)
    for d in details:
        packed = any_pb2.Any()
        packed.Pack(d)
        status.details.append(packed)
    return rpc_status.to_status(status)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromTimedelta(datetime.timedelta(seconds=seconds))
    return error_details_pb2.RetryInfo(retry_delay=delay)


class Flaky(pb_grpc.StyleAlignServicer):
    """Answers each call from a script: the first len(failures) attempts fail with the given
    statuses (None: succeed); records when each attempt arrived."""

    def __init__(self):
        self.failures: dict[str, list] = {}
        self.arrivals: dict[str, list[float]] = {}
        self.metadata: list[dict] = []
        self.events_before_failure = 0
        self.png_text: dict[str, str] = {}
        self.lock = threading.Lock()

    def _attempt(self, name, context):
        with self.lock:
            self.arrivals.setdefault(name, []).append(time.monotonic())
            self.metadata.append(dict(context.invocation_metadata()))
            script = self.failures.get(name, [])
            return script.pop(0) if script else None

    def ListModels(self, request, context):
        failure = self._attempt("ListModels", context)
        if failure is not None:
            context.abort_with_status(failure)
        return pb.ListModelsResponse(models=[pb.ModelInfo(name="fake", family=pb.FAMILY_SD1, native_width=64, native_height=64, size_multiple=16, hash="0123456789")], samplers=["ddim"], max_steps=10)

    def PatchModel(self, request, context):
        failure = self._attempt("PatchModel", context)
        if failure is not None:
            context.abort_with_status(failure)
        return pb.Session(session_id="s-1", model=request.model, options=pb.PatchOptions(node=pb.NodeOptions(share_norm=request.share_norm, share_attn=request.share_attn, scale=request.scale)))

    def Generate(self, request, context):
        failure = self._attempt("Generate", context)
        if failure is not None:
            for _ in range(self.events_before_failure):
                yield pb.GenerateResponse(queued=pb.Queued(position=0, queue_depth=1))
            context.abort_with_status(failure)
        yield pb.GenerateResponse(queued=pb.Queued(position=0, queue_depth=1))
        yield pb.GenerateResponse(image=pb.GeneratedImage(index=0, prompt=request.prompts[0], width=1, height=1, seed=request.seed, png=_png_1x1(self.png_text), parameters='{"seed": %d}' % request.seed))


def _png_1x1(text: dict[str, str]) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value, zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture
def flaky():
    servicer = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_StyleAlignServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None)


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# A policy whose own backoff is far from the RetryInfo delay, so the test tells them apart.
FAST = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.02)
# Scheduling slack on a busy machine: how much later than its delay a retry may arrive.
SLACK = 0.5


def test_unary_retry_honours_retry_info(flaky):
    busy = rich_status(code_pb2.RESOURCE_EXHAUSTED, "queue full", retry_info(0.4))
    flaky.failures["ListModels"] = [busy, busy]
    with Client(flaky.target, retry=FAST, client_id="me") as client:
        models = client.list_models()
    assert models.names == ["fake"] and models["fake"].hash == "0123456789"
    waits = gaps(flaky.arrivals["ListModels"])
    assert len(waits) == 2
    for w in waits:
        # Never earlier than RetryInfo asked; at most its 10% jitter plus scheduling slack later.
        assert 0.4 <= w < 0.4 * 1.1 + SLACK, waits
    assert all(m.get("x-client-id") == "me" for m in flaky.metadata)


def test_generate_retry_before_any_event_honours_retry_info(flaky):
    busy = rich_status(code_pb2.RESOURCE_EXHAUSTED, "admission queue full", retry_info(0.3))
    flaky.failures["Generate"] = [busy, busy]
    with Client(flaky.target, retry=FAST) as client:
        events = list(client.generate("s-1", ["a cat"], seed=9))
    assert [type(e) for e in events] == [Queued, ImageResult]
    assert events[1].seed == 9 and events[1].image.size == (1, 1) and events[1].parameters == '{"seed": 9}'
    waits = gaps(flaky.arrivals["Generate"])
    assert len(waits) == 2 and all(0.3 <= w < 0.3 * 1.1 + SLACK for w in waits), waits


def test_image_metadata_from_stylealign_chunk_or_json_parameters(flaky):
    full = {"model": "tiny", "seed": 9, "prompt": "a cat"}
    infotext = "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 9, Size: 64x64, Model: tiny"
    with Client(flaky.target) as client:
        # Servers that write an A1111 infotext under `parameters` and the JSON under `stylealign`.
        flaky.png_text = {"parameters": infotext, "stylealign": json.dumps(full)}
        (image,) = client.generate_images("s-1", ["a cat"], seed=9)
        assert image.metadata == full and image.infotext == infotext
        assert image.image.info["parameters"] == infotext and image.text == {"parameters": infotext, "stylealign": json.dumps(full)}
        # Servers that write the JSON under `parameters` only.
        flaky.png_text = {"parameters": json.dumps(full)}
        (image,) = client.generate_images("s-1", ["a cat"], seed=9)
        assert image.metadata == full and image.infotext is None
        # No metadata at all.
        flaky.png_text = {}
        (image,) = client.generate_images("s-1", ["a cat"], seed=9)
        assert image.metadata is None and image.infotext is None and image.text == {}


def test_generate_is_not_retried_after_an_event(flaky):
    flaky.failures["Generate"] = [rich_status(code_pb2.UNAVAILABLE, "server is shutting down", retry_info(0.01))]
    flaky.events_before_failure = 1
    received = []
    with Client(flaky.target, retry=FAST) as client:
        with pytest.raises(StyleAlignError) as e:
            for event in client.generate("s-1", ["a cat"]):
                received.append(event)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.attempts == 1
    assert [type(r) for r in received] == [Queued]
    assert len(flaky.arrivals["Generate"]) == 1


def test_gives_up_after_max_attempts(flaky):
    busy = rich_status(code_pb2.RESOURCE_EXHAUSTED, "session cap reached", retry_info(0.05), error_details_pb2.ErrorInfo(reason="SESSION_CAP", domain="stylealign", metadata={"max_sessions": "10"}))
    flaky.failures["PatchModel"] = [busy] * 10
    with Client(flaky.target, retry=FAST, max_attempts=3) as client:
        with pytest.raises(StyleAlignError) as e:
            client.patch_model("tiny")
    err = e.value
    assert len(flaky.arrivals["PatchModel"]) == 3 and err.attempts == 3
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.retry_delay == pytest.approx(0.05)
    assert err.error_info.reason == "SESSION_CAP" and err.error_info.metadata["max_sessions"] == "10"
    assert str(err) == "\n".join([
        "RESOURCE_EXHAUSTED: session cap reached",
        "  retry after 0.05s",
        "  reason SESSION_CAP (domain stylealign): max_sessions=10",
        "  (after 3 attempts)",
    ])


def test_exponential_backoff_with_jitter_without_retry_info(flaky):
    flaky.failures["ListModels"] = [rich_status(code_pb2.UNAVAILABLE, "warming up")] * 3
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.2, multiplier=2.0, max_backoff=0.5, jitter=0.5)
    with Client(flaky.target, retry=policy) as client:
        client.list_models()
    waits = gaps(flaky.arrivals["ListModels"])
    # Backoffs 0.2, 0.4, 0.5 (capped), each drawn from [b / 2, b].
    for w, b in zip(waits, [0.2, 0.4, 0.5]):
        assert b / 2 <= w < b + SLACK, waits


def test_other_codes_are_not_retried_and_details_are_decoded(flaky):
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="steps", description="1000 exceeds the limit of 150"),
        error_details_pb2.BadRequest.FieldViolation(field="width", description="33 is not a multiple of 16"),
    ])
    flaky.failures["Generate"] = [rich_status(code_pb2.INVALID_ARGUMENT, "bad request", bad, retry_info(0.01))]
    with Client(flaky.target, retry=FAST) as client:
        with pytest.raises(StyleAlignError) as e:
            list(client.generate("s-1", ["a cat"], steps=1000, width=33))
    err = e.value
    assert len(flaky.arrivals["Generate"]) == 1 and err.attempts == 1
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.fields == ["steps", "width"]
    assert err.field_violations == [("steps", "1000 exceeds the limit of 150"), ("width", "33 is not a multiple of 16")]
    assert str(err) == "\n".join([
        "INVALID_ARGUMENT: bad request",
        "  field `steps`: 1000 exceeds the limit of 150",
        "  field `width`: 33 is not a multiple of 16",
        "  retry after 0.01s",
    ])


def test_unreachable_server_is_unavailable_after_retries():
    # A port nothing listens on (bound, then closed).
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with Client(f"127.0.0.1:{port}", retry=RetryPolicy(max_attempts=2, initial_backoff=0.05), timeout=5) as client:
        with pytest.raises(StyleAlignError) as e:
            client.list_models()
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and e.value.attempts == 2
    assert time.monotonic() - start < 10


def test_retry_policy_delays():
    rng = random.Random(1)
    policy = RetryPolicy(max_attempts=5, initial_backoff=1.0, multiplier=3.0, max_backoff=5.0, jitter=0.25)
    unavailable = StyleAlignError(grpc.StatusCode.UNAVAILABLE, "down")
    draws = [policy.delay(n, unavailable, rng) for n in (1, 2, 3, 4)]
    for d, b in zip(draws, [1.0, 3.0, 5.0, 5.0]):
        assert 0.75 * b <= d <= b
    assert policy.delay(5, unavailable, rng) is None  # the fifth attempt was the last
    assert policy.delay(1, StyleAlignError(grpc.StatusCode.INTERNAL, "bug"), rng) is None
    hinted = StyleAlignError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [retry_info(2.0)])
    assert all(2.0 <= policy.delay(1, hinted, rng) <= 2.2 for _ in range(50))
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=2)
    with pytest.raises(ValueError, match="initial_backoff"):
        RetryPolicy(initial_backoff=-1)
