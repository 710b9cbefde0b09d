//! Realistic beacons from the sample tracking plan (a mobile shop app).

use serde_json::{json, Value};

pub fn product_viewed(message_id: &str) -> Value {
    json!({
        "type": "track",
        "event": "Product Viewed",
        "messageId": message_id,
        "anonymousId": "anon-7f3c",
        "timestamp": "2026-11-21T09:59:58.000Z",
        "properties": {"product_id": "sku-1042", "name": "Trail Shoe", "price": 89.9, "currency": "EUR"},
        "context": {"app": {"name": "Shop", "version": "4.2.0"}, "os": {"name": "iOS", "version": "18.1"}}
    })
}

pub fn order_completed(message_id: &str, total: f64) -> Value {
    json!({
        "type": "track",
        "event": "Order Completed",
        "messageId": message_id,
        "userId": "user-881",
        "timestamp": "2026-11-21T10:00:00.000Z",
        "properties": {
            "order_id": "ord-5531",
            "total": total,
            "revenue": 80.0,
            "currency": "EUR",
            "products": [{"product_id": "sku-1042", "price": 89.9, "quantity": 1}]
        }
    })
}

pub fn screen(message_id: &str) -> Value {
    json!({
        "type": "screen",
        "name": "Cart",
        "messageId": message_id,
        "userId": "user-881",
        "properties": {}
    })
}

pub fn batch(events: Vec<Value>) -> Value {
    json!({"batch": events, "sentAt": "2026-11-21T10:00:05.000Z", "context": {"library": {"name": "analytics-ios", "version": "4.1.0"}}})
}

pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}
