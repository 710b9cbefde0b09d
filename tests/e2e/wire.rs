//! What SDKs put on the wire beyond the plain tracking API, issue #20: the paths, key places,
//! content types and CORS preflights of real SDKs, each accepted, and what is still refused.

use std::time::Duration;

use ingest_e2e::*;
use mongodb::bson::doc;
use reqwest::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_MAX_AGE,
};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::fixtures::*;

const LAND: Duration = Duration::from_secs(30);

async fn preflight(url: &str, origin: &str, headers: &str) -> reqwest::Response {
    http()
        .request(reqwest::Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", headers)
        .send()
        .await
        .unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &reqwest::header::HeaderName) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// RudderStack's browser SDK adds `AnonymousId` (and more) to its XHRs, and `sendBeacon` always
/// sends credentials: a preflight that listed three headers and no credentials blocked them all.
#[tokio::test]
async fn a_preflight_allows_every_header_a_browser_sdk_sends_with_credentials_for_a_day() {
    let mut s = settings("cors_any");
    let collector = Collector::start(&s).await;
    let origin = "https://shop.example";
    let sdk_headers = "anonymousid,authorization,content-type,x-custom-sdk-header";
    for path in ["/v1/batch", "/v1/b", "/beacon/v1/batch"] {
        let r = preflight(&format!("{}{path}", collector.url), origin, sdk_headers).await;
        assert!(r.status().is_success(), "{path}: {}", r.status());
        assert_eq!(header(&r, &ACCESS_CONTROL_ALLOW_ORIGIN), origin, "{path}");
        assert_eq!(
            header(&r, &ACCESS_CONTROL_ALLOW_CREDENTIALS),
            "true",
            "{path}"
        );
        let allowed = header(&r, &ACCESS_CONTROL_ALLOW_HEADERS).to_ascii_lowercase();
        for h in sdk_headers.split(',') {
            assert!(allowed.contains(h), "{path}: {h} not in `{allowed}`");
        }
        assert_eq!(header(&r, &ACCESS_CONTROL_MAX_AGE), "86400", "{path}");
    }
    collector.stop().await;

    // A configured list still decides which origins get an answer.
    s.collector.cors_allowed_origins = vec![origin.to_owned()];
    let collector = Collector::start(&s).await;
    let url = format!("{}/v1/batch", collector.url);
    let allowed = preflight(&url, origin, "anonymousid").await;
    assert_eq!(header(&allowed, &ACCESS_CONTROL_ALLOW_ORIGIN), origin);
    let other = preflight(&url, "https://evil.example", "anonymousid").await;
    assert_eq!(header(&other, &ACCESS_CONTROL_ALLOW_ORIGIN), "");
}

/// The write key's places, first found wins: the Authorization header, the query's `writeKey`,
/// the body's `writeKey`. The source a stored event gets shows which one was used.
#[tokio::test]
async fn the_write_key_comes_from_the_header_then_the_query_then_the_body() {
    let s = settings("key_order");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let body = |id: &str| json!({"writeKey": WEB_KEY, "batch": [product_viewed(id)]}).to_string();
    let send = |path: String, id: &str, basic: bool| {
        let mut request = http()
            .post(format!("{}{path}", collector.url))
            .header("content-type", "text/plain")
            .body(body(id));
        if basic {
            request = request.basic_auth(IOS_KEY, Some(""));
        }
        request.send()
    };
    let cases = [
        ("/v1/batch".to_owned(), "key-header", true, "shop-ios"),
        (
            format!("/beacon/v1/batch?writeKey={IOS_KEY}"),
            "key-query",
            false,
            "shop-ios",
        ),
        (
            "/beacon/v1/batch?writeKey=".to_owned(),
            "key-body",
            false,
            "shop-web",
        ),
        ("/v1/b".to_owned(), "key-b", false, "shop-web"),
    ];
    for (path, id, basic, _) in &cases {
        let r = send(path.clone(), id, *basic).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(
        wait_for_count(&s, doc! {}, cases.len() as u64, LAND).await,
        cases.len() as u64
    );
    for (path, id, _, source) in &cases {
        let stored = find(&s, doc! {"messageId": *id}).await;
        assert_eq!(stored.len(), 1, "{path}");
        assert_eq!(stored[0].get_str("source").unwrap(), *source, "{path}");
    }

    // An unknown key in the query is refused, whatever the body says.
    let r = send(
        "/beacon/v1/batch?writeKey=nope".to_owned(),
        "key-unknown",
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
}

/// SDKs declare all sorts of types on the same JSON (rudder-sdk-node's gzip mode was answered
/// 415); the body is read as JSON whatever the type says, gzipped or not.
#[tokio::test]
async fn a_json_body_lands_whatever_content_type_it_declares() {
    let s = settings("any_type");
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let types = [
        None,
        Some("application/json"),
        Some("application/json;charset=utf-8"),
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        Some("application/octet-stream"),
        Some("application/xml"),
    ];
    let mut ids = Vec::new();
    for (n, content_type) in types.iter().enumerate() {
        for gzipped in [false, true] {
            let id = format!("type-{n}-{gzipped}");
            let mut body = batch(vec![product_viewed(&id)]).to_string().into_bytes();
            let mut request = http().post_as(format!("{}/v1/batch", collector.url), IOS_KEY);
            if gzipped {
                body = gzip(&body);
                request = request.header("content-encoding", "gzip");
            }
            if let Some(content_type) = content_type {
                request = request.header("content-type", *content_type);
            }
            let r = request.body(body).send().await.unwrap();
            assert_eq!(r.status(), 200, "{content_type:?}, gzip {gzipped}");
            ids.push(id);
        }
    }
    let n = ids.len() as u64;
    assert_eq!(
        wait_for_count(&s, doc! {"messageId": {"$in": &ids}}, n, LAND).await,
        n
    );
}

/// analytics-kotlin up to 1.22 streamed its gzipped `text/plain` batch chunked (no
/// Content-Length) to `/v1/b`, the key in the body; RudderStack's Kotlin SDK streams chunked
/// too. Chunked and gzipped together lands; chunked past the limit is a 413, and a chunked
/// body holds the in-flight budget only for what has arrived.
#[tokio::test]
async fn a_chunked_gzipped_text_plain_batch_to_v1_b_with_its_key_in_the_body_lands() {
    let mut s = settings("chunked_gzip");
    s.collector.max_batch_bytes = 64 << 10;
    // Less than a quarter of it for body-keyed requests: one chunked request that reserved
    // its endpoint's whole limit up front would find no room.
    s.collector.max_in_flight_bytes = 200 << 10;
    let collector = Collector::start(&s).await;
    let _worker = Worker::start(&s);
    let ids: Vec<String> = (0..40).map(|n| format!("chunked-{n}")).collect();
    let mut body = batch(ids.iter().map(|id| product_viewed(id)).collect());
    body["writeKey"] = json!(IOS_KEY);
    let gzipped = gzip(body.to_string().as_bytes());
    let headers = [
        ("Content-Type".to_owned(), "text/plain".to_owned()),
        ("Content-Encoding".to_owned(), "gzip".to_owned()),
    ];
    // A slow chunked upload is under way: before, it held the endpoint's whole limit, all
    // the body-keyed bytes there are, and the upload beside it got a 503.
    let addr = collector.url.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        format!("POST /v1/b HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{\"\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    assert!(
        eventually(LAND, || async {
            metric_value(
                &metrics_of(&http(), &collector.url).await,
                "collector_in_flight_requests",
            ) >= 1.0
        })
        .await,
        "the slow upload never started"
    );
    let (status, head, answer) =
        http1_exchange(&collector.url, "/v1/b", &headers, &gzipped, Some(100))
            .await
            .expect("an answer");
    assert_eq!(status, 200, "{head}\n{}", String::from_utf8_lossy(&answer));
    drop(slow);
    let n = ids.len() as u64;
    assert_eq!(
        wait_for_count(&s, doc! {"messageId": {"$in": &ids}}, n, LAND).await,
        n
    );

    // Past max_batch_bytes as it arrives: 413, nothing published.
    let mut big = batch(vec![product_viewed("too-big")]);
    big["writeKey"] = json!(IOS_KEY);
    big["padding"] = json!("x".repeat(70 << 10));
    let (status, _, answer) = http1_exchange(
        &collector.url,
        "/v1/b",
        &headers[..1],
        big.to_string().as_bytes(),
        Some(4096),
    )
    .await
    .expect("an answer");
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(count(&s, doc! {"messageId": "too-big"}).await, 0);
}
