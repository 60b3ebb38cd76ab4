//! Traces: a server span per request and a client span per attempt, exported over OTLP/HTTP (protobuf) when
//! `[tracing] otlp_endpoint` is set.
//!
//! The spans carry the ids the sidecar already uses on the wire and in its logs: the request span is this hop's
//! span of the W3C `traceparent` (its parent is the caller's span, if the request came with one), and each attempt
//! is a child whose id goes upstream in that attempt's `traceparent`. So the finished spans are built here as
//! `SpanData` with those ids and handed to the OpenTelemetry SDK's batch span processor, which exports them.
//!
//! The batch processor is the SDK's async-runtime one on tokio: the default one runs its own thread with no
//! tokio reactor, where the hyper-based OTLP client cannot run, and spans would be dropped silently. Nothing here
//! runs without an endpoint: requests then pay one `Option` check.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envelope_core::Outcome;
use envelope_http::trace::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{BatchConfigBuilder, SpanData, SpanEvents, SpanLinks, SpanProcessor};

use crate::config::Tracing as TracingSpec;

/// How long one OTLP export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The span exporter of a running sidecar.
pub(crate) struct Spans {
    processor: BatchSpanProcessor<Tokio>,
    scope: InstrumentationScope,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spans").finish_non_exhaustive()
    }
}

/// One attempt of a request, for its span.
#[derive(Debug, Clone)]
pub(crate) struct AttemptSpan {
    pub(crate) span: TraceContext,
    pub(crate) start: SystemTime,
    pub(crate) end: SystemTime,
    pub(crate) endpoint: http::uri::Authority,
    pub(crate) status: Option<u16>,
    pub(crate) outcome: Outcome,
}

/// A finished request, for its span.
#[derive(Debug)]
pub(crate) struct RequestSpan<'a> {
    pub(crate) trace: &'a TraceContext,
    pub(crate) start: SystemTime,
    pub(crate) end: SystemTime,
    pub(crate) method: &'a http::Method,
    pub(crate) path: &'a str,
    pub(crate) route: Option<&'a str>,
    pub(crate) request_id: &'a str,
    pub(crate) status: u16,
    pub(crate) outcome: Outcome,
    pub(crate) attempts: u32,
}

impl Spans {
    /// Starts the exporter (on the current tokio runtime).
    pub(crate) fn start(spec: &TracingSpec) -> Result<Arc<Spans>, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(spec.otlp_endpoint.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("tracing: cannot build the OTLP exporter for {}: {e}", spec.otlp_endpoint))?;
        let config = BatchConfigBuilder::default().with_scheduled_delay(spec.export_interval).build();
        let mut processor = BatchSpanProcessor::builder(exporter, Tokio).with_batch_config(config).build();
        processor.set_resource(&Resource::builder().with_service_name(spec.service_name.clone()).build());
        let scope = InstrumentationScope::builder("envelope").with_version(env!("CARGO_PKG_VERSION")).build();
        Ok(Arc::new(Spans { processor, scope }))
    }

    fn emit(
        &self,
        span: &TraceContext,
        kind: SpanKind,
        name: String,
        times: (SystemTime, SystemTime),
        attributes: Vec<KeyValue>,
        failed: bool,
    ) {
        let flags = if span.flags & 1 == 1 { TraceFlags::SAMPLED } else { TraceFlags::default() };
        if !flags.is_sampled() {
            return;
        }
        let context =
            SpanContext::new(TraceId::from(span.trace_id), SpanId::from(span.span_id), flags, false, TraceState::NONE);
        self.processor.on_end(SpanData {
            span_context: context,
            parent_span_id: span.parent_id.map_or(SpanId::INVALID, SpanId::from),
            parent_span_is_remote: matches!(kind, SpanKind::Server) && span.parent_id.is_some(),
            span_kind: kind,
            name: Cow::Owned(name),
            start_time: times.0,
            end_time: times.1,
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if failed { Status::error("") } else { Status::Unset },
            instrumentation_scope: self.scope.clone(),
        });
    }

    /// Exports the span of a finished request and those of its attempts.
    pub(crate) fn request(&self, r: &RequestSpan<'_>, attempts: &[AttemptSpan]) {
        let failed = r.outcome.counts_against_availability();
        let mut attributes = vec![
            KeyValue::new("http.request.method", r.method.as_str().to_owned()),
            KeyValue::new("url.path", r.path.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(r.status)),
            KeyValue::new("envelope.request_id", r.request_id.to_owned()),
            KeyValue::new("envelope.outcome", r.outcome.as_str()),
            KeyValue::new("envelope.attempts", i64::from(r.attempts)),
        ];
        if let Some(route) = r.route {
            attributes.push(KeyValue::new("envelope.route", route.to_owned()));
        }
        let name = format!("{} {}", r.method, r.route.unwrap_or("unmatched"));
        self.emit(r.trace, SpanKind::Server, name, (r.start, r.end), attributes, failed);
        for (i, a) in attempts.iter().enumerate() {
            let mut attributes = vec![
                KeyValue::new("http.request.method", r.method.as_str().to_owned()),
                KeyValue::new("server.address", a.endpoint.to_string()),
                KeyValue::new("envelope.request_id", r.request_id.to_owned()),
                KeyValue::new("envelope.attempt", i as i64 + 1),
                KeyValue::new("envelope.outcome", a.outcome.as_str()),
            ];
            if let Some(status) = a.status {
                attributes.push(KeyValue::new("http.response.status_code", i64::from(status)));
            }
            let name = format!("{} attempt", r.method);
            self.emit(&a.span, SpanKind::Client, name, (a.start, a.end), attributes, !a.outcome.is_ok());
        }
    }

    /// Exports what is queued and stops (blocking: call it off the runtime's workers, e.g. in `spawn_blocking`).
    pub(crate) fn shutdown(&self) {
        let _ = self.processor.force_flush();
        let _ = self.processor.shutdown();
    }
}
