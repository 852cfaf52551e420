//! Every error the service returns, with the standard `google.rpc` details (decoded by any gRPC
//! client with rich-error support, e.g. `tonic-types`, `grpcio-status`):
//!
//! - `ErrorInfo` on every error: domain [`DOMAIN`], a stable [`Reason`] (`INVALID_FIELD`,
//!   `OVER_MEMORY_BUDGET`, …) and, where useful, metadata (e.g. `estimate_bytes`, `budget_bytes`);
//! - `BadRequest` on INVALID_ARGUMENT: every invalid field of the request (at most
//!   [`MAX_VIOLATIONS`], each description cut to [`MAX_ECHO_BYTES`](super::convert::MAX_ECHO_BYTES));
//! - `RetryInfo` on RESOURCE_EXHAUSTED and UNAVAILABLE: how long to wait ([`Reason::retry_delay`]).
//!
//! The HTTP/JSON routes carry the same details, and a `Retry-After` header from `RetryInfo`.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use super::convert::{FieldError, bounded};

/// The `ErrorInfo.domain` of every error of the service.
pub const DOMAIN: &str = "stylealign.v1";

/// Most field violations in one `BadRequest` (further ones are counted in the message).
pub const MAX_VIOLATIONS: usize = 32;

/// Why a call failed: `ErrorInfo.reason`, stable across versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// INVALID_ARGUMENT: one or more request fields are invalid (see `BadRequest`).
    InvalidField,
    /// INVALID_ARGUMENT: metadata (`x-client-id`, `grpc-timeout`) is invalid.
    InvalidMetadata,
    /// INVALID_ARGUMENT: PatchModel names a model that is not loaded (`BadRequest` field `model`).
    UnknownModel,
    /// NOT_FOUND: the session id is unknown, expired, released or forged.
    SessionNotFound,
    /// NOT_FOUND: the session's model is no longer loaded.
    ModelNotLoaded,
    /// RESOURCE_EXHAUSTED: the server-wide session cap is reached.
    SessionLimit,
    /// RESOURCE_EXHAUSTED: the admission queue is full.
    QueueFull,
    /// RESOURCE_EXHAUSTED: the request's estimated peak memory exceeds the memory budget.
    OverMemoryBudget,
    /// RESOURCE_EXHAUSTED: the queued reference images already hold their share of the budget.
    ReferencePoolFull,
    /// RESOURCE_EXHAUSTED: a LoRA does not fit the LoRA cache's memory budget (`--lora-cache-mb`),
    /// alone or next to the LoRAs running batches use.
    LoraOverBudget,
    /// RESOURCE_EXHAUSTED: too many unary calls in progress (`--max-concurrent-unary`).
    TooManyCalls,
    /// RESOURCE_EXHAUSTED: the request message is over `--max-message-bytes`.
    MessageTooLarge,
    /// UNAVAILABLE: models are loading.
    WarmingUp,
    /// UNAVAILABLE: the server is draining.
    ShuttingDown,
    /// DEADLINE_EXCEEDED: the call's deadline passed (queued or running).
    Deadline,
    /// CANCELLED: the request was stopped.
    Cancelled,
    /// UNAUTHENTICATED: missing, malformed or unknown bearer token.
    Unauthenticated,
    /// UNIMPLEMENTED: unknown method or route.
    UnknownMethod,
    /// INTERNAL: a fault of the server.
    Internal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidField => "INVALID_FIELD",
            Reason::InvalidMetadata => "INVALID_METADATA",
            Reason::UnknownModel => "UNKNOWN_MODEL",
            Reason::SessionNotFound => "SESSION_NOT_FOUND",
            Reason::ModelNotLoaded => "MODEL_NOT_LOADED",
            Reason::SessionLimit => "SESSION_LIMIT",
            Reason::QueueFull => "QUEUE_FULL",
            Reason::OverMemoryBudget => "OVER_MEMORY_BUDGET",
            Reason::ReferencePoolFull => "REFERENCE_POOL_FULL",
            Reason::LoraOverBudget => "LORA_OVER_BUDGET",
            Reason::TooManyCalls => "TOO_MANY_CALLS",
            Reason::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Reason::WarmingUp => "WARMING_UP",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::Deadline => "DEADLINE",
            Reason::Cancelled => "CANCELLED",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::UnknownMethod => "UNKNOWN_METHOD",
            Reason::Internal => "INTERNAL",
        }
    }

    /// The gRPC code of this reason.
    pub fn code(self) -> Code {
        match self {
            Reason::InvalidField | Reason::InvalidMetadata | Reason::UnknownModel => Code::InvalidArgument,
            Reason::SessionNotFound | Reason::ModelNotLoaded => Code::NotFound,
            Reason::SessionLimit
            | Reason::QueueFull
            | Reason::OverMemoryBudget
            | Reason::ReferencePoolFull
            | Reason::LoraOverBudget
            | Reason::TooManyCalls
            | Reason::MessageTooLarge => Code::ResourceExhausted,
            Reason::WarmingUp | Reason::ShuttingDown => Code::Unavailable,
            Reason::Deadline => Code::DeadlineExceeded,
            Reason::Cancelled => Code::Cancelled,
            Reason::Unauthenticated => Code::Unauthenticated,
            Reason::UnknownMethod => Code::Unimplemented,
            Reason::Internal => Code::Internal,
        }
    }

    /// The `RetryInfo.retry_delay` of this reason (RESOURCE_EXHAUSTED and UNAVAILABLE only).
    pub fn retry_delay(self) -> Option<Duration> {
        match self {
            // A queued request takes seconds to minutes; sessions free up as they expire.
            Reason::QueueFull => Some(Duration::from_secs(5)),
            Reason::ReferencePoolFull => Some(Duration::from_secs(5)),
            Reason::TooManyCalls => Some(Duration::from_secs(1)),
            Reason::SessionLimit => Some(Duration::from_secs(30)),
            // The same request will not fit until the server is reconfigured: retry much later
            // (or, better, ask for fewer images or a smaller size).
            Reason::OverMemoryBudget => Some(Duration::from_secs(60)),
            Reason::LoraOverBudget => Some(Duration::from_secs(5)),
            Reason::WarmingUp => Some(Duration::from_secs(2)),
            // Another replica takes over.
            Reason::ShuttingDown => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// An error with its `ErrorInfo` (and `RetryInfo` where the reason has a delay).
pub fn error(reason: Reason, message: impl Into<String>) -> Status {
    error_with(reason, message, &[])
}

/// [`error`] with `ErrorInfo` metadata (values bounded like every echo of client input).
pub fn error_with(reason: Reason, message: impl Into<String>, metadata: &[(&str, String)]) -> Status {
    let mut d = ErrorDetails::new();
    add_info(&mut d, reason, metadata);
    Status::with_error_details(reason.code(), bounded(&message.into()).into_owned(), d)
}

fn add_info(d: &mut ErrorDetails, reason: Reason, metadata: &[(&str, String)]) {
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), bounded(v).into_owned())).collect();
    d.set_error_info(reason.as_str(), DOMAIN, meta);
    if let Some(delay) = reason.retry_delay() {
        d.set_retry_info(Some(delay));
    }
}

/// INVALID_ARGUMENT listing every invalid field: the message names the first (and how many
/// more), `BadRequest` lists them all (up to [`MAX_VIOLATIONS`]).
pub fn invalid_fields(errors: &[FieldError]) -> Status {
    invalid_fields_with(Reason::InvalidField, errors)
}

/// [`invalid_fields`] with another INVALID_ARGUMENT reason (`UNKNOWN_MODEL`, `INVALID_METADATA`).
pub fn invalid_fields_with(reason: Reason, errors: &[FieldError]) -> Status {
    let Some(first) = errors.first() else {
        return error(Reason::Internal, "a request was refused without a reason");
    };
    // The message is already bounded (`FieldError::new`); the field name is cut here.
    let mut message = format!("invalid `{}`: {}", bounded(&first.field), first.message);
    if errors.len() > 1 {
        message += &format!(" (and {} more invalid field{})", errors.len() - 1, if errors.len() == 2 { "" } else { "s" });
    }
    let mut d = ErrorDetails::new();
    for e in errors.iter().take(MAX_VIOLATIONS) {
        d.add_bad_request_violation(bounded(&e.field).into_owned(), bounded(&e.message).into_owned());
    }
    let mut meta = vec![("fields", errors.len().to_string())];
    if errors.len() > MAX_VIOLATIONS {
        meta.push(("fields_listed", MAX_VIOLATIONS.to_string()));
    }
    add_info(&mut d, reason, &meta);
    Status::with_error_details(Code::InvalidArgument, message, d)
}

/// One invalid field.
pub fn invalid_field(field: impl Into<String>, message: impl Into<String>) -> Status {
    invalid_fields(&[FieldError::new(field, message)])
}

/// INVALID_ARGUMENT naming a bad metadata entry (`x-client-id`, `grpc-timeout`).
pub fn invalid_metadata(key: &str, message: &str) -> Status {
    invalid_fields_with(Reason::InvalidMetadata, &[FieldError::new(key, message)])
}

/// A status with `ErrorInfo` added when it has none (statuses made elsewhere, e.g. by tonic):
/// the reason is derived from the code.
pub fn with_info(s: Status) -> Status {
    if s.get_details_error_info().is_some() {
        return s;
    }
    let reason = match s.code() {
        Code::InvalidArgument => Reason::InvalidField,
        Code::NotFound => Reason::SessionNotFound,
        Code::ResourceExhausted => Reason::QueueFull,
        Code::Unavailable => Reason::ShuttingDown,
        Code::DeadlineExceeded => Reason::Deadline,
        Code::Cancelled => Reason::Cancelled,
        Code::Unauthenticated => Reason::Unauthenticated,
        Code::Unimplemented => Reason::UnknownMethod,
        _ => Reason::Internal,
    };
    let mut d = s.get_error_details();
    add_info(&mut d, reason, &[]);
    Status::with_error_details(s.code(), s.message().to_string(), d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::convert::MAX_ECHO_BYTES;

    #[test]
    fn bad_request_lists_fields_capped_and_bounded() {
        let errors: Vec<FieldError> = (0..40).map(|i| FieldError::new(format!("prompts[{i}]"), "x".repeat(5000))).collect();
        let s = invalid_fields(&errors);
        assert_eq!(s.code(), Code::InvalidArgument);
        let d = s.get_error_details();
        let v = &d.bad_request().unwrap().field_violations;
        assert_eq!(v.len(), MAX_VIOLATIONS);
        assert!(v.iter().all(|v| v.description.len() <= MAX_ECHO_BYTES + 64));
        let info = d.error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("INVALID_FIELD", DOMAIN));
        assert_eq!(info.metadata["fields"], "40");
        assert!(d.retry_info().is_none());
        assert!(s.message().contains("and 39 more invalid fields"));
        assert!(s.message().len() <= 2 * MAX_ECHO_BYTES + 128, "{}", s.message().len());
    }

    #[test]
    fn retryable_reasons_carry_retry_info() {
        for r in [Reason::QueueFull, Reason::OverMemoryBudget, Reason::WarmingUp, Reason::ShuttingDown, Reason::SessionLimit] {
            let s = error(r, "x");
            assert!(matches!(s.code(), Code::ResourceExhausted | Code::Unavailable));
            assert!(s.get_details_retry_info().is_some(), "{r:?}");
            assert_eq!(s.get_details_error_info().unwrap().reason, r.as_str());
        }
        let s = with_info(Status::internal("boom"));
        assert_eq!(s.get_details_error_info().unwrap().reason, "INTERNAL");
    }
}
