//! `mixtral-q serve` on loopback, driven by the official `openai` Python client and by raw HTTP
//! (tests/serve/*.py; `bash .ci/run` installs the client into .venv): chat and completions, streamed
//! and not, checked against `mixtral-q generate` and `tokenize`; every bad input; a load test.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// The tiny model as Q8_0, converted once per test in `dir`.
fn model(dir: &Path) -> PathBuf {
    let out = dir.join("tiny-q8_0.gguf");
    let o =
        run(&["quantize", tiny_model_dir().to_str().unwrap(), "-o", out.to_str().unwrap(), "--type", "q8_0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

/// A running server; killed when dropped. Its log (stderr) is collected as it comes.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        let mut child = bin()
            .args(["serve", "-m", model.to_str().unwrap(), "--port", "0", "--threads", "1"])
            .args(args)
            .env_remove("MIXTRAL_Q_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mixtral-q serve");
        let log = Arc::new(Mutex::new(String::new()));
        let (listening, url) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("listening on http://") {
                    let _ = listening.send(line[at + "listening on ".len()..].to_owned());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let url = url.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("the server did not start:\n{}", log.lock().unwrap())
        });
        Server { child, url, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Runs `tests/serve/SCRIPT` against this server; fails the test (with both sides' output) if
    /// the script fails. Returns its stdout.
    fn run_script(&self, script: &str, model: &Path, env: &[(&str, &str)]) -> String {
        let out = Command::new(python())
            .arg(repo().join("tests/serve").join(script))
            .env("MIXTRAL_Q_URL", &self.url)
            .env("MIXTRAL_Q_BIN", env!("CARGO_BIN_EXE_mixtral-q"))
            .env("MIXTRAL_Q_MODEL", model)
            .env("MIXTRAL_Q_SERVER_PID", self.child.id().to_string())
            .envs(env.iter().copied())
            .output()
            .expect("cannot run python");
        let stdout = stdout(&out);
        assert!(
            out.status.success(),
            "{script} failed:\n{stdout}\n{}\n--- server log ---\n{}",
            stderr(&out),
            self.log()
        );
        stdout
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_openai_client_gets_what_generate_and_tokenize_compute() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let server = Server::start(&model, &["--slots", "2", "--api-key", "test-key"]);
    let out = server.run_script("client.py", &model, &[("MIXTRAL_Q_API_KEY", "test-key")]);
    println!("{out}");
    assert!(out.contains("all client checks passed"), "{out}");
}

#[test]
fn bad_input_gets_an_openai_error_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let server = Server::start(&model, &["--slots", "1", "--max-queue", "1", "--ctx", "8192"]);
    let out = server.run_script("errors.py", &model, &[]);
    println!("{out}");
    assert!(out.contains("all error checks passed"), "{out}");
}

#[test]
fn load_test_eight_streaming_clients() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let server = Server::start(&model, &["--slots", "4", "--ctx", "16384"]);
    let out = server.run_script("load.py", &model, &[]);
    println!("{out}");
    // The client killed mid-stream: the server says it stopped that request, long before its
    // max_tokens (and its slot's context) would have ended it.
    let killed =
        out.lines().find_map(|l| l.strip_prefix("killed request: ")).expect("the killed request's id");
    let id = killed.trim().trim_start_matches("cmpl-");
    let log = server.log();
    let line = log
        .lines()
        .find(|l| l.starts_with(&format!("request {id}: the client went away")))
        .unwrap_or_else(|| panic!("no stop of request {id} in the log:\n{log}"));
    let tokens: usize =
        line.split("stopped after ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(tokens < 2000, "{line}");
    assert!(out.contains("all load checks passed"), "{out}");
}

/// One HTTP/1.1 request with `Connection: close`; the status code and the body.
fn http(url: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // A chunked body: its one chunk (the JSON object).
    let body = match (body.find('{'), body.rfind('}')) {
        (Some(a), Some(b)) => &body[a..=b],
        _ => body,
    };
    (status, body.to_owned())
}

#[test]
fn stats_say_where_each_slots_experts_ran() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path());
    let server = Server::start(&model, &["--slots", "2", "--device", "standin:3"]);
    let (status, _) = http(
        &server.url,
        "POST",
        "/v1/completions",
        r#"{"prompt": "Hello", "max_tokens": 6, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{}", server.log());
    let (status, body) = http(&server.url, "GET", "/stats", "");
    assert_eq!(status, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(stats["backend"].as_str().unwrap().contains("stand-in device (3 expert slots)"), "{stats}");
    let slots = stats["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 2, "{stats}");
    let tokens: u64 = slots.iter().map(|s| s["tokens"].as_u64().unwrap()).sum();
    assert!(tokens >= 6, "{stats}");
    let runs: u64 = slots
        .iter()
        .map(|s| s["experts_on_device"].as_u64().unwrap() + s["experts_on_host"].as_u64().unwrap())
        .sum();
    assert!(runs > 0, "{stats}");
}
