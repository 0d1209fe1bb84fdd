//! The OpenAI API as JSON: requests checked field by field (so an error names the field), the error
//! object, and the response and stream-chunk bodies, with llama-server's `timings` extension.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use mixtral_q::text::{fold_system_prompt, ChatTemplate, Message, SamplingParams, Tokenizer};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

/// OpenAI's limit on stop sequences.
const MAX_STOPS: usize = 4;

/// An error as OpenAI returns it: `{"error": {"message", "type", "param", "code"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    kind: &'static str,
    pub param: Option<String>,
    code: Option<&'static str>,
    retry_after_secs: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after_secs: None }
    }

    /// 400 about one field of the request.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.to_owned());
        e
    }

    /// 400 about the request as a whole.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized() -> ApiError {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key: send the header `Authorization: Bearer KEY`",
        );
        e.code = Some("invalid_api_key");
        e
    }

    pub fn not_found(path: &str) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no endpoint {path}"))
    }

    pub fn method_not_allowed() -> ApiError {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method not allowed here")
    }

    /// An unreadable body: too large (413) or cut off; the status comes from the HTTP layer.
    pub fn body(status: StatusCode, why: String) -> ApiError {
        Self::new(status, "invalid_request_error", why)
    }

    /// 503 with `Retry-After`: every slot busy and the queue full.
    pub fn busy(queued: usize) -> ApiError {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            format!("the server is busy ({queued} requests queued): retry later"),
        );
        e.retry_after_secs = Some(1);
        e
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn to_json(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, json_body(&self.to_json())).into_response();
        if let Some(secs) = self.retry_after_secs {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A JSON body with its content type.
pub fn json_body(value: &Value) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], value.to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// A request, checked: what the scheduler needs to run it.
#[derive(Debug)]
pub struct Request {
    pub endpoint: Endpoint,
    /// The prompt as text: the rendered conversation, or the completion prompt.
    pub text: String,
    /// The conversation (chat only), rendered again with the reply to know what a next turn reuses.
    pub messages: Option<Vec<Message>>,
    pub sampling: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage and no choices, as OpenAI sends.
    pub include_usage: bool,
}

/// The body of a request as a JSON object, with typed access to its fields.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(body: &[u8]) -> Result<Fields, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
        match value {
            Value::Object(map) => Ok(Fields(map)),
            _ => Err(ApiError::bad_request("the body must be a JSON object")),
        }
    }

    /// The field as a `T`; absent or null is `None`, another type is a 400 naming the field.
    fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| ApiError::invalid(name, format!("`{name}`: {e} (got {})", json_kind(v)))),
        }
    }

    fn raw(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `POST /v1/chat/completions`: the messages rendered with the model's chat template.
pub fn parse_chat(body: &[u8], template: &ChatTemplate) -> Result<Request, ApiError> {
    let fields = Fields::parse(body)?;
    let raw =
        fields.raw("messages").ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?;
    let Value::Array(list) = raw else {
        return Err(ApiError::invalid(
            "messages",
            format!("`messages` must be an array (got {})", json_kind(raw)),
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty: give at least one message"));
    }
    let messages =
        list.iter().enumerate().map(|(i, m)| parse_message(i, m)).collect::<Result<Vec<_>, _>>()?;
    for name in ["tools", "functions"] {
        if fields.raw(name).is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(ApiError::invalid(name, format!("`{name}` is not supported")));
        }
    }
    if let Some(format) = fields.raw("response_format") {
        if format.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid("response_format", "only `{\"type\": \"text\"}` is supported"));
        }
    }
    if fields.get::<bool>("logprobs")? == Some(true) {
        return Err(ApiError::invalid("logprobs", "`logprobs` is not supported"));
    }
    let options = Options::parse(&fields, "max_completion_tokens")?;
    let for_template =
        if template.supports_system() { messages.clone() } else { fold_system_prompt(&messages) };
    let text =
        template.render(&for_template, true).map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
    Ok(options.into_request(Endpoint::Chat, text, Some(for_template)))
}

fn parse_message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let Value::Object(m) = m else {
        return Err(ApiError::invalid(
            &param,
            format!("`{param}` must be an object with `role` and `content`"),
        ));
    };
    let role = match m.get("role") {
        Some(Value::String(r)) => r.as_str(),
        _ => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!("`{param}.role` must be a string"),
            ))
        }
    };
    let role = match role {
        // OpenAI's newer name for the system role.
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(ApiError::invalid(
                &format!("{param}.role"),
                format!("`{param}.role` {other:?} is not supported: use system, user or assistant"),
            ))
        }
    };
    let content_param = format!("{param}.content");
    let content = match m.get("content") {
        Some(Value::String(text)) => text.clone(),
        // Content parts: only text ones.
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            &content_param,
                            format!("`{content_param}`: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                        ))
                    }
                }
            }
            text
        }
        _ => {
            return Err(ApiError::invalid(
                &content_param,
                format!("`{content_param}` must be a string or a list of text parts"),
            ))
        }
    };
    Ok(Message::new(role, &content))
}

/// `POST /v1/completions`: a raw prompt (BOS is added, as `mixtral-q generate` does).
pub fn parse_completion(body: &[u8]) -> Result<Request, ApiError> {
    let fields = Fields::parse(body)?;
    let prompt = match fields.raw("prompt") {
        None => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(p)) => p.clone(),
        Some(Value::Array(list)) if list.len() == 1 && list[0].is_string() => {
            list[0].as_str().unwrap_or_default().to_owned()
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("`prompt` must be a string or a list of one string (got {})", json_kind(other)),
            ))
        }
    };
    if fields.get::<bool>("echo")? == Some(true) {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if fields.get::<String>("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    if fields.get::<i64>("best_of")?.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("best_of", "only `best_of` = 1 is supported"));
    }
    if fields.get::<i64>("logprobs")?.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid("logprobs", "`logprobs` is not supported"));
    }
    let options = Options::parse(&fields, "max_tokens")?;
    Ok(options.into_request(Endpoint::Completion, prompt, None))
}

/// What both endpoints take besides the prompt.
struct Options {
    sampling: SamplingParams,
    max_tokens: Option<usize>,
    stop: Vec<String>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
}

impl Options {
    /// `other_max` is the endpoint's other name for `max_tokens` (chat's `max_completion_tokens`).
    fn parse(f: &Fields, other_max: &str) -> Result<Options, ApiError> {
        let defaults = SamplingParams::default();
        let top_k = match f.get::<i64>("top_k")? {
            None => defaults.top_k,
            Some(k) if k < 0 => return Err(ApiError::invalid("top_k", "`top_k` must be ≥ 0 (0 is off)")),
            Some(k) => k as usize,
        };
        let sampling = SamplingParams {
            temperature: f.get("temperature")?.unwrap_or(defaults.temperature),
            top_k,
            top_p: f.get("top_p")?.unwrap_or(defaults.top_p),
            min_p: f.get("min_p")?.unwrap_or(defaults.min_p),
            repeat_penalty: f.get("repeat_penalty")?.unwrap_or(defaults.repeat_penalty),
            // No seed: a new one per request, as llama-server does.
            seed: f.get::<u64>("seed")?.unwrap_or_else(rand::random),
            ..defaults
        };
        sampling.check().map_err(|e| ApiError::invalid(e.field, format!("`{}` {}", e.field, e.rule)))?;
        for name in ["presence_penalty", "frequency_penalty"] {
            if f.get::<f32>(name)?.is_some_and(|p| p != 0.0) {
                return Err(ApiError::invalid(
                    name,
                    format!("`{name}` is not supported (use repeat_penalty)"),
                ));
            }
        }
        if f.get::<i64>("n")?.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n", "only `n` = 1 is supported"));
        }
        let max_name = if f.raw("max_tokens").is_some() { "max_tokens" } else { other_max };
        let max_tokens = match f.get::<i64>(max_name)? {
            None => None,
            Some(n) if n <= 0 => {
                return Err(ApiError::invalid(max_name, format!("`{max_name}` must be at least 1 (got {n})")))
            }
            Some(n) => Some(n as usize),
        };
        let stop = match f.raw("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(_) => f.get::<Vec<String>>("stop")?.unwrap_or_default(),
        };
        if stop.len() > MAX_STOPS {
            return Err(ApiError::invalid("stop", format!("at most {MAX_STOPS} `stop` sequences")));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "`stop` sequences must not be empty"));
        }
        let include_usage = match f.raw("stream_options") {
            None => false,
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::invalid(
                        "stream_options",
                        "`stream_options.include_usage` must be a boolean",
                    ))
                }
            },
            Some(_) => return Err(ApiError::invalid("stream_options", "`stream_options` must be an object")),
        };
        Ok(Options {
            sampling,
            max_tokens,
            stop,
            // llama-server's extension: generate to max_tokens whatever the model says.
            ignore_eos: f.get("ignore_eos")?.unwrap_or(false),
            stream: f.get("stream")?.unwrap_or(false),
            include_usage,
        })
    }

    fn into_request(self, endpoint: Endpoint, text: String, messages: Option<Vec<Message>>) -> Request {
        Request {
            endpoint,
            text,
            messages,
            sampling: self.sampling,
            max_tokens: self.max_tokens,
            stop: self.stop,
            ignore_eos: self.ignore_eos,
            stream: self.stream,
            include_usage: self.include_usage,
        }
    }
}

/// The prompt's token ids, or a 400 when it leaves no room for a reply in a slot's context.
pub fn tokenize(request: &Request, tok: &Tokenizer, ctx: usize) -> Result<Vec<u32>, ApiError> {
    let (ids, param) = match request.endpoint {
        // The template writes BOS itself.
        Endpoint::Chat => (tok.encode(&request.text, false), "messages"),
        Endpoint::Completion => (tok.encode(&request.text, true), "prompt"),
    };
    let ids = ids.map_err(|e| ApiError::invalid(param, format!("{e:#}")))?;
    if ids.is_empty() {
        return Err(ApiError::invalid(param, "the prompt is empty"));
    }
    if ids.len() >= ctx {
        let mut e = ApiError::invalid(
            param,
            format!(
                "this server's context is {ctx} tokens per slot, but the prompt is {} tokens (and the reply \
                 needs at least 1): shorten the prompt or start the server with a larger --ctx",
                ids.len()
            ),
        );
        e.code = Some("context_length_exceeded");
        return Err(e);
    }
    Ok(ids)
}

/// Why a reply ended, as OpenAI says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// EOS or a stop sequence.
    Stop,
    /// max_tokens or a full context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// The numbers of a finished reply.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// Prompt tokens found in the slot's KV cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    pub prompt_secs: f64,
    pub generate_secs: f64,
}

impl Outcome {
    pub fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    /// llama-server's `timings` (its field names).
    pub fn timings(&self) -> Value {
        let processed = self.prompt_tokens - self.cached_tokens;
        let per_second = |n: usize, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        json!({
            "cache_n": self.cached_tokens,
            "prompt_n": processed,
            "prompt_ms": self.prompt_secs * 1e3,
            "prompt_per_second": per_second(processed, self.prompt_secs),
            "predicted_n": self.completion_tokens,
            "predicted_ms": self.generate_secs * 1e3,
            "predicted_per_second": per_second(self.completion_tokens, self.generate_secs),
        })
    }
}

/// What every response and chunk of one request carries.
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Header {
    fn object(&self, endpoint: Endpoint, chunk: bool) -> Value {
        let object = match (endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model})
    }
}

/// The whole (non-streamed) response.
pub fn response(h: &Header, endpoint: Endpoint, text: &str, outcome: &Outcome) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": outcome.finish.as_str(),
            "logprobs": null,
        }),
        Endpoint::Completion => json!({
            "index": 0,
            "text": text,
            "finish_reason": outcome.finish.as_str(),
            "logprobs": null,
        }),
    };
    let mut v = h.object(endpoint, false);
    v["choices"] = json!([choice]);
    v["usage"] = outcome.usage();
    v["timings"] = outcome.timings();
    v
}

/// A stream chunk with one choice: some text, or (with `finish`) the last one.
pub fn chunk(h: &Header, endpoint: Endpoint, text: Option<&str>, finish: Option<Finish>) -> Value {
    let finish_reason = finish.map(Finish::as_str);
    let choice = match endpoint {
        Endpoint::Chat => {
            let delta = match text {
                Some(t) => json!({"content": t}),
                None => json!({}),
            };
            json!({"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null})
        }
        Endpoint::Completion => {
            json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish_reason, "logprobs": null})
        }
    };
    let mut v = h.object(endpoint, true);
    v["choices"] = json!([choice]);
    v
}

/// The first chat chunk: the assistant's role, as OpenAI sends it.
pub fn role_chunk(h: &Header) -> Value {
    let mut v = h.object(Endpoint::Chat, true);
    v["choices"] = json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null, "logprobs": null}]);
    v
}

/// The last chunk with a choice: its finish reason, the usage and the timings.
pub fn final_chunk(h: &Header, endpoint: Endpoint, outcome: &Outcome) -> Value {
    let mut v = chunk(h, endpoint, None, Some(outcome.finish));
    v["usage"] = outcome.usage();
    v["timings"] = outcome.timings();
    v
}

/// `stream_options.include_usage`: the usage alone, with no choices.
pub fn usage_chunk(h: &Header, endpoint: Endpoint, outcome: &Outcome) -> Value {
    let mut v = h.object(endpoint, true);
    v["choices"] = json!([]);
    v["usage"] = outcome.usage();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<Request, ApiError> {
        parse_chat(body.to_string().as_bytes(), &ChatTemplate::mixtral_instruct())
    }

    fn completion(body: Value) -> Result<Request, ApiError> {
        parse_completion(body.to_string().as_bytes())
    }

    /// The error's field, for a request that must fail.
    fn param(r: Result<Request, ApiError>) -> String {
        let e = r.expect_err("must be rejected");
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
        e.param.unwrap_or_default()
    }

    #[test]
    fn a_chat_request_is_rendered_with_the_template() {
        let r = chat(json!({
            "model": "x",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
            ],
            "temperature": 0, "top_k": 5, "max_tokens": 7, "stop": "END", "seed": 3, "stream": true,
            "stream_options": {"include_usage": true}, "unknown_field": [1],
        }))
        .unwrap();
        // Mixtral's template has no system role: the system prompt is folded into the first message.
        assert_eq!(r.text, "<s>[INST] Be brief.\n\nHi! [/INST]");
        assert_eq!((r.sampling.temperature, r.sampling.top_k, r.sampling.seed), (0.0, 5, 3));
        assert_eq!(
            (r.max_tokens, r.stop.clone(), r.stream, r.include_usage),
            (Some(7), vec!["END".into()], true, true)
        );
        let r = chat(json!({"messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 2}))
            .unwrap();
        assert_eq!(r.max_tokens, Some(2));
        assert_eq!(r.sampling.temperature, SamplingParams::default().temperature);
    }

    #[test]
    fn bad_chat_requests_name_the_field() {
        let user = json!([{"role": "user", "content": "q"}]);
        assert_eq!(param(chat(json!({}))), "messages");
        assert_eq!(param(chat(json!({"messages": []}))), "messages");
        assert_eq!(param(chat(json!({"messages": "hi"}))), "messages");
        assert_eq!(param(chat(json!({"messages": [{"role": "tool", "content": "x"}]}))), "messages[0].role");
        assert_eq!(param(chat(json!({"messages": [{"role": 1, "content": "x"}]}))), "messages[0].role");
        assert_eq!(param(chat(json!({"messages": [{"role": "user"}]}))), "messages[0].content");
        let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert_eq!(param(chat(json!({"messages": image}))), "messages[0].content");
        // The template's own rule: roles alternate.
        let twice = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
        assert_eq!(param(chat(json!({"messages": twice}))), "messages");
        for (field, value) in [
            ("temperature", json!(-1)),
            ("temperature", json!("hot")),
            ("top_p", json!(0)),
            ("top_p", json!(1.5)),
            ("min_p", json!(2)),
            ("top_k", json!(-3)),
            ("top_k", json!(2.5)),
            ("repeat_penalty", json!(0)),
            ("seed", json!(-1)),
            ("max_tokens", json!(0)),
            ("max_tokens", json!(-5)),
            ("max_tokens", json!("10")),
            ("max_completion_tokens", json!(0)),
            ("n", json!(2)),
            ("stop", json!(["a", "b", "c", "d", "e"])),
            ("stop", json!([""])),
            ("stop", json!(5)),
            ("stream", json!("yes")),
            ("stream_options", json!({"include_usage": 1})),
            ("presence_penalty", json!(0.5)),
            ("logprobs", json!(true)),
            ("tools", json!([{"type": "function"}])),
            ("response_format", json!({"type": "json_object"})),
        ] {
            let mut body = json!({"messages": user});
            body[field] = value.clone();
            assert_eq!(param(chat(body)), field, "{field} = {value}");
        }
    }

    #[test]
    fn malformed_bodies() {
        let template = ChatTemplate::mixtral_instruct();
        for body in [&b"{\"messages\": ["[..], b"", b"[1, 2]", b"\"text\"", b"\xff\xfe"] {
            let e = parse_chat(body, &template).unwrap_err();
            assert_eq!((e.status, e.param), (StatusCode::BAD_REQUEST, None), "{body:?}");
        }
    }

    #[test]
    fn completion_requests() {
        let r = completion(json!({"prompt": "Once", "max_tokens": 3})).unwrap();
        assert_eq!((r.text.as_str(), r.max_tokens, r.endpoint), ("Once", Some(3), Endpoint::Completion));
        assert_eq!(completion(json!({"prompt": ["Once"]})).unwrap().text, "Once");
        assert_eq!(param(completion(json!({}))), "prompt");
        assert_eq!(param(completion(json!({"prompt": ["a", "b"]}))), "prompt");
        assert_eq!(param(completion(json!({"prompt": [1, 2]}))), "prompt");
        assert_eq!(param(completion(json!({"prompt": "a", "echo": true}))), "echo");
        assert_eq!(param(completion(json!({"prompt": "a", "best_of": 2}))), "best_of");
        assert_eq!(param(completion(json!({"prompt": "a", "temperature": -0.1}))), "temperature");
    }

    #[test]
    fn errors_are_openai_shaped() {
        let v = ApiError::invalid("top_p", "`top_p` must be in (0, 1]").to_json();
        assert_eq!(v["error"]["param"], "top_p");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let busy = ApiError::busy(3).into_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
    }
}
