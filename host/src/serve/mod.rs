//! `airlock serve`: a web UI and a JSON API over one data root.
//!
//! Everything is read-only except one action, rescan, which needs the bearer
//! token from the file named by `--token-file` and is written to the audit
//! log like the CLI's. Pages are rendered on the server from the templates in
//! `templates/` (HTML-escaped), so the UI needs no script at all; the
//! Content-Security-Policy forbids scripts outright.
//!
//! Every handler reads the data root afresh through `lifecycle::listing`, which
//! never follows a link out of it and refuses names that are not one plain
//! path component.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::{Form, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Redirect, Response};
use axum::routing::{get, post};
use minijinja::value::Serde;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lifecycle::audit::{AuditLog, Entry};
use crate::lifecycle::{self, Manifest, Root, listing};
use crate::pipeline::StageVerdict;
use crate::policy::Stage;

/// Audit entries shown when the request does not ask for a number.
const AUDIT_PAGE: usize = 500;
/// Tensor rows on one model page; a search narrows the rest.
const TENSOR_PAGE: usize = 2000;

/// The operator's secret for actions, read once at start.
pub struct Token {
    digest: [u8; 32],
}

impl Token {
    /// Reads a token file: a regular file (a FIFO would hang start-up), not
    /// readable by group or others (as ssh treats a private key), holding at
    /// least 16 characters after trimming, of which at least 6 differ (a
    /// token such as `aaaaaaaaaaaaaaaa` is refused). Red team D20.
    pub fn from_file(path: &Path) -> Result<Token> {
        let text = crate::fsutil::read_secret(path, "--token-file", 4096)?;
        let token = text.trim();
        if token.chars().count() < 16 {
            bail!("--token-file {}: the token must be at least 16 characters", path.display());
        }
        let distinct: std::collections::BTreeSet<char> = token.chars().collect();
        if distinct.len() < 6 {
            bail!(
                "--token-file {}: the token repeats {} character(s); use a random one, e.g. `openssl rand -hex 24`",
                path.display(),
                distinct.len()
            );
        }
        Ok(Token { digest: Sha256::digest(token.as_bytes()).into() })
    }

    /// Compares digests in constant time, so the answer's timing says nothing about the token.
    fn matches(&self, given: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        d.iter().zip(self.digest.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

struct App {
    root: Root,
    token: Option<Token>,
    /// Host headers accepted when listening on loopback (DNS-rebinding guard).
    allowed_hosts: Option<Vec<String>>,
}

type Shared = Arc<App>;

/// The pages' templates, parsed once for the process.
fn templates() -> &'static minijinja::Environment<'static> {
    static ENV: std::sync::OnceLock<minijinja::Environment<'static>> = std::sync::OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        for (name, text) in [
            ("base.html", include_str!("templates/base.html")),
            ("macros.html", include_str!("templates/macros.html")),
            ("registry.html", include_str!("templates/registry.html")),
            ("model.html", include_str!("templates/model.html")),
            ("rejected.html", include_str!("templates/rejected.html")),
            ("report.html", include_str!("templates/report.html")),
            ("queue.html", include_str!("templates/queue.html")),
            ("audit.html", include_str!("templates/audit.html")),
            ("error.html", include_str!("templates/error.html")),
        ] {
            env.add_template(name, text).expect("the built-in templates parse");
        }
        env
    })
}

/// How long a client has to send a request's headers, and how long an idle
/// keep-alive connection is kept (hyper restarts this timer between requests).
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one request may take from its headers to its answer, body read
/// included; a client that trickles its body gets 408.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Connections held at once, at most. At the cap the oldest connection is
/// closed to make room, so a crowd of idle or trickling clients cannot keep
/// a new request waiting (red team D7). Lowered when the process may open
/// fewer files.
const MAX_CONNECTIONS: usize = 512;
/// File descriptors kept for everything but connections (the data root's reads, logs).
const SPARE_FDS: u64 = 64;

/// Serves until SIGINT or SIGTERM. `on_ready` gets the bound address (the
/// port may have been 0).
pub fn run(root: Root, listen: SocketAddr, token: Option<Token>, on_ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let cap = connection_cap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("--listen {listen}: cannot bind"))?;
        let addr = listener.local_addr()?;
        let allowed_hosts = addr.ip().is_loopback().then(|| {
            let p = addr.port();
            vec![format!("127.0.0.1:{p}"), format!("localhost:{p}"), format!("[::1]:{p}"), addr.to_string()]
        });
        let app = Arc::new(App { root, token, allowed_hosts });
        on_ready(addr);
        tracing::debug!(cap, "serving at most {cap} connections at once");
        let router = router(app);
        tokio::select! {
            r = accept_loop(listener, router, cap) => r,
            _ = shutdown() => Ok(()),
        }
    })
}

/// Raises the soft limit on open files to the hard one (systemd's default
/// soft limit is 1024) and returns how many connections fit under it.
fn connection_cap() -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return MAX_CONNECTIONS;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    let usable = lim.rlim_cur.saturating_sub(SPARE_FDS).max(8);
    MAX_CONNECTIONS.min(usize::try_from(usable).unwrap_or(MAX_CONNECTIONS))
}

/// Accepts connections and serves each with hyper's HTTP/1 server, under a
/// header-read timeout that also bounds idle keep-alive time, and a cap on
/// live connections that closes the oldest when a new one arrives at it.
async fn accept_loop(listener: tokio::net::TcpListener, router: Router, cap: usize) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    let live: Arc<Mutex<BTreeMap<u64, tokio::sync::oneshot::Sender<()>>>> = Arc::default();
    let mut next_id = 0u64;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(true);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: wait briefly, never spin.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let id = next_id;
        next_id += 1;
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        {
            let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
            while live.len() >= cap {
                // Dropping the sender wakes the oldest connection's task, which closes it.
                live.pop_first();
            }
            live.insert(id, close);
        }
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let live = live.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn => {}
                _ = closed => {}
            }
            live.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        });
    }
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(registry_page))
        .route("/models/{name}", get(model_page))
        .route("/rejected", get(rejected_page))
        .route("/rejected/{name}", get(report_page))
        .route("/rejected/{name}/rescan", post(rescan_form))
        .route("/queue", get(queue_page))
        .route("/audit", get(audit_page))
        .route("/api/registry", get(registry_api))
        .route("/api/models/{name}", get(model_api))
        .route("/api/rejected", get(rejected_api))
        .route("/api/rejected/{name}", get(report_api))
        .route("/api/rejected/{name}/rescan", post(rescan_api))
        .route("/api/queue", get(queue_api))
        .route("/api/audit", get(audit_api))
        .fallback(|| async { Failure::new(StatusCode::NOT_FOUND, "no such page") })
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .with_state(app)
}

/// Refuses requests for a foreign Host on a loopback listener (a web page
/// elsewhere cannot read the UI through DNS rebinding), and sets headers that
/// keep pages from running script, being framed or sniffed.
async fn guard(State(app): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut res = 'answer: {
        if let Some(allowed) = &app.allowed_hosts {
            let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            if !allowed.iter().any(|a| a == host) {
                break 'answer Failure::new(
                    StatusCode::MISDIRECTED_REQUEST,
                    format!("Host {host:?} is not this server"),
                )
                .into_response();
            }
        }
        match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
            Ok(res) => res,
            Err(_) => Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request took longer than {} s", REQUEST_TIMEOUT.as_secs()),
            )
            .into_response(),
        }
    };
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// An error answer: an HTML page for the UI, `{"error": ...}` for the API.
struct Failure {
    status: StatusCode,
    message: String,
    json: bool,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure { status, message: message.into(), json: false }
    }

    fn from_io(e: std::io::Error, what: &str) -> Failure {
        let status = match e.kind() {
            std::io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
            // A name too long for the file system is the client's mistake (red team D22).
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidFilename => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // A custom error (a link or a file where a folder belongs) keeps its detail.
        let message = match (status, e.get_ref()) {
            (StatusCode::NOT_FOUND, None) => format!("{what}: not found"),
            (StatusCode::NOT_FOUND, Some(detail)) => format!("{what}: not found ({detail})"),
            _ => format!("{what}: {e}"),
        };
        Failure::new(status, message)
    }

    fn api(mut self) -> Failure {
        self.json = true;
        self
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        if self.json {
            return (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        }
        let page = templates()
            .get_template("error.html")
            .and_then(|t| {
                t.render(
                    minijinja::context! { status => self.status.to_string(), message => &self.message, root => "" },
                )
            })
            .unwrap_or_else(|e| format!("{}: {} (and the error page failed: {e})", self.status, self.message));
        (self.status, Html(page)).into_response()
    }
}

type Page = Result<Html<String>, Failure>;

impl App {
    fn render(&self, name: &str, page: &str, ctx: minijinja::Value) -> Page {
        let base = minijinja::context! { root => self.root.path.display().to_string(), page => page };
        templates()
            .get_template(name)
            .and_then(|t| t.render(minijinja::context! { ..base, ..ctx }))
            .map(Html)
            .map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering {name}: {e:#}")))
    }
}

/// Runs blocking file reads off the async workers.
async fn blocking<T: Send + 'static>(
    app: &Shared,
    f: impl FnOnce(&App) -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || f(&app))
        .await
        .unwrap_or_else(|e| Err(Failure::new(StatusCode::INTERNAL_SERVER_ERROR, format!("handler failed: {e}"))))
}

// ---- data, shared by the pages and the API ----

fn registry(app: &App) -> Result<Vec<lifecycle::IndexEntry>, Failure> {
    lifecycle::read_index(&app.root).map_err(|e| Failure::from_io(e, "registry index"))
}

fn manifest(app: &App, name: &str) -> Result<Manifest, Failure> {
    listing::manifest(&app.root, name).map_err(|e| Failure::from_io(e, &format!("registry/{name}")))
}

fn report(app: &App, name: &str) -> Result<lifecycle::Report, Failure> {
    listing::report(&app.root, name).map_err(|e| Failure::from_io(e, &format!("rejected/{name}")))
}

/// Who signed the model, as stage 4's plugin reported it.
fn signer(m: &Manifest) -> String {
    let provenance = m.stages.iter().filter(|s| s.stage == Stage::ProvenanceCheck);
    let mut signers = Vec::new();
    let mut summary = None;
    for s in provenance {
        summary.get_or_insert_with(|| format!("{}: {}", s.verdict.upper(), s.summary));
        if s.verdict != StageVerdict::Pass {
            continue;
        }
        let verified = s.details.as_ref().and_then(|d| d["verified"].as_array().cloned()).unwrap_or_default();
        let field = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or("?").to_string();
        signers.extend(
            verified.iter().map(|v| format!("{} ({}, {})", field(v, "signer"), field(v, "kind"), field(v, "file"))),
        );
    }
    if signers.is_empty() {
        format!("unsigned (stage 4 {})", summary.unwrap_or_else(|| "did not run".into()))
    } else {
        signers.join("; ")
    }
}

#[derive(Serialize)]
struct TensorRow<'a> {
    file: &'a str,
    name: &'a str,
    dtype: &'a str,
    shape: &'a [u64],
    offset: u64,
    length: u64,
    sha256: &'a str,
}

#[derive(Deserialize)]
struct TensorQuery {
    #[serde(default)]
    q: String,
}

#[derive(Serialize)]
struct ChainStatus {
    ok: bool,
    entries: u64,
    error: Option<String>,
}

#[derive(Serialize)]
struct AuditView {
    chain: ChainStatus,
    total: usize,
    shown: usize,
    /// Newest first.
    entries: Vec<Entry>,
    read_error: Option<String>,
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<usize>,
}

fn audit(app: &App, limit: usize) -> AuditView {
    let log = AuditLog::new(&app.root.audit_log());
    let chain = match log.verify() {
        Ok(n) => ChainStatus { ok: true, entries: n, error: None },
        Err(e) => ChainStatus { ok: false, entries: 0, error: Some(e) },
    };
    let (mut entries, read_error) = match log.entries() {
        Ok(e) => (e, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let total = entries.len();
    entries.reverse();
    entries.truncate(limit);
    AuditView { chain, total, shown: entries.len(), entries, read_error }
}

// ---- pages ----

async fn registry_page(State(app): State<Shared>) -> Page {
    blocking(&app, |app| {
        app.render("registry.html", "registry", minijinja::context! { models => Serde(registry(app)?) })
    })
    .await
}

async fn model_page(State(app): State<Shared>, UrlPath(name): UrlPath<String>, Query(q): Query<TensorQuery>) -> Page {
    blocking(&app, move |app| {
        let m = manifest(app, &name)?;
        let needle = q.q.to_lowercase();
        let all: Vec<TensorRow> = m
            .integrity
            .files
            .iter()
            .flat_map(|f| {
                f.tensors.iter().map(move |t| TensorRow {
                    file: &f.path,
                    name: &t.name,
                    dtype: &t.dtype,
                    shape: &t.shape,
                    offset: t.offset,
                    length: t.length,
                    sha256: &t.sha256,
                })
            })
            .collect();
        let total_tensors = all.len();
        let mut tensors: Vec<&TensorRow> = all.iter().filter(|t| t.name.to_lowercase().contains(&needle)).collect();
        let truncated = tensors.len() > TENSOR_PAGE;
        tensors.truncate(TENSOR_PAGE);
        app.render(
            "model.html",
            "registry",
            minijinja::context! { manifest => Serde(&m), signer => signer(&m), tensors => Serde(tensors), total_tensors, truncated, q => q.q },
        )
    })
    .await
}

async fn rejected_page(State(app): State<Shared>) -> Page {
    blocking(&app, |app| {
        let models = listing::rejected(&app.root).map_err(|e| Failure::from_io(e, "rejected/"))?;
        app.render("rejected.html", "rejected", minijinja::context! { models => Serde(models) })
    })
    .await
}

async fn report_page(State(app): State<Shared>, UrlPath(name): UrlPath<String>) -> Page {
    blocking(&app, move |app| {
        let report = report(app, &name)?;
        app.render(
            "report.html",
            "rejected",
            minijinja::context! { name, report => Serde(report), can_act => app.token.is_some() },
        )
    })
    .await
}

async fn queue_page(State(app): State<Shared>) -> Page {
    blocking(&app, |app| {
        let queue = listing::queue(&app.root).map_err(|e| Failure::from_io(e, "quarantine/"))?;
        app.render("queue.html", "queue", minijinja::context! { queue => Serde(queue) })
    })
    .await
}

async fn audit_page(State(app): State<Shared>, Query(q): Query<AuditQuery>) -> Page {
    blocking(&app, move |app| {
        let view = audit(app, q.limit.unwrap_or(AUDIT_PAGE));
        app.render("audit.html", "audit", minijinja::Value::from(Serde(&view)))
    })
    .await
}

// ---- API ----

type Api<T> = Result<Json<T>, Failure>;

async fn registry_api(State(app): State<Shared>) -> Api<Vec<lifecycle::IndexEntry>> {
    blocking(&app, registry).await.map(Json).map_err(Failure::api)
}

async fn model_api(State(app): State<Shared>, UrlPath(name): UrlPath<String>) -> Api<Manifest> {
    blocking(&app, move |app| manifest(app, &name)).await.map(Json).map_err(Failure::api)
}

async fn rejected_api(State(app): State<Shared>) -> Api<Vec<listing::Rejected>> {
    blocking(&app, |app| listing::rejected(&app.root).map_err(|e| Failure::from_io(e, "rejected/")))
        .await
        .map(Json)
        .map_err(Failure::api)
}

async fn report_api(State(app): State<Shared>, UrlPath(name): UrlPath<String>) -> Api<lifecycle::Report> {
    blocking(&app, move |app| report(app, &name)).await.map(Json).map_err(Failure::api)
}

async fn queue_api(State(app): State<Shared>) -> Api<listing::Queue> {
    blocking(&app, |app| listing::queue(&app.root).map_err(|e| Failure::from_io(e, "quarantine/")))
        .await
        .map(Json)
        .map_err(Failure::api)
}

async fn audit_api(State(app): State<Shared>, Query(q): Query<AuditQuery>) -> Api<AuditView> {
    blocking(&app, move |app| Ok(audit(app, q.limit.unwrap_or(usize::MAX)))).await.map(Json).map_err(Failure::api)
}

// ---- the one action ----

/// Checks the token, then moves a rejected model back to incoming/. The
/// audit entry names the actor `web`.
fn rescan(app: &App, name: &str, given: Option<&str>) -> Result<Entry, Failure> {
    let Some(token) = &app.token else {
        return Err(Failure::new(StatusCode::FORBIDDEN, "read-only: this server was started without --token-file"));
    };
    if !given.is_some_and(|g| token.matches(g)) {
        tracing::warn!(model = name, "rescan refused: missing or wrong token");
        return Err(Failure::new(StatusCode::UNAUTHORIZED, "rescan needs the operator's bearer token"));
    }
    if !listing::is_plain_name(name) {
        return Err(Failure::new(StatusCode::BAD_REQUEST, format!("{name:?} is not a plain name")));
    }
    if std::fs::symlink_metadata(app.root.rejected().join(name)).is_err()
        || !listing::is_rejected_model(&app.root, name)
    {
        return Err(Failure::new(StatusCode::NOT_FOUND, format!("rejected/{name}: not found")));
    }
    lifecycle::rescan(&app.root, name, "web")
        .map_err(|e| Failure::new(StatusCode::CONFLICT, format!("rescan {name}: {e}")))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ").map(str::trim)
}

async fn rescan_api(State(app): State<Shared>, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let given = bearer(&headers).map(String::from);
    let done = blocking(&app, move |app| rescan(app, &name, given.as_deref())).await;
    match done {
        Ok(entry) => Json(serde_json::json!({ "rescanned": entry.model, "audit_seq": entry.seq })).into_response(),
        Err(f) if f.status == StatusCode::UNAUTHORIZED => {
            let mut res = f.api().into_response();
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            res
        }
        Err(f) => f.api().into_response(),
    }
}

#[derive(Deserialize)]
struct RescanForm {
    token: String,
}

/// The HTML form's rescan: a browser form cannot send an Authorization
/// header, so the token comes in the body (which also stops cross-site posts).
async fn rescan_form(
    State(app): State<Shared>,
    UrlPath(name): UrlPath<String>,
    Form(form): Form<RescanForm>,
) -> Result<Redirect, Failure> {
    blocking(&app, move |app| rescan(app, &name, Some(&form.token))).await?;
    Ok(Redirect::to("/queue"))
}

/// `--listen`'s default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8440";

/// The token from `--token-file`; none (read-only) without one.
pub fn token(path: Option<&PathBuf>) -> Result<Option<Token>> {
    path.map(|p| Token::from_file(p)).transpose()
}
