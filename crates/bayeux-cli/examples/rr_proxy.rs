//! A tiny round-robin TCP proxy for trying several `bayeux serve --engine redis` nodes behind
//! one address (bench/scaleout.sh): each accepted connection goes to the next backend in turn
//! that accepts a connection (a dead node is skipped), and bytes are copied both ways.
//!
//! ```sh
//! cargo run --release -p bayeux-cli --example rr_proxy -- 127.0.0.1:0 127.0.0.1:8081 127.0.0.1:8082
//! ```
//!
//! Prints `LISTENING <addr>` once bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let bind = args.next().unwrap_or_else(|| usage());
    let backends: Vec<SocketAddr> = args
        .map(|a| a.parse().unwrap_or_else(|_| usage()))
        .collect();
    if backends.is_empty() {
        usage();
    }
    let listener = TcpListener::bind(&bind).await.expect("bind");
    println!("LISTENING {}", listener.local_addr().expect("address"));
    let backends = Arc::new(backends);
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            // Out of file descriptors, say: let the accept queue drain a little.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = inbound.set_nodelay(true);
        let backends = backends.clone();
        let start = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            for k in 0..backends.len() {
                let backend = backends[(start + k) % backends.len()];
                let connect = TcpStream::connect(backend);
                let Ok(Ok(mut outbound)) =
                    tokio::time::timeout(Duration::from_secs(2), connect).await
                else {
                    continue;
                };
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                return;
            }
        });
    }
}

fn usage() -> ! {
    eprintln!("usage: rr_proxy BIND_ADDR BACKEND_ADDR...");
    std::process::exit(2)
}
