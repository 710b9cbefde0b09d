//! Watching the live feed (issue #26): `ingestctl tail` and the console's source of events.
//!
//! A viewer declares its own queue, exclusive and auto-deleted, capped at [`VIEWER_ITEMS`] items
//! and [`VIEWER_BYTES`] (the oldest go first: a viewer that falls behind loses items, the
//! broker's memory does not grow), binds it to `<prefix>.live`, and reads it without acks. It
//! also holds a consumer on the presence queue `<prefix>.live.viewers`, which is what tells the
//! workers to publish; when the viewer's connection closes, both go and the workers stop within
//! a few seconds.

use std::collections::BTreeSet;

use futures_util::StreamExt as _;
use ingest_pipeline::{broker, Settings, Topology};
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::Value;

/// Items a viewer's queue holds at most.
pub const VIEWER_ITEMS: i64 = 1_000;
/// Bytes a viewer's queue holds at most.
pub const VIEWER_BYTES: i64 = 8 << 20;

/// An attached viewer: its connection and its stream of items.
pub struct Viewer {
    connection: lapin::Connection,
    items: lapin::Consumer,
    _presence: lapin::Consumer,
}

impl Viewer {
    pub async fn attach(settings: &Settings) -> anyhow::Result<Self> {
        let topology = Topology::from_settings(&settings.broker);
        let connection = broker::connect(&settings.broker, "ingestctl-live").await?;
        let channel = connection.create_channel().await?;
        topology.declare_live(&channel).await?;
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(VIEWER_ITEMS));
        args.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(VIEWER_BYTES),
        );
        let own = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await?;
        let queue = own.name().to_string();
        channel
            .queue_bind(
                queue.as_str().into(),
                topology.live_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let no_ack = BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        };
        let items = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await?;
        let presence = channel
            .basic_consume(
                topology.live_viewers().as_str().into(),
                "".into(),
                no_ack,
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            connection,
            items,
            _presence: presence,
        })
    }

    /// The next item, `None` once the feed ended (the connection was lost).
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            let delivery = self.items.next().await?.ok()?;
            if let Ok(item) = serde_json::from_slice::<Value>(&delivery.data) {
                return Some(item);
            }
        }
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.connection.close(200, "".into()),
        )
        .await;
    }
}

/// Which items to show: each list that is not empty must hold the item's value.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sources: BTreeSet<String>,
    pub types: BTreeSet<String>,
    /// A track's `event`, a page's or screen's `name`.
    pub events: BTreeSet<String>,
    /// `userId` or `anonymousId`.
    pub user: Option<String>,
    pub invalid_only: bool,
}

/// The event of an item, and what it is called.
fn event_of(item: &Value) -> &Value {
    item.get("event").unwrap_or(&Value::Null)
}

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// A track's `event`, a page's or screen's `name`.
pub fn name_of(event: &Value) -> Option<&str> {
    match text(event, "type") {
        Some("track") => text(event, "event"),
        _ => text(event, "name"),
    }
}

impl Filter {
    pub fn matches(&self, item: &Value) -> bool {
        let event = event_of(item);
        let valid = item.get("valid").and_then(Value::as_bool).unwrap_or(true);
        let within = |set: &BTreeSet<String>, value: Option<&str>| {
            set.is_empty() || value.is_some_and(|v| set.contains(v))
        };
        (!self.invalid_only || !valid)
            && within(&self.sources, text(item, "source"))
            && within(&self.types, text(event, "type"))
            && within(&self.events, name_of(event))
            && self.user.as_ref().is_none_or(|user| {
                text(event, "userId") == Some(user) || text(event, "anonymousId") == Some(user)
            })
    }
}

/// One line: time, source, type, name, ids, then `valid` or `INVALID` and the first error (with
/// its JSON pointer); a note when the workers skipped items before this one.
pub fn line(item: &Value) -> String {
    let event = event_of(item);
    let at = text(event, "receivedAt")
        .or_else(|| text(item, "receivedAt"))
        .unwrap_or("-");
    let source = text(item, "source").unwrap_or("-");
    let kind = text(event, "type").unwrap_or("-");
    let name = name_of(event)
        .map(|n| format!(" {n:?}"))
        .unwrap_or_default();
    let mut ids = Vec::new();
    for key in ["userId", "anonymousId", "messageId"] {
        if let Some(id) = text(event, key) {
            ids.push(format!("{key}={id}"));
        }
    }
    let valid = item.get("valid").and_then(Value::as_bool).unwrap_or(true);
    let verdict = match valid {
        true => "valid".to_owned(),
        false => {
            let reason = text(item, "reason").unwrap_or("invalid");
            let first = item
                .get("errors")
                .and_then(Value::as_array)
                .and_then(|errors| errors.first())
                .map(|e| {
                    let pointer = text(e, "pointer").filter(|p| !p.is_empty()).unwrap_or("/");
                    format!(": {pointer} {}", text(e, "message").unwrap_or(""))
                })
                .unwrap_or_default();
            format!("INVALID ({reason}){first}")
        }
    };
    let lane = match text(item, "lane") {
        Some("live") | None => String::new(),
        Some(lane) => format!(" [{lane}]"),
    };
    let skipped = item.get("skipped").and_then(Value::as_u64).unwrap_or(0);
    let skipped = match skipped {
        0 => String::new(),
        n => format!(" (+{n} skipped by the workers' rate cap)"),
    };
    format!(
        "{at} {source} {kind}{name} {} {verdict}{lane}{skipped}",
        ids.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn valid_item() -> Value {
        json!({"source": "shop-ios", "lane": "live", "skipped": 0, "valid": true,
            "event": {"type": "track", "event": "Product Viewed", "userId": "u-1",
                "messageId": "m-1", "receivedAt": "2026-12-06T10:00:00.000Z"}})
    }

    fn invalid_item() -> Value {
        json!({"source": "shop-web", "lane": "live", "skipped": 4, "valid": false,
            "reason": "schema",
            "errors": [{"pointer": "/properties/price", "message": "-1 is less than the minimum of 0", "schema": "product_viewed"}],
            "event": {"type": "track", "event": "Product Viewed", "anonymousId": "a-9", "messageId": "m-2"},
            "receivedAt": "2026-12-06T10:00:01.000Z"})
    }

    #[test]
    fn a_line_says_what_the_event_is_and_why_it_was_refused() {
        assert_eq!(
            line(&valid_item()),
            "2026-12-06T10:00:00.000Z shop-ios track \"Product Viewed\" userId=u-1 messageId=m-1 valid"
        );
        assert_eq!(
            line(&invalid_item()),
            "2026-12-06T10:00:01.000Z shop-web track \"Product Viewed\" anonymousId=a-9 messageId=m-2 INVALID (schema): /properties/price -1 is less than the minimum of 0 (+4 skipped by the workers' rate cap)"
        );
    }

    #[test]
    fn filters_select_by_source_type_name_user_and_validity() {
        let (valid, invalid) = (valid_item(), invalid_item());
        let all = Filter::default();
        assert!(all.matches(&valid) && all.matches(&invalid));
        let web = Filter {
            sources: ["shop-web".to_owned()].into(),
            ..Filter::default()
        };
        assert!(!web.matches(&valid) && web.matches(&invalid));
        let invalid_only = Filter {
            invalid_only: true,
            ..Filter::default()
        };
        assert!(!invalid_only.matches(&valid) && invalid_only.matches(&invalid));
        let user = Filter {
            user: Some("a-9".into()),
            ..Filter::default()
        };
        assert!(!user.matches(&valid) && user.matches(&invalid));
        let screens = Filter {
            types: ["screen".to_owned()].into(),
            ..Filter::default()
        };
        assert!(!screens.matches(&valid));
        let named = Filter {
            events: ["Product Viewed".to_owned()].into(),
            ..Filter::default()
        };
        assert!(named.matches(&valid) && named.matches(&invalid));
    }
}
