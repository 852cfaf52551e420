"""`StyleAlignError`: a failed call, with the gRPC status code, message and decoded rich details."""

from __future__ import annotations

import re
from typing import Any

import grpc
from google.protobuf import any_pb2, message as _message
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# The google.rpc error detail messages, by full type name.
_DETAIL_TYPES: dict[str, type[_message.Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.RetryInfo,
        error_details_pb2.DebugInfo,
        error_details_pb2.QuotaFailure,
        error_details_pb2.PreconditionFailure,
        error_details_pb2.BadRequest,
        error_details_pb2.RequestInfo,
        error_details_pb2.ResourceInfo,
        error_details_pb2.Help,
        error_details_pb2.LocalizedMessage,
    )
}

# The server names a bad field in its message: "invalid `width`: 65 is not a multiple of 16".
_FIELD_IN_MESSAGE = re.compile(r"invalid `([^`]+)`")


class StyleAlignError(Exception):
    """A call that failed with a gRPC status.

    Attributes:
        code: the `grpc.StatusCode` (``err.code.name`` is e.g. ``"INVALID_ARGUMENT"``).
        message: the status message.
        details: the decoded `google.rpc` detail messages (``BadRequest``, ``ErrorInfo``,
            ``RetryInfo``, ...) from the ``grpc-status-details-bin`` trailer; details of unknown
            types stay ``google.protobuf.Any``.
        attempts: how many times the call was tried (retries included).
    """

    def __init__(self, code: grpc.StatusCode, message: str, details: list[_message.Message] | None = None, attempts: int = 1):
        self.code = code
        self.message = message
        self.details = list(details or [])
        self.attempts = attempts
        super().__init__(code, message)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError, attempts: int = 1) -> "StyleAlignError":
        """Builds the error from a grpcio `RpcError` (which is also a `grpc.Call`)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, message or "", decode_details(error), attempts)

    # -- the details, by kind ------------------------------------------------------------------

    def _of(self, cls):
        return [d for d in self.details if isinstance(d, cls)]

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) of every ``BadRequest`` field violation."""
        return [(v.field, v.description) for d in self._of(error_details_pb2.BadRequest) for v in d.field_violations]

    @property
    def fields(self) -> list[str]:
        """The request fields the error is about: those of ``BadRequest`` violations, else the
        fields named in the message as ``invalid `field```."""
        named = [f for f, _ in self.field_violations]
        return named or _FIELD_IN_MESSAGE.findall(self.message)

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo | None:
        infos = self._of(error_details_pb2.ErrorInfo)
        return infos[0] if infos else None

    @property
    def reason(self) -> str | None:
        """``ErrorInfo.reason`` (e.g. ``"INVALID_FIELD"``, ``"OVER_MEMORY_BUDGET"``), when the server
        sent one."""
        info = self.error_info
        return info.reason if info is not None else None

    @property
    def retry_delay(self) -> float | None:
        """``RetryInfo.retry_delay`` in seconds, when the server sent one."""
        infos = self._of(error_details_pb2.RetryInfo)
        if not infos or not infos[0].HasField("retry_delay"):
            return None
        return infos[0].retry_delay.ToTimedelta().total_seconds()

    def __str__(self) -> str:
        lines = [f"{self.code.name}: {self.message}"]
        for d in self.details:
            lines.extend("  " + line for line in _describe(d))
        if self.attempts > 1:
            lines.append(f"  (after {self.attempts} attempts)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"StyleAlignError({self.code.name}, {self.message!r}, details={len(self.details)})"


def decode_details(call) -> list[_message.Message]:
    """The detail messages of the ``google.rpc.Status`` a failed call carries in its
    ``grpc-status-details-bin`` trailer (read by grpcio-status); none when it has none, or when
    the trailer does not match the call's code and message."""
    try:
        status = rpc_status.from_call(call)
    except (ValueError, AttributeError, TypeError, DecodeError):
        return []
    return [_unpack(d) for d in status.details] if status is not None else []


def _unpack(detail: any_pb2.Any) -> _message.Message:
    cls = _DETAIL_TYPES.get(detail.TypeName())
    if cls is None:
        return detail
    out = cls()
    return out if detail.Unpack(out) else detail


def _describe(d: Any) -> list[str]:
    if isinstance(d, error_details_pb2.BadRequest):
        return [f"field `{v.field}`: {v.description}" for v in d.field_violations]
    if isinstance(d, error_details_pb2.ErrorInfo):
        meta = ", ".join(f"{k}={v}" for k, v in sorted(d.metadata.items()))
        return [f"reason {d.reason}" + (f" (domain {d.domain})" if d.domain else "") + (f": {meta}" if meta else "")]
    if isinstance(d, error_details_pb2.RetryInfo):
        return [f"retry after {d.retry_delay.ToTimedelta().total_seconds():g}s"]
    if isinstance(d, error_details_pb2.QuotaFailure):
        return [f"quota `{v.subject}`: {v.description}" for v in d.violations]
    if isinstance(d, error_details_pb2.PreconditionFailure):
        return [f"precondition {v.type} `{v.subject}`: {v.description}" for v in d.violations]
    if isinstance(d, error_details_pb2.ResourceInfo):
        return [f"resource {d.resource_type} `{d.resource_name}`" + (f": {d.description}" if d.description else "")]
    if isinstance(d, error_details_pb2.Help):
        return [f"help: {link.description} {link.url}".rstrip() for link in d.links]
    if isinstance(d, error_details_pb2.LocalizedMessage):
        return [f"{d.locale}: {d.message}"]
    if isinstance(d, error_details_pb2.RequestInfo):
        return [f"request {d.request_id}"]
    if isinstance(d, error_details_pb2.DebugInfo):
        return [f"debug: {d.detail}"] + [f"  {e}" for e in d.stack_entries]
    if isinstance(d, any_pb2.Any):
        return [f"detail of type {d.TypeName()} ({len(d.value)} bytes)"]
    return [str(d)]
