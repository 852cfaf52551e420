//! gRPC errors as people read them: the status code's name, the message, and the standard
//! `google.rpc` details the server attached (`BadRequest` field violations, `RetryInfo`,
//! `ErrorInfo`, …), decoded with `tonic-types`.

use std::fmt;

use tonic::Status;
use tonic_types::{ErrorDetail, StatusExt as _};

use super::format_duration;
use crate::serve::server::code_name;

/// A failed call, displayed by [`describe`].
#[derive(Debug)]
pub struct StatusError(pub Status);

impl From<Status> for StatusError {
    fn from(s: Status) -> Self {
        Self(s)
    }
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&describe(&self.0))
    }
}

impl std::error::Error for StatusError {}

/// `CODE: message`, then one indented line per decoded detail.
pub fn describe(s: &Status) -> String {
    let mut text = code_name(s.code()).to_string();
    if !s.message().is_empty() {
        text += ": ";
        text += s.message();
    }
    for line in detail_lines(s) {
        text += "\n  ";
        text += &line;
    }
    text
}

/// The `google.rpc` details of a status, one line each (none when it has no or undecodable
/// details).
pub fn detail_lines(s: &Status) -> Vec<String> {
    let mut lines = Vec::new();
    for d in s.get_error_details_vec() {
        match d {
            ErrorDetail::BadRequest(b) => {
                for v in b.field_violations {
                    let reason = if v.reason.is_empty() { String::new() } else { format!(" ({})", v.reason) };
                    lines.push(format!("field `{}`: {}{reason}", v.field, v.description));
                }
            }
            ErrorDetail::RetryInfo(r) => match r.retry_delay {
                Some(d) => lines.push(format!("retry after {}", format_duration(d))),
                None => lines.push("retry later".to_string()),
            },
            ErrorDetail::ErrorInfo(e) => {
                let mut meta: Vec<_> = e.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                meta.sort();
                let meta = if meta.is_empty() { String::new() } else { format!(" ({})", meta.join(", ")) };
                lines.push(format!("reason {} from {}{meta}", e.reason, e.domain));
            }
            ErrorDetail::QuotaFailure(q) => {
                for v in q.violations {
                    lines.push(format!("quota `{}`: {}", v.subject, v.description));
                }
            }
            ErrorDetail::PreconditionFailure(p) => {
                for v in p.violations {
                    lines.push(format!("precondition {} `{}`: {}", v.r#type, v.subject, v.description));
                }
            }
            ErrorDetail::ResourceInfo(r) => lines.push(format!("resource {} `{}`: {}", r.resource_type, r.resource_name, r.description)),
            ErrorDetail::RequestInfo(r) => lines.push(format!("request id {}", r.request_id)),
            ErrorDetail::Help(h) => {
                for l in h.links {
                    lines.push(format!("help: {} <{}>", l.description, l.url));
                }
            }
            ErrorDetail::LocalizedMessage(m) => lines.push(format!("{} ({})", m.message, m.locale)),
            ErrorDetail::DebugInfo(d) => lines.push(format!("debug: {}", d.detail)),
            // A kind of detail newer than this client.
            _ => {}
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use tonic::Code;
    use tonic_types::ErrorDetails;

    use super::*;

    #[test]
    fn codes_messages_and_details_read_as_text() {
        assert_eq!(describe(&Status::not_found("no such session")), "NOT_FOUND: no such session");
        let mut d = ErrorDetails::with_bad_request_violation("width", "65 is not a multiple of 16");
        d.add_bad_request_violation("prompts[1]", "empty");
        d.set_retry_info(Some(Duration::from_millis(1500)));
        d.set_error_info("QUEUE_FULL", "stylealign", HashMap::from([("queue_depth".to_string(), "64".to_string())]));
        let s = Status::with_error_details(Code::InvalidArgument, "invalid `width`: 65 is not a multiple of 16", d);
        let text = describe(&s);
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.remove(0), "INVALID_ARGUMENT: invalid `width`: 65 is not a multiple of 16");
        lines.sort();
        assert_eq!(
            lines,
            [
                "  field `prompts[1]`: empty",
                "  field `width`: 65 is not a multiple of 16",
                "  reason QUEUE_FULL from stylealign (queue_depth=64)",
                "  retry after 1.5s"
            ]
        );
        let e = anyhow::Error::new(StatusError(s)).context("Generate");
        assert!(!format!("{e:#}").contains("Status {"));
    }
}
