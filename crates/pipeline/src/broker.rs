//! Broker topology and connection: every queue the pipeline uses is declared here, by both
//! services, with the same arguments (a mismatch would make RabbitMQ refuse the declare).

use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties};

use crate::settings::BrokerSettings;

/// Names of the pipeline's queues, all under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Accepted request bodies, exactly as the collector received them.
    pub fn raw(&self) -> String {
        format!("{}.raw", self.prefix)
    }

    /// Events that failed decoding or validation, with every error and the original event.
    pub fn invalid(&self) -> String {
        format!("{}.invalid", self.prefix)
    }

    pub fn all_queues(&self) -> Vec<String> {
        vec![self.raw(), self.invalid()]
    }

    /// Declares every queue (idempotent): durable quorum queues, replicated on a cluster.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        for queue in self.all_queues() {
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    quorum_arguments(),
                )
                .await?;
        }
        Ok(())
    }
}

fn quorum_arguments() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    args
}

pub async fn connect(settings: &BrokerSettings, name: &str) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(settings.url.expose(), properties).await
}

/// A channel in confirm mode: every publish on it gets an ack or a nack from the broker.
pub async fn confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// A string header value, if present.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, key: &str) -> Option<&'a str> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

pub fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_share_the_prefix() {
        let t = Topology::new("t1");
        assert_eq!(t.raw(), "t1.raw");
        assert_eq!(t.invalid(), "t1.invalid");
        assert_eq!(t.all_queues(), vec!["t1.raw", "t1.invalid"]);
    }

    #[test]
    fn string_headers_are_read_back() {
        let mut table = FieldTable::default();
        table.insert("source".into(), long_string("shop-ios"));
        table.insert("n".into(), AMQPValue::LongInt(3));
        assert_eq!(header_str(Some(&table), "source"), Some("shop-ios"));
        assert_eq!(header_str(Some(&table), "n"), None);
        assert_eq!(header_str(Some(&table), "missing"), None);
        assert_eq!(header_str(None, "source"), None);
    }
}
