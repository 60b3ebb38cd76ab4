//! The request-id layer keeps valid ids, replaces hostile ones, forwards the id upstream and echoes it.

use std::convert::Infallible;

use envelope_http::request_id::{RequestId, RequestIdLayer, X_REQUEST_ID};
use http::{HeaderValue, Request, Response};
use tower::{ServiceExt, service_fn};
use tower_layer::Layer;

/// An upstream that answers with the id it received (header and extension), so both can be checked.
async fn upstream(req: Request<()>) -> Result<Response<String>, Infallible> {
    let header = req.headers().get(&X_REQUEST_ID).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let ext = req.extensions().get::<RequestId>().map(|id| id.to_string()).unwrap_or_default();
    assert_eq!(req.headers().get_all(&X_REQUEST_ID).iter().count(), 1, "exactly one id forwarded");
    Ok(Response::new(format!("{header}|{ext}")))
}

async fn send(id: Option<&[u8]>) -> (String, String) {
    let svc = RequestIdLayer.layer(service_fn(upstream));
    let mut req = Request::new(());
    if let Some(id) = id {
        req.headers_mut().insert(X_REQUEST_ID.clone(), HeaderValue::from_bytes(id).unwrap());
    }
    let resp = svc.oneshot(req).await.unwrap();
    let echoed = resp.headers()[&X_REQUEST_ID].to_str().unwrap().to_owned();
    (resp.into_body(), echoed)
}

#[tokio::test]
async fn valid_incoming_ids_are_kept_forwarded_and_echoed() {
    let (seen, echoed) = send(Some(b"client-abc.123")).await;
    assert_eq!(seen, "client-abc.123|client-abc.123");
    assert_eq!(echoed, "client-abc.123");
}

#[tokio::test]
async fn missing_or_hostile_ids_are_replaced_and_never_echoed() {
    for hostile in [None, Some(&b"\"}, {\"admin\": true"[..]), Some(b"a b"), Some(&[b'x'; 129][..])] {
        let (seen, echoed) = send(hostile).await;
        let (header, ext) = seen.split_once('|').unwrap();
        assert_eq!(header, ext, "header and extension agree");
        assert_eq!(header, echoed, "the echoed id is the forwarded one");
        assert_eq!(echoed.len(), 36, "a generated UUID replaced {hostile:?}");
        assert!(RequestId::parse(&HeaderValue::from_str(&echoed).unwrap()).is_some());
    }
}
