//! Upstreams at run time: endpoints picked round-robin, a pooled keep-alive HTTP client, and the policies shared
//! by every route to the upstream (breaker, bulkhead, rate limit).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use envelope_core::bulkhead::{Bulkhead, Config as BulkheadConfig};
use envelope_core::circuit_breaker::{CircuitBreaker, State};
use envelope_core::event::Listeners;
use envelope_core::fault::{Fault, FaultInjector};
use envelope_core::rate_limit::{Config as RateConfig, RateLimiter};
use envelope_core::{BoxError, HasOutcome, Outcome};
use envelope_http::body::AttemptBody;
use http::{HeaderValue, Request};
use http_body_util::{Either, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::client;
use crate::config::{BreakerMode, Endpoint, Upstream};
use crate::h1::InBody;

/// The body the client sends upstream: a replayable buffer, or the client's body streamed once.
pub(crate) type UpstreamBody = AttemptBody<Limited<InBody>>;

/// An upstream's response body: from the sidecar's own HTTP/1.1 client, or from hyper-util's.
pub(crate) type ResponseBody = Either<Incoming, client::Body>;

/// The headers the proxy sets on each request it forwards, replacing the client's own (written by the upstream
/// client with the rest of the head, rather than inserted into the request's header map).
pub(crate) struct SetHeaders<'a> {
    /// `X-Request-ID`, when the client's was missing or invalid (a valid one is forwarded as it came).
    pub(crate) request_id: Option<&'a HeaderValue>,
    /// `traceparent`: this hop's span (or, with span export on, the attempt's), as bytes (see
    /// `TraceContext::traceparent`).
    pub(crate) traceparent: &'a [u8],
    /// `X-Forwarded-For`, the client's address appended.
    pub(crate) forwarded_for: &'a HeaderValue,
}

/// Consecutive connection failures after which an endpoint is taken out of rotation.
pub(crate) const EJECT_AFTER_FAILURES: u32 = 3;
/// How long an ejected endpoint stays out of rotation before it is tried again.
pub(crate) const EJECT_FOR: Duration = Duration::from_secs(10);

/// Passive health of one endpoint: consecutive connection failures, and until when it is out of rotation.
#[derive(Debug, Default)]
pub(crate) struct EndpointHealth {
    failures: AtomicU32,
    /// Nanoseconds since the upstream's epoch; 0 when in rotation.
    ejected_until: AtomicU64,
}

/// An upstream, ready to take requests.
pub(crate) struct UpstreamRt {
    pub(crate) spec: Upstream,
    next: AtomicUsize,
    epoch: Instant,
    pub(crate) health: Vec<EndpointHealth>,
    /// Plain-http endpoints, for requests whose body is buffered: the sidecar's own pooled HTTP/1.1 client.
    pool: Arc<client::Pool>,
    /// Everything else (https, streamed bodies): hyper-util's pooled client.
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    pub(crate) breaker: Option<CircuitBreaker>,
    pub(crate) bulkhead: Option<Bulkhead>,
    pub(crate) rate_limit: Option<RateLimiter>,
    /// Faults injected into every attempt to this upstream (set through the admin API, always with an expiry).
    pub(crate) faults: FaultInjector,
    /// The status an injected abort answers with (the fault's outcome stands for it inside the envelope).
    pub(crate) fault_status: AtomicU16,
}

/// A fault to inject into an upstream's attempts, as the admin API and quality scenarios give it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FaultSpec {
    /// Answer this status (400–599) instead of calling the upstream, for `abort_percent` of attempts.
    pub(crate) abort_status: Option<u16>,
    pub(crate) abort_percent: f64,
    /// Add this latency before `delay_percent` of attempts.
    pub(crate) delay: Option<Duration>,
    pub(crate) delay_percent: f64,
    /// How long the fault lasts (it always ends by itself).
    pub(crate) duration: Duration,
}

/// The longest a fault may last.
pub(crate) const MAX_FAULT_DURATION: Duration = Duration::from_secs(3600);

impl FaultSpec {
    /// Checks the ranges, naming the field at fault.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(s) = self.abort_status
            && !(400..=599).contains(&s)
        {
            return Err(format!("abort_status {s} must be in 400..=599"));
        }
        for (name, p) in [("abort_percent", self.abort_percent), ("delay_percent", self.delay_percent)] {
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("{name} {p} must be in [0, 100]"));
            }
        }
        if self.duration.is_zero() || self.duration > MAX_FAULT_DURATION {
            return Err(format!("duration must be more than 0 and at most {}s", MAX_FAULT_DURATION.as_secs()));
        }
        Ok(())
    }

    /// The outcome an aborted attempt stands for: what the policies would see from a real answer of that status.
    fn outcome(status: u16) -> Outcome {
        match status {
            429 => Outcome::RateLimited,
            500..=599 => Outcome::Upstream5xx,
            _ => Outcome::Upstream4xx,
        }
    }
}

impl UpstreamRt {
    pub(crate) fn new(spec: &Upstream, listeners: &Listeners) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(spec.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(&spec.extra_roots))
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(spec.idle_timeout)
            .pool_max_idle_per_host(spec.max_idle_per_endpoint)
            .build(connector);
        let breaker = spec.breaker.as_ref().map(|b| {
            let config = b.to_config(listeners.clone()).expect("validated when the config was loaded");
            let state = match b.mode {
                BreakerMode::Normal => State::Closed,
                BreakerMode::Disabled => State::Disabled,
                BreakerMode::MetricsOnly => State::MetricsOnly,
            };
            CircuitBreaker::with_state(spec.name.clone(), config, state)
        });
        let bulkhead = spec.bulkhead.as_ref().map(|b| {
            let mut config = BulkheadConfig::new(b.max_concurrent).queue(b.queue, b.queue_timeout);
            config.listeners = listeners.clone();
            Bulkhead::new(spec.name.clone(), config)
        });
        let rate_limit = spec.rate_limit.as_ref().map(|r| {
            let mut config = RateConfig::new(r.rate, r.per).burst(r.burst).shadow(r.shadow);
            config.listeners = listeners.clone();
            RateLimiter::new(spec.name.clone(), config)
        });
        Arc::new(UpstreamRt {
            spec: spec.clone(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            health: spec.endpoints.iter().map(|_| EndpointHealth::default()).collect(),
            pool: client::Pool::new(
                spec.endpoints.iter().map(|e| e.connect_to.clone()).collect(),
                spec.connect_timeout,
                Some(spec.idle_timeout),
                spec.max_idle_per_endpoint,
            ),
            client,
            breaker,
            bulkhead,
            rate_limit,
            faults: FaultInjector::with_listeners(spec.name.clone(), listeners.clone()),
            fault_status: AtomicU16::new(503),
        })
    }

    /// Sends one attempt to endpoint `i`: the client's request `parts` (headers already cleaned) to `target`,
    /// with `Host` set to the endpoint and the headers in `set`. Plain http with a buffered body goes through the
    /// sidecar's own client (which writes the head straight from `parts`); the rest through hyper-util's.
    pub(crate) async fn send(
        &self,
        i: usize,
        parts: &http::request::Parts,
        target: &str,
        body: UpstreamBody,
        set: &SetHeaders<'_>,
    ) -> Result<http::Response<ResponseBody>, UpstreamError> {
        let endpoint = &self.spec.endpoints[i];
        if endpoint.scheme == http::uri::Scheme::HTTP
            && let AttemptBody::Full { data, trailers: None } = &body
        {
            let head = client::Head { parts, target, host: &endpoint.host, set };
            return match self.pool.send(i, &head, data.as_deref().unwrap_or_default()).await {
                Ok(r) => Ok(r.map(Either::Right)),
                Err(client::SendError::Connect(e)) => Err(UpstreamError::Connect(e.into())),
                Err(client::SendError::Exchange(e)) => Err(UpstreamError::Exchange(e.into())),
            };
        }
        let uri = http::Uri::builder()
            .scheme(endpoint.scheme.clone())
            .authority(endpoint.authority.clone())
            .path_and_query(target)
            .build()
            .map_err(|e| UpstreamError::Exchange(e.into()))?;
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = parts.headers.clone();
        let headers = req.headers_mut();
        headers.insert(http::header::HOST, endpoint.host.clone());
        if let Ok(traceparent) = HeaderValue::from_bytes(set.traceparent) {
            headers.insert(envelope_http::trace::TRACEPARENT.clone(), traceparent);
        }
        headers.insert(envelope_http::headers::X_FORWARDED_FOR.clone(), set.forwarded_for.clone());
        if let Some(id) = set.request_id {
            headers.insert(envelope_http::request_id::X_REQUEST_ID.clone(), id.clone());
        }
        self.client.request(req).await.map(|r| r.map(Either::Left)).map_err(UpstreamError::from_client)
    }

    /// Injects `fault` into every attempt from now until its duration has passed.
    pub(crate) fn inject(&self, fault: &FaultSpec) -> Result<(), String> {
        fault.validate()?;
        let mut f = match fault.abort_status {
            Some(status) => {
                self.fault_status.store(status, Ordering::Relaxed);
                Fault::abort(FaultSpec::outcome(status), fault.abort_percent)
            }
            None => Fault::delay(Duration::ZERO, 0.0),
        };
        if let Some(delay) = fault.delay {
            f = f.with_delay(delay, fault.delay_percent);
        }
        self.faults.set(f, Some(Instant::now() + fault.duration)).map_err(|e| e.to_string())
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
    }

    /// The next endpoint in rotation, round-robin, skipping ejected endpoints (unless all are ejected).
    pub(crate) fn pick(&self) -> (usize, &Endpoint) {
        let n = self.spec.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = if n > 1 { self.now() } else { 0 };
        let i = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| n == 1 || self.health[i].ejected_until.load(Ordering::Relaxed) <= now)
            .unwrap_or(start % n);
        (i, &self.spec.endpoints[i])
    }

    /// Records whether a connection to endpoint `i` could be made.
    pub(crate) fn report(&self, i: usize, connected: bool) {
        let h = &self.health[i];
        if connected {
            if h.failures.load(Ordering::Relaxed) != 0 {
                h.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        if h.failures.fetch_add(1, Ordering::Relaxed) + 1 >= EJECT_AFTER_FAILURES {
            h.failures.store(0, Ordering::Relaxed);
            h.ejected_until.store(self.now() + EJECT_FOR.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Whether endpoint `i` is in rotation now.
    pub(crate) fn healthy(&self, i: usize) -> bool {
        self.health[i].ejected_until.load(Ordering::Relaxed) <= self.now()
    }
}

/// TLS for https endpoints: the Mozilla roots (webpki-roots) plus the upstream's `ca_file`, with ring.
fn tls_config(extra_roots: &[Vec<u8>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for der in extra_roots {
        // Validated when the config was loaded; a certificate rustls cannot use is skipped.
        let _ = roots.add(rustls_pki_types::CertificateDer::from(der.clone()));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl fmt::Debug for UpstreamRt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamRt").field("name", &self.spec.name).finish_non_exhaustive()
    }
}

/// Why an attempt got no response from the upstream.
#[derive(Debug)]
pub(crate) enum UpstreamError {
    /// The connection could not be made: not a byte of the request was sent.
    Connect(BoxError),
    /// The exchange failed after the request (or part of it) was sent.
    Exchange(BoxError),
    /// The request body was streamed by an earlier attempt and cannot be sent again.
    BodyGone,
}

impl UpstreamError {
    pub(crate) fn from_client(e: hyper_util::client::legacy::Error) -> Self {
        if e.is_connect() { UpstreamError::Connect(e.into()) } else { UpstreamError::Exchange(e.into()) }
    }

    /// What a client is told of this failure: a stable sentence per kind, without the cause's text (OS errors,
    /// addresses), which goes to the log.
    pub(crate) fn public(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "the upstream could not be reached",
            UpstreamError::Exchange(_) => "the upstream connection failed before a whole answer",
            UpstreamError::BodyGone => "the request body cannot be sent again",
        }
    }

    /// Whether the request provably never left.
    pub(crate) fn never_sent(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "cannot connect to the upstream: {e}"),
            UpstreamError::Exchange(e) => write!(f, "the upstream exchange failed: {e}"),
            UpstreamError::BodyGone => f.write_str("the request body cannot be sent again"),
        }
    }
}

impl std::error::Error for UpstreamError {}

impl HasOutcome for UpstreamError {
    fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::Connect(_) => Outcome::ConnectError,
            UpstreamError::Exchange(_) => Outcome::UpstreamReset,
            UpstreamError::BodyGone => Outcome::BadRequest,
        }
    }
}
