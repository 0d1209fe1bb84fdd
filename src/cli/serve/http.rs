//! The HTTP side (axum on tokio): routes, the API key, body limits, and turning the scheduler's
//! events into a JSON response or a stream of server-sent events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, StreamExt};
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::api::{self, json_body, ApiError, Endpoint, Header};
use super::scheduler::{Event, Job};
use super::Shared;

/// Largest request body: far more than a full context of text (32768 tokens are ~130 KB).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What the handlers share: the model side, and the way to the scheduler.
pub struct Http {
    pub shared: Arc<Shared>,
    pub jobs: crossbeam::channel::Sender<Job>,
    next_id: AtomicU64,
    started: u64,
}

impl Http {
    pub fn new(shared: Arc<Shared>, jobs: crossbeam::channel::Sender<Job>) -> Http {
        Http { shared, jobs, next_id: AtomicU64::new(1), started: unix_now() }
    }
}

pub fn router(http: Arc<Http>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/stats", get(stats))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(http.clone(), require_api_key))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(http)
}

/// With `--api-key`, every endpoint but `/health` needs `Authorization: Bearer KEY`.
async fn require_api_key(State(http): State<Arc<Http>>, request: HttpRequest, next: Next) -> Response {
    if let Some(key) = &http.shared.api_key {
        if request.uri().path() != "/health" && !bearer_matches(request.headers(), key) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(request).await
}

/// Whether the request carries `Authorization: Bearer KEY`, compared in constant time (only the
/// length of the key can be learnt from the timing).
fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let Some((scheme, token)) = value.trim().split_once(' ') else { return false };
    scheme.eq_ignore_ascii_case("bearer") && bool::from(token.trim().as_bytes().ct_eq(key.as_bytes()))
}

async fn health(State(http): State<Arc<Http>>) -> impl IntoResponse {
    let load = &http.shared.load;
    let busy = load.busy.load(Ordering::Relaxed);
    json_body(&json!({
        "status": "ok",
        "slots_idle": http.shared.slots.saturating_sub(busy),
        "slots_processing": busy,
        "requests_waiting": load.waiting.load(Ordering::Relaxed),
    }))
}

/// Where each slot's experts ran (the hybrid scheduler's counters; `null` for engines without one).
async fn stats(State(http): State<Arc<Http>>) -> impl IntoResponse {
    let experts = http.shared.load.experts.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let slots: Vec<_> = experts.iter().map(|s| s.map(|s| s.to_json())).collect();
    json_body(&json!({ "backend": http.shared.loaded.backend(), "slots": slots }))
}

async fn models(State(http): State<Arc<Http>>) -> impl IntoResponse {
    json_body(&json!({
        "object": "list",
        "data": [{
            "id": http.shared.model_name,
            "object": "model",
            "created": http.started,
            "owned_by": "mixtral-q",
            "meta": {"n_ctx": http.shared.slot_ctx, "slots": http.shared.slots},
        }],
    }))
}

async fn chat_completions(State(http): State<Arc<Http>>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(http, body, Endpoint::Chat).await.unwrap_or_else(rejected)
}

async fn completions(State(http): State<Arc<Http>>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(http, body, Endpoint::Completion).await.unwrap_or_else(rejected)
}

fn rejected(e: ApiError) -> Response {
    eprintln!("rejected ({}): {}", e.status.as_u16(), e.message);
    e.into_response()
}

async fn complete(
    http: Arc<Http>,
    body: Result<Bytes, BytesRejection>,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::body(
            r.status(),
            format!("the request body is over this server's limit of {} MiB", MAX_BODY_BYTES >> 20),
        ),
        status => ApiError::body(status, r.body_text()),
    })?;
    // Rendering and tokenizing a long prompt takes a while: off the async workers.
    let shared = http.shared.clone();
    let (request, ids) = tokio::task::spawn_blocking(move || {
        let request = match endpoint {
            Endpoint::Chat => api::parse_chat(&body, &shared.template)?,
            Endpoint::Completion => api::parse_completion(&body)?,
        };
        let ids = api::tokenize(&request, &shared.loaded.tokenizer, shared.slot_ctx)?;
        Ok::<_, ApiError>((request, ids))
    })
    .await
    .map_err(|e| ApiError::internal(format!("request task failed: {e}")))??;

    // Requests beyond the free slots wait; beyond --max-queue of those, the server is busy.
    let load = &http.shared.load;
    let free_slots = http.shared.slots.saturating_sub(load.busy.load(Ordering::Relaxed));
    let waiting = load.waiting.fetch_add(1, Ordering::Relaxed);
    if waiting >= http.shared.max_queue + free_slots {
        load.waiting.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::busy(waiting));
    }
    let id = http.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    let head =
        Header { id: format!("{prefix}-{id}"), created: unix_now(), model: http.shared.model_name.clone() };
    let (stream, include_usage) = (request.stream, request.include_usage);
    let (events, receiver) = unbounded_channel();
    if http.jobs.send(Job { id, request, ids, events }).is_err() {
        load.waiting.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::internal("the server is shutting down"));
    }
    if stream {
        Ok(sse(head, endpoint, include_usage, receiver))
    } else {
        whole(head, endpoint, receiver).await
    }
}

/// Waits for the whole reply. If the client goes away first, this future is dropped with the
/// receiver, and the scheduler stops the request.
async fn whole(
    head: Header,
    endpoint: Endpoint,
    mut events: UnboundedReceiver<Event>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Done(outcome) => {
                return Ok(json_body(&api::response(&head, endpoint, &text, &outcome)).into_response())
            }
            Event::Failed(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the request was stopped (the server is shutting down)"))
}

/// The reply as server-sent events, ending with `data: [DONE]`. When the client disconnects, the
/// stream (and with it the receiver) is dropped, and the scheduler stops the request.
fn sse(head: Header, endpoint: Endpoint, include_usage: bool, events: UnboundedReceiver<Event>) -> Response {
    let data = |v: serde_json::Value| Ok::<_, Infallible>(SseEvent::default().data(v.to_string()));
    let first = match endpoint {
        Endpoint::Chat => Some(data(api::role_chunk(&head))),
        Endpoint::Completion => None,
    };
    let rest = UnboundedReceiverStream::new(events).flat_map(move |event| {
        let out = match event {
            Event::Text(t) => vec![data(api::chunk(&head, endpoint, Some(&t), None))],
            Event::Done(outcome) => {
                let mut out = vec![data(api::final_chunk(&head, endpoint, &outcome))];
                if include_usage {
                    out.push(data(api::usage_chunk(&head, endpoint, &outcome)));
                }
                out.push(Ok(SseEvent::default().data("[DONE]")));
                out
            }
            Event::Failed(message) => vec![data(ApiError::internal(message).to_json())],
        };
        stream::iter(out)
    });
    Sse::new(stream::iter(first).chain(rest)).keep_alive(KeepAlive::default()).into_response()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys() {
        let headers = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            h
        };
        assert!(bearer_matches(&headers("Bearer s3cret"), "s3cret"));
        assert!(bearer_matches(&headers("bearer  s3cret "), "s3cret"));
        assert!(!bearer_matches(&headers("Bearer s3cre"), "s3cret"));
        assert!(!bearer_matches(&headers("Bearer s3cretx"), "s3cret"));
        assert!(!bearer_matches(&headers("Basic s3cret"), "s3cret"));
        assert!(!bearer_matches(&headers("s3cret"), "s3cret"));
        assert!(!bearer_matches(&HeaderMap::new(), "s3cret"));
    }
}
