//! The way out: every attempt leaves through [`Outbound::send`], and every answer comes back as one [`Body`] type.
//!
//! Two transports sit behind it. Plain-http endpoints with a buffered request body (the common case) go through
//! the sidecar's own pooled HTTP/1.1 client (`client`), which drives each connection from the request's own task;
//! `https` endpoints, streamed request bodies and HTTP/2 upstreams (`protocol = "http2"`: ALPN `h2` over TLS, prior
//! knowledge on plain http) go through hyper-util's pooled client, which multiplexes an HTTP/2 upstream's calls
//! on its connections and keeps trailers both ways (gRPC's status). The headers the proxy
//! changes are decided in one place for both (`headers`), and the answer's body hides which transport read it.
//!
//! | module | what |
//! |---|---|
//! | `client` | the own pooled HTTP/1.1 client |
//! | `headers` | which headers the proxy sets, removes and replaces, both ways |

pub(crate) mod client;
mod headers;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use envelope_core::{BoxError, HasOutcome, Outcome};
use envelope_http::body::AttemptBody;
use http::Request;
use http_body::{Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{Protocol, Upstream};
use crate::data::InBody;
use crate::data::wire::RawHead;
pub(crate) use headers::{ProxyHeaders, clean_answer, clean_request};

/// The body sent upstream: a replayable buffer, or the client's body streamed once.
pub(crate) type UpstreamBody = AttemptBody<Limited<InBody>>;

/// The connections to one upstream's endpoints.
pub(crate) struct Outbound {
    /// Plain-http endpoints, for requests whose body is buffered: the own pooled HTTP/1.1 client.
    pool: Arc<client::Pool>,
    /// Everything else (https, streamed bodies, HTTP/2): hyper-util's pooled client.
    hyper: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    /// The upstream speaks HTTP/2.
    http2: bool,
}

impl fmt::Debug for Outbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outbound").field("pool", &self.pool).finish_non_exhaustive()
    }
}

impl Outbound {
    /// Pools for the endpoints of `spec`, with its connect timeout, idle timeout, idle cap and TLS roots.
    pub(crate) fn new(spec: &Upstream) -> Outbound {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(spec.connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let http2 = spec.protocol == Protocol::Http2;
        let tls =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls_config(&spec.extra_roots)).https_or_http();
        // ALPN offers what the upstream is said to speak, and only that.
        let connector = if http2 {
            tls.enable_http2().wrap_connector(connector)
        } else {
            tls.enable_http1().wrap_connector(connector)
        };
        let mut client = Client::builder(TokioExecutor::new());
        client.pool_idle_timeout(spec.idle_timeout).pool_max_idle_per_host(spec.max_idle_per_endpoint);
        if http2 {
            client.http2_only(true);
        }
        let hyper = client.build(connector);
        let pool = client::Pool::new(
            spec.endpoints.iter().map(|e| e.connect_to.clone()).collect(),
            spec.connect_timeout,
            Some(spec.idle_timeout),
            spec.max_idle_per_endpoint,
        );
        Outbound { pool, hyper, http2 }
    }

    /// Sends one attempt to endpoint `i` of `spec`: the client's request `parts` (cleaned by [`clean_request`]) to
    /// `target`, with the headers in `set`, and returns the answer's head.
    pub(crate) async fn send(
        &self,
        spec: &Upstream,
        i: usize,
        parts: &http::request::Parts,
        target: &str,
        body: UpstreamBody,
        set: &ProxyHeaders<'_>,
    ) -> Result<http::Response<Body>, UpstreamError> {
        let endpoint = &spec.endpoints[i];
        if endpoint.scheme == http::uri::Scheme::HTTP
            && !self.http2
            && let AttemptBody::Full { data, trailers: None } = &body
        {
            let head = client::Head { parts, target, host: &endpoint.host, set };
            return match self.pool.send(i, &head, data.as_deref().unwrap_or_default()).await {
                Ok(r) => Ok(r.map(|b| Body(Inner::Own(b)))),
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
        *req.headers_mut() = set.applied(&endpoint.host, &parts.headers);
        if self.http2 {
            *req.version_mut() = http::Version::HTTP_2;
            // The authority travels as `:authority`; gRPC servers require `te: trailers` (RFC 9113 §8.2.2 lets it
            // through, the one hop-by-hop value HTTP/2 allows).
            req.headers_mut().remove(http::header::HOST);
            if envelope_http::grpc::is_grpc(&parts.headers) {
                req.headers_mut().insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            }
        }
        match self.hyper.request(req).await {
            Ok(r) => Ok(r.map(|b| Body(Inner::Hyper(b)))),
            Err(e) if e.is_connect() => Err(UpstreamError::Connect(e.into())),
            Err(e) => Err(UpstreamError::Exchange(e.into())),
        }
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

/// An upstream's answer body, whichever transport reads it.
#[derive(Debug)]
pub(crate) struct Body(Inner);

#[derive(Debug)]
enum Inner {
    Own(client::Body),
    Hyper(Incoming),
}

impl Body {
    /// Whether the whole body has come with its head (so the answer is complete now).
    pub(crate) fn in_hand(&self) -> bool {
        match &self.0 {
            Inner::Own(body) => body.in_hand(),
            Inner::Hyper(body) => http_body::Body::is_end_stream(body),
        }
    }

    /// The answer's head as it came, when it is passed on that way instead of as a header map (see [`RawHead`]).
    pub(crate) fn raw_head(&mut self) -> Option<&mut RawHead> {
        match &mut self.0 {
            Inner::Own(body) => body.raw_head().as_deref_mut(),
            Inner::Hyper(_) => None,
        }
    }

    /// Takes the head passed on as it came, if there is one.
    pub(crate) fn take_raw_head(&mut self) -> Option<Box<RawHead>> {
        match &mut self.0 {
            Inner::Own(body) => body.raw_head().take(),
            Inner::Hyper(_) => None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().0 {
            Inner::Own(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Inner::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Own(body) => body.is_end_stream(),
            Inner::Hyper(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Own(body) => body.size_hint(),
            Inner::Hyper(body) => body.size_hint(),
        }
    }
}

/// Why an attempt got no answer from the upstream.
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
