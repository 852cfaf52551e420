//! The tower middleware of the API port, around one router that serves gRPC, gRPC-Web and
//! HTTP/JSON alike (outermost first):
//!
//! 1. [`trace`]: the `rpc` span of each request (target [`crate::telemetry::TARGET`]), continuing
//!    a W3C `traceparent`.
//! 2. [`track`]: counts the request as in flight on its connection until its response body ends
//!    (the idle-connection timeout of [`super::conn`] only closes connections with none).
//! 3. [`identify`]: who calls, decided once per request: the bearer token's client when auth
//!    tokens are configured and the call carries one; else the client certificate's identity
//!    (mTLS); else, without auth, `x-client-id` (default `anonymous`). The outcome goes into the
//!    request's extensions; handlers read it with [`Caller::of`] (a refused identity is their
//!    UNAUTHENTICATED / INVALID_ARGUMENT, answered after the server's own checks as before).
//! 4. [`limit_unary`]: every request but the streaming ones (Generate, health Watch, reflection)
//!    holds one of `--max-concurrent-unary` slots (none free: RESOURCE_EXHAUSTED at once) and must
//!    be answered within `--unary-timeout-secs`, reading the request included (else
//!    DEADLINE_EXCEEDED). Both answer in the caller's protocol (gRPC status, or the HTTP/JSON error
//!    body with 429 / 504). A gRPC request message over `--max-message-bytes` is
//!    RESOURCE_EXHAUSTED (tonic reports OUT_OF_RANGE; the gRPC specification says
//!    RESOURCE_EXHAUSTED).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;
use tonic::Status;
use tracing::Instrument as _;

use super::config::Tokens;
use super::conn::{ConnInfo, RequestGuard};
use super::errors::{self, Reason};

/// The paths whose calls stream (exempt from the unary timeout and concurrency limit).
const STREAMING: [&str; 5] = [
    "/stylealign.v1.StyleAlign/Generate",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/v1/generate",
];

/// The caller of a request, as the identity layer decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The client's identity: sessions belong to it.
    pub id: String,
    pub source: CallerSource,
}

/// Where a [`Caller`]'s identity comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallerSource {
    /// A bearer token (`authorization: Bearer …`) from the configured tokens.
    Token,
    /// The client certificate (mTLS): its SAN, else its CN.
    Certificate,
    /// `x-client-id` (servers without auth).
    ClientId,
    /// No identity given on a server without auth.
    Anonymous,
}

/// The identity layer's outcome, in the request's extensions.
#[derive(Clone, Debug)]
pub struct Identified(Result<Caller, Status>);

impl Caller {
    /// The caller of a request that passed the identity layer; its refusal otherwise.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
        Identified::from_extensions(request.extensions().get::<Identified>())
    }
}

impl Identified {
    pub fn new(outcome: Result<Caller, Status>) -> Self {
        Self(outcome)
    }

    fn from_extensions(i: Option<&Identified>) -> Result<Caller, Status> {
        match i {
            Some(i) => i.0.clone(),
            None => Err(Status::internal("the request did not pass the identity layer")),
        }
    }

    /// Carries the outcome over to a request built from an HTTP request (the HTTP/JSON routes).
    pub fn attach<T>(self, request: &mut tonic::Request<T>) {
        request.extensions_mut().insert(self);
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Identified {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Identified(Identified::from_extensions(parts.extensions.get::<Identified>())))
    }
}

/// Decides who calls (see the module docs).
pub fn identify_caller(auth: Option<&Tokens>, headers: &HeaderMap, peer: Option<&str>) -> Result<Caller, Status> {
    let bearer = headers.get("authorization");
    if let Some(tokens) = auth
        && let Some(header) = bearer
    {
        let value = header.to_str().map_err(|_| errors::error(Reason::Unauthenticated, "`authorization` is not ASCII"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| errors::error(Reason::Unauthenticated, "`authorization` must be `Bearer <token>`"))?;
        return match tokens.client(token.trim()) {
            Some(c) => Ok(Caller { id: c.to_string(), source: CallerSource::Token }),
            None => Err(errors::error(Reason::Unauthenticated, "unknown token")),
        };
    }
    if let Some(peer) = peer {
        return Ok(Caller { id: peer.to_string(), source: CallerSource::Certificate });
    }
    if auth.is_some() {
        return Err(errors::error(Reason::Unauthenticated, "missing `authorization: Bearer <token>` metadata"));
    }
    match headers.get("x-client-id") {
        None => Ok(Caller { id: "anonymous".to_string(), source: CallerSource::Anonymous }),
        Some(v) => {
            let id = v.to_str().map_err(|_| errors::invalid_metadata("x-client-id", "not ASCII"))?.trim();
            if id.is_empty() || id.len() > 128 {
                return Err(errors::invalid_metadata("x-client-id", "1 to 128 characters"));
            }
            Ok(Caller { id: id.to_string(), source: CallerSource::ClientId })
        }
    }
}

/// Layer 3: puts the [`Identified`] outcome into the request's extensions.
pub async fn identify(State(auth): State<Option<Arc<Tokens>>>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<ConnInfo>().and_then(|c| c.peer_identity.clone());
    let caller = identify_caller(auth.as_deref(), req.headers(), peer.as_deref());
    req.extensions_mut().insert(Identified(caller));
    next.run(req).await
}

/// Layer 1: the request's `rpc` span.
pub async fn trace(req: Request, next: Next) -> Response {
    let span = tracing::info_span!(target: crate::telemetry::TARGET, "rpc", path = %req.uri().path());
    crate::telemetry::continue_trace(&span, req.headers());
    next.run(req).instrument(span).await
}

/// Layer 2: the request is in flight on its connection until its response body is done.
pub async fn track(req: Request, next: Next) -> Response {
    let Some(activity) = req.extensions().get::<ConnInfo>().map(|c| c.activity.clone()) else {
        return next.run(req).await;
    };
    let guard = activity.begin();
    let res = next.run(req).await;
    res.map(|body| Body::new(Tracked { inner: body, _guard: guard }))
}

/// A response body that ends its request on the connection when it is done or dropped.
struct Tracked {
    inner: Body,
    _guard: RequestGuard,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The unary limits: a shared pool of slots and the answer time.
#[derive(Clone, Debug)]
pub struct UnaryLimits {
    slots: Arc<Semaphore>,
    max: usize,
    timeout: Duration,
    max_message_bytes: usize,
}

impl UnaryLimits {
    pub fn new(max_concurrent: usize, timeout: Duration, max_message_bytes: usize) -> Self {
        Self { slots: Arc::new(Semaphore::new(max_concurrent)), max: max_concurrent, timeout, max_message_bytes }
    }
}

/// Layer 4: the unary timeout and concurrency limit, and RESOURCE_EXHAUSTED for oversize messages.
pub async fn limit_unary(State(limits): State<UnaryLimits>, req: Request, next: Next) -> Response {
    let grpc = grpc_content_type(req.headers());
    let res = if STREAMING.contains(&req.uri().path()) {
        next.run(req).await
    } else {
        let Ok(_permit) = limits.slots.clone().try_acquire_owned() else {
            let status = errors::error(
                Reason::TooManyCalls,
                format!("too many calls in progress (--max-concurrent-unary {}); retry later", limits.max),
            );
            return status_response(status, grpc.as_ref());
        };
        match tokio::time::timeout(limits.timeout, next.run(req)).await {
            Ok(res) => res,
            Err(_) => {
                let status = errors::error(
                    Reason::Deadline,
                    format!(
                        "the call was not answered within {} s (--unary-timeout-secs), reading the request included",
                        limits.timeout.as_secs()
                    ),
                );
                return status_response(status, grpc.as_ref());
            }
        }
    };
    if grpc.is_some() { oversize_is_resource_exhausted(res, limits.max_message_bytes) } else { res }
}

/// The content type of a gRPC or gRPC-Web request; `None` for plain HTTP.
pub(super) fn grpc_content_type(headers: &HeaderMap) -> Option<HeaderValue> {
    headers.get(header::CONTENT_TYPE).filter(|v| v.as_bytes().starts_with(b"application/grpc")).cloned()
}

/// `status` in the caller's protocol: a trailers-only gRPC (or gRPC-Web) answer, or the HTTP/JSON
/// error body.
pub(super) fn status_response(status: Status, grpc: Option<&HeaderValue>) -> Response {
    match grpc {
        Some(content_type) => {
            let mut res = status.into_http::<Body>();
            res.headers_mut().insert(header::CONTENT_TYPE, content_type.clone());
            res
        }
        None => super::http::status_response(status),
    }
}

/// tonic answers a request message over the decoding limit with OUT_OF_RANGE; the gRPC
/// specification (and this service) says RESOURCE_EXHAUSTED.
fn oversize_is_resource_exhausted(mut res: Response, limit: usize) -> Response {
    let h = res.headers();
    let out_of_range = h.get("grpc-status").is_some_and(|v| v == "11");
    let too_large = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.contains("message length too large") || m.contains("message%20length%20too%20large"));
    if out_of_range && too_large {
        let fresh =
            errors::error(Reason::MessageTooLarge, format!("request message over the limit of {limit} bytes (--max-message-bytes)"))
                .into_http::<Body>();
        let h = res.headers_mut();
        h.insert("grpc-status", HeaderValue::from_static("8"));
        for key in ["grpc-message", "grpc-status-details-bin"] {
            match fresh.headers().get(key) {
                Some(m) => h.insert(key, m.clone()),
                None => h.remove(key),
            };
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn identity_order() {
        let tokens = Tokens::parse("alice=tok-a").unwrap();
        let bearer = headers(&[("authorization", "Bearer tok-a"), ("x-client-id", "mallory")]);
        // Tokens configured: the token wins over the certificate and x-client-id.
        assert_eq!(identify_caller(Some(&tokens), &bearer, Some("cert-client")).unwrap().id, "alice");
        // No token: the certificate.
        let c = identify_caller(Some(&tokens), &headers(&[("x-client-id", "mallory")]), Some("cert-client")).unwrap();
        assert_eq!((c.id.as_str(), c.source), ("cert-client", CallerSource::Certificate));
        // No token, no certificate, auth on: refused.
        assert_eq!(identify_caller(Some(&tokens), &HeaderMap::new(), None).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(
            identify_caller(Some(&tokens), &headers(&[("authorization", "Bearer nope")]), None).unwrap_err().message(),
            "unknown token"
        );
        // No auth: the certificate beats x-client-id; else x-client-id; else anonymous.
        assert_eq!(identify_caller(None, &headers(&[("x-client-id", "mallory")]), Some("cert-client")).unwrap().id, "cert-client");
        assert_eq!(identify_caller(None, &headers(&[("x-client-id", "bob")]), None).unwrap().id, "bob");
        assert_eq!(identify_caller(None, &HeaderMap::new(), None).unwrap().source, CallerSource::Anonymous);
        assert_eq!(identify_caller(None, &headers(&[("x-client-id", " ")]), None).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
