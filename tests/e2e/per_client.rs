//! Issue #21, finding 6: what one client address can hold. A request head is bounded in bytes
//! (hyper's read buffer, 431 past it), so open connections cannot grow the collector's memory
//! by sending endless headers; one address holds at most `max_connections_per_ip` connections,
//! and behind a trusted proxy, at most as many requests in flight by its forwarded address.
//! Another client's request is served meanwhile.

use std::net::SocketAddr;
use std::time::Duration;

use ingest_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::fixtures::*;

const PATIENCE: Duration = Duration::from_secs(20);

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// A connection from `from` (any 127.0.0.0/8 address is this machine).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// What came back before the collector closed the connection (or `PATIENCE` passed).
async fn answer(stream: &mut TcpStream) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

async fn post_from_localhost(collector: &str, id: &str) -> u16 {
    post_batch(&http(), collector, &batch(vec![product_viewed(id)]))
        .await
        .status()
        .as_u16()
}

/// Before: hyper kept up to ~400 KB of an unfinished head per connection (1,000 connections
/// with 400 KB header lines took the collector from 16 MB to 407 MB), and answered nothing
/// until the header timeout.
#[tokio::test]
async fn a_request_head_past_max_header_bytes_gets_431_and_holds_no_more_memory() {
    let mut s = settings("big_head");
    s.collector.header_timeout_ms = 120_000;
    let collector = CollectorProcess::spawn(&s).await;
    let to = addr(&collector.url);
    let idle_rss = collector.rss_mb();
    let line = format!("X-Padding: {}", "a".repeat(200 << 10));
    let mut clients = Vec::new();
    for _ in 0..200 {
        let mut c = TcpStream::connect(to).await.unwrap();
        // One long header line, never finished: the head can only grow.
        let _ = c
            .write_all(format!("POST /v1/batch HTTP/1.1\r\nHost: x\r\n{line}").as_bytes())
            .await;
        clients.push(c);
    }
    for c in &mut clients {
        let (got, closed) = answer(c).await;
        assert!(
            got.starts_with("HTTP/1.1 431") && closed,
            "answered {:?}, closed {closed}",
            got.lines().next()
        );
    }
    let loaded_rss = collector.rss_mb();
    eprintln!("collector RSS: idle {idle_rss} MB, {loaded_rss} MB after 200 heads of 200 KB");
    assert!(
        loaded_rss < idle_rss + 40,
        "RSS {loaded_rss} MB after 200 heads of 200 KB (idle {idle_rss} MB)"
    );
    // A head within the bound is served: a large cookie and user agent.
    let r = http()
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .header("cookie", "c".repeat(6000))
        .header("user-agent", "u".repeat(2000))
        .json(&batch(vec![product_viewed("big-but-fine")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn one_address_holds_at_most_its_share_of_connections_and_others_are_served() {
    let mut s = settings("per_ip");
    s.collector.max_connections_per_ip = 5;
    s.collector.header_timeout_ms = 120_000;
    let collector = Collector::start(&s).await;
    let to = addr(&collector.url);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_from("127.0.0.2", to).await);
    }
    // The sixth from the same address is closed at accept, without a byte.
    let mut sixth = connect_from("127.0.0.2", to).await;
    let (got, closed) = answer(&mut sixth).await;
    assert!(
        got.is_empty() && closed,
        "the sixth got {got:?}, closed {closed}"
    );
    // Another address is served meanwhile.
    assert_eq!(
        post_from_localhost(&collector.url, "per-ip-other").await,
        200
    );
    // And once one of the five is closed, the address may open one again.
    drop(held.pop());
    assert!(
        eventually(PATIENCE, || async {
            let mut c = connect_from("127.0.0.2", to).await;
            let _ = c
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            answer(&mut c).await.0.starts_with("HTTP/1.1 200")
        })
        .await,
        "the address never got a connection back"
    );
}

/// Behind a trusted proxy every connection is the proxy's: its clients' shares are their
/// requests in flight, by forwarded address.
#[tokio::test]
async fn behind_a_trusted_proxy_one_forwarded_address_gets_429_past_its_share_and_others_200() {
    let mut s = settings("per_forwarded");
    s.collector.max_connections_per_ip = 2;
    s.collector.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    s.collector.body_timeout_ms = 120_000;
    let collector = Collector::start(&s).await;
    let to = addr(&collector.url);
    // Two slow requests from 198.51.100.7 through the proxy: their bodies never finish.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(to).await.unwrap();
        c.write_all(
            b"POST /v1/batch HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.7\r\nContent-Length: 1000\r\n\r\n{",
        )
        .await
        .unwrap();
        slow.push(c);
    }
    let from = |client: &'static str, id: &'static str| {
        http()
            .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
            .header("x-forwarded-for", client)
            .json(&batch(vec![product_viewed(id)]))
            .send()
    };
    assert!(
        eventually(PATIENCE, || async {
            from("198.51.100.7", "fwd-over").await.unwrap().status() == 429
        })
        .await,
        "a third request from the same forwarded address was not refused"
    );
    let r = from("198.51.100.7", "fwd-over-2").await.unwrap();
    assert_eq!(r.headers()["retry-after"], "2");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "client_over_share");
    assert_eq!(
        from("198.51.100.8", "fwd-other").await.unwrap().status(),
        200
    );
    drop(slow);
}

/// Finding 7: a body whose key is only in the body is inflated and scanned before its key is
/// known. Bodies from one address that prove no key become that address's debt: past the
/// burst, its body-keyed requests get 429 before their body is read, while other addresses,
/// and its own requests with a header key, are served.
#[tokio::test]
async fn bodies_without_a_valid_key_cost_their_address_a_bounded_share_and_no_one_else() {
    let mut s = settings("unauth_work");
    s.collector.unauthenticated_bytes_per_second = 1000;
    s.collector.unauthenticated_burst_bytes = 1 << 20;
    let collector = Collector::start(&s).await;
    let url = format!("{}/v1/b", collector.url);
    let from = |address: &str| {
        reqwest::Client::builder()
            .local_address(Some(address.parse().unwrap()))
            .timeout(PATIENCE)
            .build()
            .unwrap()
    };
    let attacker = from("127.0.0.2");
    // Small on the wire, 400 KB to inflate and scan, and a key nobody has.
    let mut bogus = batch(vec![product_viewed("bogus")]);
    bogus["writeKey"] = "not-a-key".into();
    bogus["padding"] = "x".repeat(400 << 10).into();
    let bogus = gzip(bogus.to_string().as_bytes());
    let mut answers = Vec::new();
    for _ in 0..6 {
        let r = attacker
            .post(&url)
            .header("content-encoding", "gzip")
            .body(bogus.clone())
            .send()
            .await
            .unwrap();
        answers.push(r.status().as_u16());
    }
    // 400 KB each against a burst of 1 MiB: three 401s (the third takes it past), then 429.
    assert_eq!(answers, [401, 401, 401, 429, 429, 429]);
    let r = attacker
        .post(&url)
        .header("content-encoding", "gzip")
        .body(bogus.clone())
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthenticated_over_budget");

    // Another address's beacon, key in the body, is served; so is a header-keyed request
    // from the same address.
    let mut beacon = batch(vec![product_viewed("beacon-other")]);
    beacon["writeKey"] = IOS_KEY.into();
    let r = from("127.0.0.3")
        .post(&url)
        .header("content-type", "text/plain")
        .body(beacon.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = attacker
        .post_as(format!("{}/v1/batch", collector.url), IOS_KEY)
        .json(&batch(vec![product_viewed("header-keyed")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
