//! Realistic Segment-style mobile batches for the sample tracking plan (`schemas/`).
//!
//! Building JSON for every request would cost the generator more CPU than the collector spends
//! on it, so a pool of templates is built once; each request copies one and writes fresh
//! `messageId`s into fixed-width slots (a hyphenated UUID is always 36 bytes), then gzips it if
//! the template is one of the gzip share. Every event therefore has a unique `messageId`.

use std::io::Write as _;

use bytes::Bytes;
use chrono::{Duration as ChronoDuration, SecondsFormat, Utc};
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Map, Value};

/// Written where each `messageId` goes; same length as a hyphenated UUID.
const SLOT: &str = "@@@@@@@@-@@@@-@@@@-@@@@-@@@@@@@@@@@@";

/// How the requests are shaped.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Templates to draw from (more: more variety, more memory).
    pub templates: usize,
    /// Share of requests sent with `Content-Encoding: gzip`.
    pub gzip_share: f64,
    /// Largest number of events in one request.
    pub max_events: usize,
    pub seed: u64,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            templates: 256,
            gzip_share: 0.2,
            max_events: 50,
            seed: 0x5eed,
        }
    }
}

struct Template {
    json: Vec<u8>,
    slots: Vec<usize>,
    gzip: bool,
}

/// One request body, ready to send, with the ids of its events.
#[derive(Debug, Clone)]
pub struct Payload {
    pub body: Bytes,
    pub gzip: bool,
    /// Length of the JSON before gzip.
    pub json_len: usize,
    pub ids: Vec<u128>,
}

impl Payload {
    pub fn events(&self) -> usize {
        self.ids.len()
    }
}

/// Makes payloads from the template pool; one per sending task (it holds its own RNG).
pub struct Generator {
    templates: std::sync::Arc<Vec<Template>>,
    rng: fastrand::Rng,
}

impl Generator {
    pub fn new(shape: &Shape) -> Self {
        let mut rng = fastrand::Rng::with_seed(shape.seed);
        let templates = (0..shape.templates.max(1))
            .map(|_| template(&mut rng, shape))
            .collect();
        Self {
            templates: std::sync::Arc::new(templates),
            rng: fastrand::Rng::new(),
        }
    }

    /// Another generator over the same templates with its own random ids, for another task.
    /// (Cloning the RNG would repeat this generator's ids.)
    pub fn fork(&mut self) -> Self {
        Self {
            templates: self.templates.clone(),
            rng: self.rng.fork(),
        }
    }

    /// A fresh payload: a random template with new, unique messageIds.
    pub fn next_payload(&mut self) -> Payload {
        let index = self.rng.usize(..self.templates.len());
        let template = &self.templates[index];
        let mut json = template.json.clone();
        let mut ids = Vec::with_capacity(template.slots.len());
        for &at in &template.slots {
            let id = uuid::Builder::from_random_bytes(self.rng.u128(..).to_le_bytes()).into_uuid();
            id.hyphenated().encode_lower(&mut json[at..at + SLOT.len()]);
            ids.push(id.as_u128());
        }
        let json_len = json.len();
        let body = if template.gzip { gzip(&json) } else { json };
        Payload {
            body: Bytes::from(body),
            gzip: template.gzip,
            json_len,
            ids,
        }
    }

    /// Mean JSON size and events of the pool, for the report.
    pub fn pool_stats(&self) -> PoolStats {
        let n = self.templates.len() as f64;
        let sizes: Vec<usize> = self.templates.iter().map(|t| t.json.len()).collect();
        PoolStats {
            templates: self.templates.len(),
            mean_bytes: sizes.iter().sum::<usize>() as f64 / n,
            min_bytes: sizes.iter().copied().min().unwrap_or(0),
            max_bytes: sizes.iter().copied().max().unwrap_or(0),
            mean_events: self.templates.iter().map(|t| t.slots.len()).sum::<usize>() as f64 / n,
            gzip_share: self.templates.iter().filter(|t| t.gzip).count() as f64 / n,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStats {
    pub templates: usize,
    pub mean_bytes: f64,
    pub min_bytes: usize,
    pub max_bytes: usize,
    pub mean_events: f64,
    pub gzip_share: f64,
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(data.len() / 4), Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default()
}

/// Formats a recorded id the way it was sent.
pub fn id_string(id: u128) -> String {
    uuid::Uuid::from_u128(id).hyphenated().to_string()
}

fn template(rng: &mut fastrand::Rng, shape: &Shape) -> Template {
    // Most SDK flushes are small; some carry a backlog (an app that was offline).
    let max = shape.max_events.max(1);
    let tiny = rng.f64() < 0.1;
    let events = if tiny {
        1
    } else {
        match rng.u8(0..100) {
            0..40 => rng.usize(1..=5.min(max)),
            40..75 => rng.usize(5.min(max)..=20.min(max)),
            _ => rng.usize(20.min(max)..=max),
        }
    };
    let user = person(rng);
    let now = Utc::now();
    let mut batch = Vec::with_capacity(events);
    for i in 0..events {
        let at = now - ChronoDuration::milliseconds(((events - i) * 1500) as i64);
        batch.push(event(
            rng,
            &user,
            &at.to_rfc3339_opts(SecondsFormat::Millis, true),
        ));
    }
    let mut body = Map::new();
    body.insert("batch".into(), Value::Array(batch));
    body.insert(
        "sentAt".into(),
        now.to_rfc3339_opts(SecondsFormat::Millis, true).into(),
    );
    if !tiny {
        body.insert("context".into(), device_context(rng, &user));
    }
    let json = serde_json::to_vec(&Value::Object(body)).unwrap_or_default();
    let slots = find_slots(&json);
    Template {
        json,
        slots,
        gzip: rng.f64() < shape.gzip_share,
    }
}

fn find_slots(json: &[u8]) -> Vec<usize> {
    let slot = SLOT.as_bytes();
    let mut slots = Vec::new();
    let mut i = 0;
    while i + slot.len() <= json.len() {
        if &json[i..i + slot.len()] == slot {
            slots.push(i);
            i += slot.len();
        } else {
            i += 1;
        }
    }
    slots
}

struct Person {
    anonymous_id: String,
    user_id: Option<String>,
    device_id: String,
}

fn person(rng: &mut fastrand::Rng) -> Person {
    let uuid = |rng: &mut fastrand::Rng| {
        uuid::Builder::from_random_bytes(rng.u128(..).to_le_bytes())
            .into_uuid()
            .to_string()
    };
    Person {
        anonymous_id: uuid(rng),
        user_id: (rng.f64() < 0.6).then(|| format!("u-{}", rng.u32(1..5_000_000))),
        device_id: uuid(rng).to_uppercase(),
    }
}

fn device_context(rng: &mut fastrand::Rng, user: &Person) -> Value {
    let ios = rng.bool();
    let (os, os_version, model, manufacturer, library) = if ios {
        ("iOS", "17.4.1", "iPhone14,5", "Apple", "analytics-swift")
    } else {
        ("Android", "14", "Pixel 8", "Google", "analytics-kotlin")
    };
    json!({
        "app": {"name": "Shop", "version": "4.12.0", "build": "41200", "namespace": "com.example.shop"},
        "device": {"id": user.device_id, "manufacturer": manufacturer, "model": model,
                   "type": if ios { "ios" } else { "android" }, "adTrackingEnabled": false},
        "os": {"name": os, "version": os_version},
        "library": {"name": library, "version": "1.5.11"},
        "locale": pick(rng, &["en-US", "de-DE", "fr-FR", "es-ES", "en-GB"]),
        "timezone": pick(rng, &["Europe/Berlin", "America/New_York", "Europe/Paris", "Asia/Tokyo"]),
        "network": {"wifi": rng.bool(), "cellular": rng.bool(), "carrier": pick(rng, &["T-Mobile", "Vodafone", "Orange", "AT&T"])},
        "screen": {"width": 390, "height": 844, "density": 3},
        "traits": {"anonymousId": user.anonymous_id}
    })
}

fn pick<'a>(rng: &mut fastrand::Rng, from: &[&'a str]) -> &'a str {
    from[rng.usize(..from.len())]
}

fn price(rng: &mut fastrand::Rng) -> f64 {
    f64::from(rng.u32(99..49_999)) / 100.0
}

fn product(rng: &mut fastrand::Rng) -> Value {
    let id = rng.u32(1..90_000);
    json!({
        "product_id": format!("sku-{id}"),
        "sku": format!("SKU-{id:06}"),
        "name": pick(rng, &["Trail Runner 3", "Merino Hoodie", "Espresso Grinder", "Linen Shirt", "Travel Mug"]),
        "category": pick(rng, &["shoes", "apparel", "kitchen", "outdoor"]),
        "price": price(rng),
        "quantity": rng.u32(1..4),
    })
}

fn event(rng: &mut fastrand::Rng, user: &Person, timestamp: &str) -> Value {
    let mut event = Map::new();
    event.insert("messageId".into(), SLOT.into());
    event.insert("anonymousId".into(), user.anonymous_id.clone().into());
    if let Some(id) = &user.user_id {
        event.insert("userId".into(), id.clone().into());
    }
    event.insert("timestamp".into(), timestamp.into());
    let roll = rng.u8(0..100);
    match roll {
        0..35 => {
            event.insert("type".into(), "screen".into());
            let screen = pick(
                rng,
                &[
                    "Home",
                    "Search",
                    "Product Detail",
                    "Cart",
                    "Checkout",
                    "Account",
                ],
            );
            event.insert("name".into(), screen.into());
            event.insert(
                "properties".into(),
                json!({"category": pick(rng, &["browse", "shop", "account"]), "referrer_screen": "Home"}),
            );
        }
        35..45 => {
            event.insert("type".into(), "identify".into());
            let n = rng.u32(1..1_000_000);
            event.insert(
                "traits".into(),
                json!({
                    "email": format!("customer{n}@example.com"),
                    "name": "Alex Example",
                    "firstName": "Alex",
                    "lastName": "Example",
                    "plan": pick(rng, &["free", "plus", "premium"]),
                    "marketingOptIn": rng.bool(),
                    "lifetimeValue": price(rng),
                }),
            );
        }
        _ => {
            event.insert("type".into(), "track".into());
            let (name, properties) = track(rng, roll);
            event.insert("event".into(), name.into());
            event.insert("properties".into(), properties);
        }
    }
    Value::Object(event)
}

fn track(rng: &mut fastrand::Rng, roll: u8) -> (&'static str, Value) {
    match roll {
        45..53 => (
            "Application Opened",
            json!({"from_background": rng.bool(), "version": "4.12.0", "build": 41200}),
        ),
        53..73 => {
            let mut p = product(rng);
            if let Some(p) = p.as_object_mut() {
                p.remove("quantity");
                p.insert("currency".into(), "EUR".into());
                p.insert("position".into(), rng.u32(1..40).into());
                p.insert(
                    "image_url".into(),
                    format!("https://cdn.example.com/p/{}.jpg", rng.u32(1..90_000)).into(),
                );
            }
            ("Product Viewed", p)
        }
        73..85 => {
            let mut p = product(rng);
            if let Some(p) = p.as_object_mut() {
                p.insert("cart_id".into(), format!("cart-{}", rng.u32(..)).into());
                p.insert("currency".into(), "EUR".into());
            }
            ("Product Added", p)
        }
        85..92 => {
            let products: Vec<Value> = (0..rng.usize(1..4)).map(|_| product(rng)).collect();
            (
                "Checkout Started",
                json!({"cart_id": format!("cart-{}", rng.u32(..)), "value": price(rng),
                       "currency": "EUR", "products": products}),
            )
        }
        _ => {
            let products: Vec<Value> = (0..rng.usize(1..5)).map(|_| product(rng)).collect();
            let total = price(rng);
            (
                "Order Completed",
                json!({"order_id": format!("o-{}", rng.u32(..)), "checkout_id": format!("c-{}", rng.u32(..)),
                       "total": total, "subtotal": total, "revenue": total, "tax": 0.0,
                       "shipping": 4.9, "currency": "EUR", "products": products}),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_gets_a_unique_message_id() {
        let mut generator = Generator::new(&Shape::default());
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let payload = generator.next_payload();
            assert!(payload.events() >= 1 && payload.events() <= 50);
            let json = if payload.gzip {
                let mut out = Vec::new();
                let mut decoder = flate2::read::GzDecoder::new(&payload.body[..]);
                std::io::Read::read_to_end(&mut decoder, &mut out).expect("gunzip");
                out
            } else {
                payload.body.to_vec()
            };
            let value: Value = serde_json::from_slice(&json).expect("json");
            let batch = value["batch"].as_array().expect("batch");
            assert_eq!(batch.len(), payload.events());
            for (event, id) in batch.iter().zip(&payload.ids) {
                assert_eq!(event["messageId"], id_string(*id));
                assert!(seen.insert(*id), "duplicate id");
            }
        }
    }

    #[test]
    fn forks_never_repeat_ids() {
        let mut first = Generator::new(&Shape::default());
        let mut second = first.fork();
        let mut third = first.fork();
        let mut seen = std::collections::HashSet::new();
        for generator in [&mut first, &mut second, &mut third] {
            for _ in 0..50 {
                for id in generator.next_payload().ids {
                    assert!(seen.insert(id), "a fork repeated an id");
                }
            }
        }
    }

    #[test]
    fn sizes_span_small_beacons_to_large_backlogs() {
        let stats = Generator::new(&Shape::default()).pool_stats();
        assert!(stats.min_bytes < 1_000, "{stats:?}");
        assert!(stats.max_bytes > 10_000, "{stats:?}");
        assert!(stats.max_bytes < 40_000, "{stats:?}");
    }
}
