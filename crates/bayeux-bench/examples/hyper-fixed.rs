//! The ceiling for `bench/compare.sh`'s round-trip case: a bare hyper HTTP/1.1 server on one
//! thread that answers every request with the same body, without parsing it.
//!
//! The body is a Bayeux batch that `bayeux bench` accepts as the reply to each of its requests
//! (handshake, connect, publish to `/bench/0`, disconnect), so the bench runs unchanged against
//! it and measures the cost of HTTP alone: what a Bayeux server could at best reach.
//!
//! ```sh
//! cargo run --release -p bayeux-bench --example hyper-fixed -- 127.0.0.1:18090
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// One reply for every request: each message answers one request kind of the bench (the bench
/// matches a reply without `id` by its channel). The connect reply advises a long interval so
/// the publisher's heartbeat does not spin.
const BODY: &str = concat!(
    r#"[{"channel":"/meta/handshake","successful":true,"version":"1.0","#,
    r#""supportedConnectionTypes":["long-polling"],"clientId":"fixed0000000000000000000","#,
    r#""advice":{"reconnect":"retry","interval":60000,"timeout":30000}},"#,
    r#"{"channel":"/meta/connect","successful":true,"clientId":"fixed0000000000000000000","#,
    r#""advice":{"reconnect":"retry","interval":60000,"timeout":30000}},"#,
    r#"{"channel":"/meta/disconnect","successful":true},"#,
    r#"{"channel":"/bench/0","successful":true}]"#
);

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read (and drop) the request body, as any server must.
    let _ = request.into_body().collect().await;
    let mut response = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    Ok(response)
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18090".to_owned())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!("LISTENING http://{}/cometd", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    })
}
