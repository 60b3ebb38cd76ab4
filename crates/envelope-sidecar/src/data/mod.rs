//! The data plane: requests in, through the policies, out to the upstreams, and back.
//!
//! | module | what |
//! |---|---|
//! | `inbound` | listeners: connections within limits, the own HTTP/1.1 loop and hyper, connection timers |
//! | `proxy` | the request path, top to bottom, in one function |
//! | `outbound` | every attempt's way out and its answer's way back: transports, the headers the proxy sets |
//! | `routes` | a listener's route table: the route of a path, found by prefix in constant time |
//! | `runtime` | the config as live objects: shedders, route tables, envelopes, upstreams |
//! | `upstream` | an upstream at run time: endpoints and their health, its policies, injected faults |
//! | `wire` | HTTP/1.1 on the wire, shared by the own listener loop and the own client |

pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod proxy;
pub(crate) mod routes;
pub(crate) mod runtime;
pub(crate) mod upstream;
pub(crate) mod wire;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// A request's body as a listener hands it over: hyper's, or the buffered body of a request the own loop read.
pub(crate) type InBody = Either<Incoming, Full<Bytes>>;
