//! The sidecar's request path, top to bottom, in one function: [`handle`].
//!
//! ```text
//! socket ─► hyper (head limits: 431, 408) ─► handle:
//!   1. request id, trace   keep a valid X-Request-ID or make one; echoed on every response, logged once;
//!                          W3C traceparent kept or started
//!   2. input limits        414 URI too long, 413 body too large (by Content-Length, and while reading)
//!   3. route               most specific path prefix or template + method (found by prefix, whatever the
//!                          number of routes); 404 otherwise
//!   4. header hygiene      hop-by-hop headers stripped, X-Forwarded-For appended, Host = upstream
//!   5. body                buffered for replay up to the route's cap, else streamed once (never retried); a gRPC
//!                          call's streamed as it comes and copied within the cap (replayable once all sent)
//!   6. the envelope        shed → deadline → retry → breaker → rate limit → bulkhead → attempt timeout
//!                          (envelope-core's Envelope, composed in that order; see docs/architecture.md)
//!   7. the call            pooled keep-alive HTTP/1.1 to an endpoint picked round-robin (faults injected here,
//!                          inside the envelope; with spans on, each attempt carries its own span id upstream)
//!   8. the answer          the upstream's response; or, when it failed for a reason the route names, the route's
//!                          fallback's (a static answer, or another upstream's within the deadline, marked
//!                          `Envelope-Fallback`); or a problem+json for a local outcome (one place)
//!   9. accounting          metrics (+ exemplar), SLO, history tallies, business counters, spans, one access-log line
//! ```
//!
//! Nothing here returns an error to hyper: every outcome is a response, so no connection is dropped for a
//! local failure.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use envelope_core::{BoxError, CallOptions, Classify, Envelope, Error, Outcome};
use envelope_http::body::{Replay as BodyReplay, prepare, tee};
use envelope_http::classify::StatusClassifier;
use envelope_http::headers::forwarded_for;
use envelope_http::idempotency::{Replay, replay_safety};
use envelope_http::problem::problem_after;
use envelope_http::request_id::{RequestId, X_REQUEST_ID};
use envelope_http::trace::TraceContext;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full, Limited};
use tokio::time::Instant;

use crate::config::{FallbackReason, KeySource, Underscores};
use crate::data::InBody;
use crate::data::outbound::{self, ProxyHeaders, UpstreamError, clean_answer, clean_request};
use crate::data::runtime::{FallbackRt, FallbackTarget, RouteRt, Runtime};
use crate::data::upstream::UpstreamRt;
use crate::data::wire::RawHead;
use crate::observe::access_log::{self, Entry};
use crate::observe::metrics::{AttemptMetrics, Served};
use crate::observe::telemetry::{AttemptSpan, RequestSpan};

/// What the sidecar answers with: the upstream's body (under the route's deadline), or a local one.
pub(crate) type ProxyBody = Either<DeadlineBody<outbound::Body>, Full<Bytes>>;

/// An upstream body that must finish by the route's deadline: the route timeout covers the whole response, not
/// only its head. A body that stalls past it is cut off (the client sees the response end early, the upstream
/// connection is closed). The timer is armed only if the body makes the proxy wait: most bodies are in hand with
/// their head and never need one.
///
/// It also carries the request's record while the body is still coming, so that the request is counted and logged
/// once its body has ended: as answered if it ended cleanly, as `upstream_reset` (or `timeout`, cut off at the
/// deadline) if it broke off after the head, as `client_cancelled` if the client went away first.
pub(crate) struct DeadlineBody<B> {
    body: B,
    deadline: Instant,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    record: Option<Box<Pending>>,
}

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            return Poll::Ready(match frame {
                None => {
                    this.finish(None);
                    None
                }
                Some(Ok(frame)) => {
                    // A gRPC call's status comes last, in the trailers: the request is recorded with it.
                    if let (Some(record), Some(trailers)) = (&mut this.record, frame.trailers_ref())
                        && let Some(code) = envelope_http::grpc::status_in(trailers)
                    {
                        record.grpc_status(code);
                    }
                    if this.body.is_end_stream() {
                        this.finish(None);
                    }
                    Some(Ok(frame))
                }
                Some(Err(e)) => {
                    let e = e.into();
                    this.finish(Some((Outcome::UpstreamReset, &*e)));
                    Some(Err(e))
                }
            });
        }
        let deadline = this.deadline;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let e: BoxError = envelope_core::timeout::Elapsed::new(Duration::ZERO).into();
                this.finish(Some((Outcome::Timeout, &*e)));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<B> DeadlineBody<B> {
    /// The body ended: cleanly (`None`), or broken off after the head with this outcome and cause.
    fn finish(&mut self, broke: Option<(Outcome, &(dyn std::error::Error + Send + Sync))>) {
        if let Some(mut record) = self.record.take() {
            if let Some((outcome, e)) = broke {
                record.broke_off(outcome, format!("the response body broke off after its head: {e}"));
            }
            record.finish();
        }
    }
}

/// The result of one attempt.
type Attempt = Result<Response<outbound::Body>, UpstreamError>;

/// The client of a connection: the `X-Forwarded-For` value for its address (made once per connection).
pub(crate) struct Client {
    pub(crate) forwarded: http::HeaderValue,
}

impl Client {
    pub(crate) fn new(addr: SocketAddr) -> Client {
        Client { forwarded: envelope_http::headers::forwarded_value(addr.ip()) }
    }
}

/// Handles one request on listener `listener` from `client`.
pub(crate) async fn handle(
    rt: Arc<Runtime>,
    listener: usize,
    client: &Client,
    req: Request<InBody>,
) -> Response<ProxyBody> {
    let mut response = handle_passing(rt, listener, client, req).await;
    if let Some(raw) = take_raw_head(response.body_mut()) {
        *response.headers_mut() = raw.into_map();
    }
    response
}

/// Like [`handle`], for the listener's own HTTP/1.1 writer: the upstream's head may be left as it came (see
/// [`RawHead`]), for the writer to take with [`take_raw_head`] and write out as it is.
pub(crate) async fn handle_passing(
    rt: Arc<Runtime>,
    listener: usize,
    client: &Client,
    mut req: Request<InBody>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let spec = &rt.config.listeners[listener];
    let listener_metrics = &rt.listeners[listener].metrics;

    // 1. Request id, and the trace (kept or started; this hop's span becomes the upstream's parent). Both go
    // upstream with the request (step 6), set as it is written rather than inserted into its headers here.
    let (id, kept) = RequestId::from_headers(req.headers());
    let trace = TraceContext::continue_or_start(req.headers());
    // A gRPC call: refused with gRPC statuses, its `grpc-timeout` its deadline (within the route's), its status
    // its outcome, its body streamed as it comes.
    let grpc = envelope_http::grpc::is_grpc(req.headers());
    let caller_deadline = if grpc {
        req.headers()
            .get(&envelope_http::grpc::GRPC_TIMEOUT)
            .and_then(|v| envelope_http::grpc::parse_timeout(v.as_bytes()))
    } else {
        None
    };
    // Counts the request in flight; it is recorded once when its answer is complete (see `Pending`). A clone of
    // the URI shares its bytes: the path stays at hand after the request is taken apart.
    let mut pending = Pending {
        rt: rt.clone(),
        listener,
        id,
        trace,
        method: req.method().clone(),
        uri: req.uri().clone(),
        start,
        wall_start: rt.spans.as_ref().map(|_| SystemTime::now()),
        route: None,
        answer: None,
        done: false,
    };
    listener_metrics.in_flight.inc();
    let (id, method, path) = (&pending.id, &pending.method, pending.uri.path());
    // With span export on, each attempt's span as it ends.
    let attempt_spans: Option<Mutex<Vec<AttemptSpan>>> = rt.spans.as_ref().map(|_| Mutex::new(Vec::new()));

    let mut attempts = 0u32;
    let mut upstream_status = None;
    let mut fallback_used = None;
    // The full cause of a failure, for the log (the client gets a stable detail).
    let mut cause: Option<String> = None;
    let mut route: Option<Arc<RouteRt>> = None;
    let (mut response, outcome) = 'answer: {
        // 2. Input checks, the same whichever engine read the request: one `Host` on HTTP/1.1 (none or one on
        // HTTP/1.0), no CONNECT (tunnels are not proxied), names with `_` dropped, refused or let through, then
        // the limits.
        if let Err(why) = check_head(&req) {
            break 'answer local(StatusCode::BAD_REQUEST, why, id, grpc);
        }
        if method == http::Method::CONNECT {
            break 'answer local(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not proxied", id, grpc);
        }
        match underscores(req.headers_mut(), spec.underscores_in_headers) {
            Ok(0) => {}
            Ok(dropped) => {
                listener_metrics.headers_dropped.inc_by(dropped);
            }
            Err(()) => {
                break 'answer local(StatusCode::BAD_REQUEST, "a header name contains an underscore", id, grpc);
            }
        }
        let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
        if uri_len > spec.max_uri_bytes {
            break 'answer local(StatusCode::URI_TOO_LONG, "the request target is too long", id, grpc);
        }
        // The declared Content-Length, as both engines report it (no second look at the header).
        let declared = http_body::Body::size_hint(req.body()).exact();
        if declared.is_some_and(|n| n > spec.max_body_bytes) {
            break 'answer local(StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large", id, grpc);
        }

        // 3. Route.
        let Some(found) = rt.listeners[listener].routes.find(path, method) else {
            listener_metrics.unmatched.inc();
            break 'answer local(StatusCode::NOT_FOUND, "no route matches this request", id, grpc);
        };
        let route = &**route.insert(found.clone());

        // 3b. The route's per-key rate limit: refused before the body is read, with the quota said.
        if let (Some(limiter), Some(spec)) = (&route.key_limit, &route.spec.rate_limit) {
            let key = limit_key(&spec.key, req.headers(), path, client);
            if let Err(limited) = limiter.acquire(key).await {
                let detail = format!("route `{}`: rate limit reached", route.spec.name);
                let retry_after = Some(limited.retry_after());
                let mut answer = refusal(None, Outcome::LocalRateLimited, &detail, id, retry_after, Some(0), grpc);
                let config = &spec.config;
                let window = config.period() / config.rate().max(1) * config.burst();
                let burst = u64::from(config.burst());
                quota_fields(&mut answer, &route.spec.name, burst, window, 0, limited.retry_after());
                break 'answer (answer, Outcome::LocalRateLimited);
            }
        }

        // 4. Header hygiene; the headers the proxy sets (the request id if the client's was missing or invalid,
        // this hop's trace context, X-Forwarded-For with the client appended) replace the client's.
        let (mut parts, body) = req.into_parts();
        clean_request(&mut parts.headers);
        let forwarded_for = forwarded_for(&parts.headers, &client.forwarded);
        let request_id = (!kept).then(|| id.header_value());
        let hop_traceparent = trace.traceparent();

        // 5. Body: replayable within the cap, else streamed once.
        let replay = replay_safety(&parts.method, &parts.headers);
        let body = Limited::new(body, usize::try_from(spec.max_body_bytes).unwrap_or(usize::MAX));
        // A gRPC stream may not end before its answer comes: sent as it comes, copied for a retry (5: body).
        let prepared = if grpc && declared.is_none() {
            Ok(tee(body, route.spec.replay_limit))
        } else {
            prepare(body, route.spec.replay_limit).await
        };
        let mut prepared = match prepared {
            Ok(p) => p,
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                break 'answer local(StatusCode::PAYLOAD_TOO_LARGE, "the request body is too large", id, grpc);
            }
            // A body that cannot be read is malformed (or its client is gone, and the answer goes nowhere).
            Err(_) => break 'answer local(StatusCode::BAD_REQUEST, "the request body could not be read", id, grpc),
        };

        // 6 + 7. The envelope around the call, to the route's target on the upstream.
        let target = upstream_target(route, &parts);
        // Safe to send twice: by its method or key, or because the route says all its requests are.
        let replay_safe = replay == Replay::Safe || route.spec.idempotent;
        // The route's deadline, or the caller's if sooner: for the call, and for the answer's body.
        let deadline = caller_deadline.map_or(route.spec.timeout, |c| c.min(route.spec.timeout));
        let classifier =
            RouteClassifier { status: &route.classifier, idempotent: replay_safe, body: prepared.replay(), grpc };
        let out = Outgoing {
            parts: &parts,
            target: &target,
            set: ProxyHeaders {
                request_id,
                traceparent: &hop_traceparent,
                forwarded_for: &forwarded_for,
                grpc_timeout: None,
            },
            trace: &trace,
            attempt_spans: attempt_spans.as_ref(),
            count: AtomicU32::new(0),
            within: caller_deadline,
            grpc_deadline: grpc.then_some((start + deadline, route.spec.attempt_timeout)),
        };
        // Requests that may be sent twice are hedged, on a route that hedges: a buffered body at once, a teed one
        // (a gRPC call's) once its client has sent all of it.
        let envelope = match &route.hedged {
            Some(hedged) if replay_safe && !matches!(classifier.body, BodyReplay::Never) => hedged,
            _ => &route.envelope,
        };
        let primary = (envelope, &*route.upstream, &route.metrics.to_upstream);
        let (result, outcome) = out.call(primary, &classifier, &mut prepared, start).await;
        upstream_status = result.as_ref().ok().map(|r| r.status().as_u16());

        // 8. The answer: the upstream's; or, when it failed for a reason the route names, its fallback's; or the
        // failure's own.
        let reason = route.fallback.as_ref().and_then(|f| fallback_reason(f, outcome, upstream_status, replay_safe));
        let fallen_back = match (&route.fallback, reason) {
            (Some(fallback), Some(reason)) => {
                let answer = match &fallback.target {
                    FallbackTarget::Static { status, headers, body } => {
                        let mut answer = Response::new(Either::Right(Full::new(body.clone())));
                        *answer.status_mut() = *status;
                        *answer.headers_mut() = headers.clone();
                        answer.headers_mut().insert(X_REQUEST_ID.clone(), id.header_value().clone());
                        Some(answer)
                    }
                    FallbackTarget::Upstream { upstream, envelope, attempts } => {
                        let to = (envelope, &**upstream, attempts);
                        match out.call(to, &classifier, &mut prepared, start).await {
                            (Ok(answer), Outcome::Ok) => {
                                upstream_status = Some(answer.status().as_u16());
                                let mut answer = upstream_answer(answer, id, start + deadline);
                                if let Some(raw) = take_raw_head(answer.body_mut()) {
                                    *answer.headers_mut() = raw.into_map();
                                }
                                Some(answer)
                            }
                            // The fallback failed too: the client gets the original error.
                            _ => {
                                fallback.metrics.failed(reason);
                                None
                            }
                        }
                    }
                };
                answer.map(|mut answer| {
                    fallback.metrics.used(reason);
                    answer.headers_mut().insert(FALLBACK_HEADER, http::HeaderValue::from_static(reason.as_str()));
                    fallback_used = Some(reason);
                    answer
                })
            }
            _ => None,
        };
        attempts = out.count.load(Ordering::Relaxed);
        if let Some(answer) = fallen_back {
            break 'answer (answer, Outcome::Fallback);
        }
        match result {
            Ok(upstream) => (upstream_answer(upstream, id, start + deadline), outcome),
            Err(e) => {
                if matches!(e, Error::Inner(_)) {
                    cause = Some(e.to_string());
                }
                (answer_error(e, outcome, id, route, attempts, grpc), outcome)
            }
        }
    };

    // A rate-limited upstream's routes say their quota on every answer (IETF RateLimit fields); a global limit's
    // quota is the fleet's, which this instance does not know without asking the store.
    if let Some(route) = &route
        && route.upstream.global_limit.is_none()
        && let Some(limiter) = &route.upstream.rate_limit
    {
        rate_limit_fields(&mut response, &route.upstream.spec.name, limiter.quota());
    }
    // Every answer above carries the request id: the upstream's gets it in step 8, local ones from `problem`.
    // 9. Accounting, once the answer is complete: now, or when an upstream body still coming has ended.
    pending.route = route;
    pending.answer = Some(Answer {
        status: response.status().as_u16(),
        upstream_status,
        attempts,
        outcome,
        cause,
        fallback: fallback_used,
        elapsed: start.elapsed(),
        attempt_spans: attempt_spans.map(|s| s.into_inner().unwrap_or_else(PoisonError::into_inner)),
    });
    match response.body_mut() {
        Either::Left(streaming) if !streaming.body.in_hand() => {
            streaming.record = Some(Box::new(pending));
        }
        _ => pending.finish(),
    }
    response
}

/// The response header that marks a fallback's answer, naming why the route fell back (`circuit_open`, …).
pub(crate) const FALLBACK_HEADER: http::HeaderName = http::HeaderName::from_static("envelope-fallback");

/// The reason the route's fallback answers a call that ended in `outcome`, if it does: a reason the route names,
/// never in place of the upstream's 4xx, and only for a request that may be sent twice (an idempotent method, or
/// an `Idempotency-Key`): a write the primary may have done is not answered for by anything else.
fn fallback_reason(
    fallback: &FallbackRt,
    outcome: Outcome,
    upstream_status: Option<u16>,
    replay_safe: bool,
) -> Option<FallbackReason> {
    let reason = FallbackReason::of(outcome)?;
    let upstream_4xx = upstream_status.is_some_and(|s| (400..500).contains(&s));
    (fallback.spec.covers(reason) && !upstream_4xx && replay_safe).then_some(reason)
}

/// The upstream's answer for the client: its headers cleaned, the request id set, its body under the deadline.
fn upstream_answer(mut upstream: Response<outbound::Body>, id: &RequestId, deadline: Instant) -> Response<ProxyBody> {
    clean_answer(&mut upstream, id.header_value());
    upstream.map(|body| Either::Left(DeadlineBody { body, deadline, timer: None, record: None }))
}

/// What every attempt of one request shares, to whichever upstream it goes.
struct Outgoing<'a> {
    parts: &'a http::request::Parts,
    target: &'a str,
    /// The headers the proxy sets (this hop's `traceparent`, which an attempt's span replaces when spans are on).
    set: ProxyHeaders<'a>,
    trace: &'a TraceContext,
    /// With span export on, each attempt's span as it ends.
    attempt_spans: Option<&'a Mutex<Vec<AttemptSpan>>>,
    /// Attempts made, to every upstream: those the envelope admitted, injected faults' included.
    count: AtomicU32,
    /// The caller's own deadline, when sooner than the route's (`grpc-timeout`).
    within: Option<Duration>,
    /// On a gRPC call, its deadline and the attempt timeout: each attempt tells the upstream the time it has left
    /// in `grpc-timeout`.
    grpc_deadline: Option<(Instant, Option<Duration>)>,
}

impl Outgoing<'_> {
    /// The call through an envelope to an upstream, each attempt counted in the metrics given with them; the
    /// deadline counts from `start`.
    async fn call(
        &self,
        (envelope, upstream, metrics): (&Envelope, &UpstreamRt, &AttemptMetrics),
        classifier: &RouteClassifier<'_>,
        prepared: &mut envelope_http::body::Prepared<Limited<InBody>>,
        start: Instant,
    ) -> (Result<Response<outbound::Body>, Error<UpstreamError>>, Outcome) {
        let options = CallOptions { started: Some(start), within: self.within, attempts: Some(&self.count) };
        envelope
            .call_with(options, classifier, || {
                metrics.attempt();
                let span = self.attempt_spans.map(|log| (log, self.trace.child()));
                let body = prepared.attempt();
                let (endpoint, _) = upstream.pick();
                let grpc_timeout = self.grpc_deadline.map(|(deadline, per_attempt)| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    envelope_http::grpc::format_timeout(per_attempt.map_or(left, |t| t.min(left)))
                });
                async move {
                    let body = body.ok_or(UpstreamError::BodyGone)?;
                    let mut span = span.map(|(log, span)| AttemptGuard::new(log, span, upstream, endpoint));
                    // With span export on, each attempt is a span of its own and the parent of the upstream's.
                    let attempt_traceparent = span.as_ref().map(|s| s.span.span.traceparent());
                    let set = ProxyHeaders {
                        traceparent: attempt_traceparent.as_ref().map_or(self.set.traceparent, |t| &t[..]),
                        grpc_timeout: grpc_timeout.as_ref().map(String::as_bytes),
                        ..self.set
                    };
                    let sent = Instant::now();
                    let result =
                        upstream.outbound.send(&upstream.spec, endpoint, self.parts, self.target, body, &set).await;
                    metrics.attempt_done(sent.elapsed());
                    upstream.report(endpoint, !matches!(&result, Err(e) if e.never_sent()));
                    if let Some(span) = &mut span {
                        let outcome = classifier.status.classify(&result);
                        span.finish(result.as_ref().ok().map(|r| r.status().as_u16()), outcome);
                    }
                    result
                }
            })
            .await
    }
}

/// A request being handled, recorded once (metrics, SLO, business counters, spans, one access-log line) when its
/// answer is complete. Dropped unrecorded means the client went away first: the request is still counted and
/// logged, as `client_cancelled`.
struct Pending {
    rt: Arc<Runtime>,
    listener: usize,
    id: RequestId,
    trace: TraceContext,
    method: http::Method,
    uri: http::Uri,
    start: Instant,
    wall_start: Option<SystemTime>,
    route: Option<Arc<RouteRt>>,
    /// The answer's head, once there is one.
    answer: Option<Answer>,
    /// Recorded.
    done: bool,
}

/// What a request was answered with, as recorded.
struct Answer {
    status: u16,
    upstream_status: Option<u16>,
    attempts: u32,
    outcome: Outcome,
    /// The full cause of a failure, for the log.
    cause: Option<String>,
    /// Why the route's fallback answered, if it did.
    fallback: Option<FallbackReason>,
    /// Until the answer's head: the request's latency (a streamed body's length is not latency).
    elapsed: Duration,
    attempt_spans: Option<Vec<AttemptSpan>>,
}

impl Pending {
    /// The answer's body broke off after its head: the request is recorded with this outcome instead.
    fn broke_off(&mut self, outcome: Outcome, cause: String) {
        if let Some(answer) = &mut self.answer {
            answer.outcome = outcome;
            answer.cause = Some(cause);
        }
    }

    /// The answer's trailers carried gRPC status `code`: the call's outcome is what it says.
    fn grpc_status(&mut self, code: u32) {
        if let Some(answer) = &mut self.answer
            && code != envelope_http::grpc::code::OK
        {
            answer.outcome = envelope_http::grpc::outcome(code);
            answer.cause = Some(format!("the upstream ended the call with grpc-status {code}"));
        }
    }

    /// Records the request as answered (with the answer set), once.
    fn finish(&mut self) {
        if let Some(answer) = self.answer.take() {
            self.done = true;
            self.record(answer);
        }
    }

    fn record(&self, a: Answer) {
        let rt = &*self.rt;
        let now = Instant::now();
        if let Some(route) = &self.route {
            let served = Served {
                method: &self.method,
                outcome: a.outcome,
                status: a.status,
                seconds: a.elapsed.as_secs_f64(),
                attempts: a.attempts,
            };
            route.metrics.record(&served, now, &self.trace);
            if a.outcome != Outcome::ClientCancelled {
                route.slo.record_at(a.outcome.counts_against_availability(), a.elapsed, now);
            }
        }
        let path = self.uri.path();
        let route_name = self.route.as_ref().map(|r| r.spec.name.as_str());
        if a.outcome != Outcome::ClientCancelled {
            for (counter, metrics) in &rt.counters {
                if counter.counts(route_name, path, &self.method, a.status) {
                    metrics.inc();
                }
            }
        }
        if let (Some(spans), Some(start)) = (rt.spans.as_deref(), self.wall_start) {
            let request = RequestSpan {
                trace: &self.trace,
                start,
                end: start + a.elapsed,
                method: &self.method,
                path,
                route: route_name,
                request_id: self.id.as_str(),
                status: a.status,
                outcome: a.outcome,
                attempts: a.attempts,
            };
            spans.request(&request, a.attempt_spans.as_deref().unwrap_or_default());
        }
        let listener = &rt.config.listeners[self.listener];
        if listener.access_log {
            access_log::write(&Entry {
                request_id: self.id.as_str(),
                trace_id: &self.trace.trace_id_hex(),
                listener: &listener.name,
                route: route_name,
                method: &self.method,
                status: a.status,
                upstream_status: a.upstream_status,
                attempts: a.attempts,
                duration: a.elapsed,
                outcome: a.outcome,
                fallback: a.fallback.map(FallbackReason::as_str),
                error: a.cause.as_deref(),
            });
        }
    }
}

/// Records one attempt's span when the attempt ends — or is dropped unfinished (cut off by the attempt timeout
/// or the deadline, recorded as a timeout).
struct AttemptGuard<'a> {
    log: &'a Mutex<Vec<AttemptSpan>>,
    span: AttemptSpan,
}

impl<'a> AttemptGuard<'a> {
    fn new(log: &'a Mutex<Vec<AttemptSpan>>, span: TraceContext, upstream: &UpstreamRt, endpoint: usize) -> Self {
        let now = SystemTime::now();
        let span = AttemptSpan {
            span,
            start: now,
            end: now,
            endpoint: upstream.spec.endpoints[endpoint].authority.clone(),
            status: None,
            outcome: Outcome::Timeout,
        };
        AttemptGuard { log, span }
    }

    fn finish(&mut self, status: Option<u16>, outcome: Outcome) {
        self.span.status = status;
        self.span.outcome = outcome;
    }
}

impl Drop for AttemptGuard<'_> {
    fn drop(&mut self) {
        self.span.end = SystemTime::now();
        self.log.lock().unwrap_or_else(PoisonError::into_inner).push(self.span.clone());
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.rt.listeners[self.listener].metrics.in_flight.dec();
        if self.done {
            return;
        }
        // The client went away before the answer was complete: before its head (499), or while its body was sent.
        let cancelled = match self.answer.take() {
            Some(answer) => Answer { outcome: Outcome::ClientCancelled, cause: None, ..answer },
            None => Answer {
                status: 499,
                upstream_status: None,
                attempts: 0,
                outcome: Outcome::ClientCancelled,
                cause: None,
                fallback: None,
                elapsed: self.start.elapsed(),
                attempt_spans: None,
            },
        };
        self.record(cancelled);
    }
}

/// A local answer that is not a policy outcome (400, 404, 405, 413, 414): status and a problem document.
fn local(status: StatusCode, detail: &str, id: &RequestId, grpc: bool) -> (Response<ProxyBody>, Outcome) {
    (refusal(Some(status), Outcome::BadRequest, detail, id, None, None, grpc), Outcome::BadRequest)
}

/// A local answer, for a call that ended here in `outcome` after `attempts` (when it got as far as the envelope): a
/// problem document (with `status`, or the outcome's), or for a gRPC caller, the gRPC status it stands for
/// (trailers-only). The one place local answers are made.
fn refusal(
    status: Option<StatusCode>,
    outcome: Outcome,
    detail: &str,
    id: &RequestId,
    retry_after: Option<Duration>,
    attempts: Option<u32>,
    grpc: bool,
) -> Response<ProxyBody> {
    let status = status.unwrap_or_else(|| envelope_http::problem::status_for(outcome));
    let answer = if grpc {
        let code = envelope_http::grpc::code_for(outcome, status);
        envelope_http::grpc::local_answer(code, detail, Some(id), retry_after)
    } else {
        problem_after(status, outcome, detail, Some(id), retry_after, attempts)
    };
    answer.map(Either::Right)
}

/// Sets `RateLimit-Policy: "<upstream>";q=<limit>;w=<window s>` and `RateLimit: "<upstream>";r=<remaining>;t=<reset
/// s>` (draft-ietf-httpapi-ratelimit-headers; whole seconds, rounded up). A passed-through head becomes the map.
fn rate_limit_fields(response: &mut Response<ProxyBody>, name: &str, q: envelope_core::rate_limit::Quota) {
    quota_fields(response, name, q.limit, q.window, q.remaining, q.reset);
}

/// The two fields of [`rate_limit_fields`] from their parts: a quota of `limit` calls earned back over `window`,
/// `remaining` of them now, all again after `reset`.
fn quota_fields(
    response: &mut Response<ProxyBody>,
    name: &str,
    limit: u64,
    window: Duration,
    remaining: u64,
    reset: Duration,
) {
    if let Some(raw) = take_raw_head(response.body_mut()) {
        *response.headers_mut() = raw.into_map();
    }
    let secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    // The policy name is an sf-string: `"` and `\` escaped.
    let name = name.replace('\\', "\\\\").replace('"', "\\\"");
    let policy = format!("\"{name}\";q={limit};w={}", secs(window).max(1));
    let now = format!("\"{name}\";r={remaining};t={}", secs(reset));
    let headers = response.headers_mut();
    for (field, value) in [("ratelimit-policy", policy), ("ratelimit", now)] {
        if let Ok(value) = http::HeaderValue::try_from(value) {
            headers.insert(http::HeaderName::from_static(field), value);
        }
    }
}

/// Keys longer than this are cut to it (on a character boundary), bounding a per-key limit's memory per key.
const MAX_KEY_BYTES: usize = 128;

/// The request's key for its route's per-key limit: a header's value (empty without it), a path segment of the
/// route's template, the client's address, or one key for the whole route.
fn limit_key<'a>(source: &KeySource, headers: &'a http::HeaderMap, path: &'a str, client: &'a Client) -> &'a str {
    let key = match source {
        KeySource::Route => "",
        KeySource::Header(name) => headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or(""),
        KeySource::Param(i) => path.trim_start_matches('/').split('/').nth(*i).unwrap_or(""),
        KeySource::Client => client.forwarded.to_str().unwrap_or(""),
    };
    let mut end = key.len().min(MAX_KEY_BYTES);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    &key[..end]
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host`; any request has at most one.
fn check_head<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => Err("more than one Host header"),
        (None, None) if req.version() == http::Version::HTTP_11 => Err("no Host header"),
        _ => Ok(()),
    }
}

/// Applies the listener's rule to request headers whose names contain `_`: how many were dropped, or `Err` if
/// the request is refused.
fn underscores(headers: &mut http::HeaderMap, rule: Underscores) -> Result<u64, ()> {
    if rule == Underscores::Allow || !headers.keys().any(|n| n.as_str().as_bytes().contains(&b'_')) {
        return Ok(0);
    }
    if rule == Underscores::Reject {
        return Err(());
    }
    let names: Vec<_> = headers.keys().filter(|n| n.as_str().as_bytes().contains(&b'_')).cloned().collect();
    let mut dropped = 0;
    for name in names {
        if let http::header::Entry::Occupied(e) = headers.entry(name) {
            dropped += e.remove_entry_mult().1.count() as u64;
        }
    }
    Ok(dropped)
}

/// Takes the upstream's head passed on as it came out of an answer's body, if it has one (see [`RawHead`]).
pub(crate) fn take_raw_head(body: &mut ProxyBody) -> Option<Box<RawHead>> {
    match body {
        Either::Left(DeadlineBody { body, .. }) => body.take_raw_head(),
        Either::Right(_) => None,
    }
}

/// The request target upstream: the client's path and query, without the route's prefix if it strips it.
fn upstream_target<'a>(route: &RouteRt, parts: &'a http::request::Parts) -> std::borrow::Cow<'a, str> {
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if !route.spec.strip_prefix {
        return path_and_query.into();
    }
    let rest =
        path_and_query.strip_prefix(route.spec.matcher.path_prefix.trim_end_matches('/')).unwrap_or(path_and_query);
    if rest.starts_with('/') { rest.into() } else { format!("/{rest}").into() }
}

/// Turns a failed call into the answer for the client. Errors become responses here and nowhere else.
fn answer_error(
    e: Error<UpstreamError>,
    outcome: Outcome,
    id: &RequestId,
    route: &RouteRt,
    attempts: u32,
    grpc: bool,
) -> Response<ProxyBody> {
    let name = &route.spec.name;
    let (detail, retry_after): (String, Option<Duration>) = match &e {
        // What went wrong on the wire (OS error text, addresses) is logged, not shown: the client gets a stable
        // sentence per kind of failure.
        Error::Inner(inner) => (format!("route `{name}`: {}", inner.public()), None),
        Error::Timeout(t) => (format!("route `{name}`: no answer within {:?}", t.after()), None),
        Error::CircuitOpen(c) => {
            (format!("upstream `{}`: circuit breaker is {}", route.upstream.spec.name, c.state()), c.remaining())
        }
        Error::BulkheadFull(_) => {
            (format!("upstream `{}`: too many requests in flight", route.upstream.spec.name), None)
        }
        Error::RateLimited(r) => {
            (format!("upstream `{}`: rate limit reached", route.upstream.spec.name), Some(r.retry_after()))
        }
        Error::Shed(_) => ("the service is overloaded".to_owned(), None),
        Error::Injected(_) => {
            let status = route.upstream.fault_status.load(std::sync::atomic::Ordering::Relaxed);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return refusal(Some(status), outcome, "injected fault", id, None, Some(attempts), grpc);
        }
        other => (format!("route `{name}`: {other}"), None),
    };
    refusal(None, outcome, &detail, id, retry_after, Some(attempts), grpc)
}

/// Status-first classification (or, for a gRPC call, its `grpc-status`), plus the request's replay safety.
struct RouteClassifier<'a> {
    status: &'a StatusClassifier,
    /// Idempotent (method or key).
    idempotent: bool,
    /// Whether its body can be sent again now.
    body: BodyReplay,
    /// A gRPC call.
    grpc: bool,
}

impl RouteClassifier<'_> {
    /// The `grpc-status` of a gRPC call's trailers-only answer.
    fn grpc_status(&self, result: &Attempt) -> Option<u32> {
        match result {
            Ok(r) if self.grpc && r.status() == StatusCode::OK => envelope_http::grpc::status_in(r.headers()),
            _ => None,
        }
    }
}

impl Classify<Response<outbound::Body>, UpstreamError> for RouteClassifier<'_> {
    fn classify(&self, result: &Attempt) -> Outcome {
        match self.grpc_status(result) {
            Some(code) => envelope_http::grpc::outcome(code),
            None => self.status.classify(result),
        }
    }

    fn retry_after(&self, result: &Attempt) -> Option<Duration> {
        self.status.retry_after(result)
    }

    /// Idempotent requests may be repeated; others only if they never left. A permanent answer (501, 505) is never
    /// repeated. A gRPC call is repeated after a transient status (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`: the
    /// server refused it before any message), never after the others. Always only with a body that can be sent
    /// again.
    fn may_retry(&self, result: &Attempt) -> bool {
        if !self.can_send_again() {
            return false;
        }
        if let Some(code) = self.grpc_status(result) {
            return envelope_http::grpc::retryable(code);
        }
        self.status.may_retry(result) && (self.idempotent || matches!(result, Err(e) if e.never_sent()))
    }

    /// A hedge waits until the body can be sent again (a teed body, until its client has sent all of it).
    fn can_send_again(&self) -> bool {
        self.body.now()
    }
}
