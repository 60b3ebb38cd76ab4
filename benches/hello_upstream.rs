//! The upstream of the sidecar benchmark: answers every request with a short 200 on one thread, and counts its
//! connections so the benchmark can check that a proxy never opens more than the client's concurrency.
//! `GET /__stats` answers `{"open": N, "max_open": N, "accepted": N}`.
//!
//! Usage: `hello-upstream 127.0.0.1:PORT`

use std::cell::Cell;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Default)]
struct Counts {
    open: Cell<u64>,
    max_open: Cell<u64>,
    accepted: Cell<u64>,
}

fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:18000".to_owned());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(&addr).await.expect("bind");
        eprintln!("hello-upstream on {addr}");
        let counts = Rc::new(Counts::default());
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let counts = counts.clone();
            counts.accepted.set(counts.accepted.get() + 1);
            counts.open.set(counts.open.get() + 1);
            counts.max_open.set(counts.max_open.get().max(counts.open.get()));
            tokio::task::spawn_local(async move {
                let c = counts.clone();
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let c = c.clone();
                    async move {
                        let body = if req.uri().path() == "/__stats" {
                            Bytes::from(format!(
                                "{{\"open\": {}, \"max_open\": {}, \"accepted\": {}}}",
                                c.open.get(),
                                c.max_open.get(),
                                c.accepted.get()
                            ))
                        } else {
                            Bytes::from_static(b"hello")
                        };
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(body)))
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                counts.open.set(counts.open.get() - 1);
            });
        }
    });
}
