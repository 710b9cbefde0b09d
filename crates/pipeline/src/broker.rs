//! Broker topology and connection: every queue the pipeline uses is declared here, by both
//! services, with the same arguments. RabbitMQ refuses a declare whose arguments differ from
//! the existing queue's; the one difference tolerated is a raw queue without the byte cap (an
//! earlier release declared it), so that an upgrade does not stop ingest.

use std::time::Duration;

use std::sync::Arc;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use crate::settings::BrokerSettings;

/// Names of the pipeline's queues, all under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    raw_max_length_bytes: u64,
}

impl Topology {
    /// Names only; declaring with it gives the raw queue no size cap.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            raw_max_length_bytes: 0,
        }
    }

    /// The topology the services declare: names from `broker.prefix`, and the raw queue's cap
    /// (every declarer must pass the same arguments, or the broker refuses the declare).
    pub fn from_settings(settings: &BrokerSettings) -> Self {
        Self {
            prefix: settings.prefix.clone(),
            raw_max_length_bytes: settings.raw_max_length_bytes,
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

    /// Valid events, one message per raw delivery, fanned out to every sink's queue.
    pub fn valid_exchange(&self) -> String {
        format!("{}.valid", self.prefix)
    }

    /// A sink's own queue: fresh events, and retried batches coming back from its delay queues.
    pub fn sink_queue(&self, sink: &str) -> String {
        format!("{}.sink.{sink}", self.prefix)
    }

    /// A delay queue: messages wait `delay` there, then dead-letter back to the sink's queue.
    pub fn sink_retry(&self, sink: &str, delay: Duration) -> String {
        format!("{}.sink.{sink}.retry.{}ms", self.prefix, delay.as_millis())
    }

    /// Batches a sink refused for good, or failed `max_attempts` times, with the last error.
    pub fn sink_dlq(&self, sink: &str) -> String {
        format!("{}.sink.{sink}.dlq", self.prefix)
    }

    /// Every queue of one sink, in the order ops read them.
    pub fn sink_queues(&self, sink: &str, retry_delays: &[Duration]) -> Vec<String> {
        let mut queues = vec![self.sink_queue(sink)];
        queues.extend(retry_delays.iter().map(|d| self.sink_retry(sink, *d)));
        queues.push(self.sink_dlq(sink));
        queues
    }

    /// Declares the raw and invalid queues (idempotent): durable quorum queues.
    /// With a cap, the raw queue refuses publishes past it (`reject-publish`: the publisher gets
    /// a nack, so the collector answers 503) rather than growing until a broker alarm.
    pub async fn declare(&self, connection: &Connection) -> lapin::Result<()> {
        let mut raw = quorum_arguments();
        if self.raw_max_length_bytes > 0 {
            let cap = i64::try_from(self.raw_max_length_bytes).unwrap_or(i64::MAX);
            raw.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(cap));
            raw.insert("x-overflow".into(), long_string("reject-publish"));
        }
        let raw_queue = self.raw();
        match declare_alone(connection, &raw_queue, raw).await {
            Ok(()) => {}
            Err(refused) if self.raw_max_length_bytes > 0 && is_precondition_failed(&refused) => {
                // Kept only if it is the same queue but for the cap; any other difference
                // (type, durability, another cap) is still refused.
                declare_alone(connection, &raw_queue, quorum_arguments())
                    .await
                    .map_err(|_| refused.clone())?;
                tracing::warn!(
                    queue = raw_queue,
                    %refused,
                    "raw queue exists without the byte cap; using it as it is (README: \"Changing a queue's arguments\")"
                );
                metrics::counter!("broker_raw_queue_without_cap_total", "queue" => raw_queue.clone())
                    .increment(1);
            }
            Err(error) => return Err(error),
        }
        declare_alone(connection, &self.invalid(), quorum_arguments()).await?;
        Ok(())
    }

    /// Declares the fan-out exchange and, for each sink, its queue (bound to the exchange),
    /// its delay queues and its dead-letter queue.
    pub async fn declare_sinks(
        &self,
        connection: &Connection,
        sinks: &[String],
        retry_delays: &[Duration],
    ) -> lapin::Result<()> {
        self.declare(connection).await?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                self.valid_exchange().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        for sink in sinks {
            let queue = self.sink_queue(sink);
            declare_queue(&channel, &queue, quorum_arguments()).await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.valid_exchange().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            for delay in retry_delays {
                let mut args = quorum_arguments();
                let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
                args.insert("x-dead-letter-exchange".into(), long_string(""));
                args.insert("x-dead-letter-routing-key".into(), long_string(&queue));
                // Quorum queues dead-letter at least once only with reject-publish overflow.
                args.insert(
                    "x-dead-letter-strategy".into(),
                    long_string("at-least-once"),
                );
                args.insert("x-overflow".into(), long_string("reject-publish"));
                declare_queue(&channel, &self.sink_retry(sink, *delay), args).await?;
            }
            declare_queue(&channel, &self.sink_dlq(sink), quorum_arguments()).await?;
        }
        let _ = channel.close(200, "".into()).await;
        Ok(())
    }
}

/// Declares a durable queue with `arguments` on a channel of its own: a refused declare closes
/// its channel.
async fn declare_alone(
    connection: &Connection,
    queue: &str,
    arguments: FieldTable,
) -> lapin::Result<()> {
    let channel = connection.create_channel().await?;
    declare_queue(&channel, queue, arguments).await?;
    let _ = channel.close(200, "".into()).await;
    Ok(())
}

/// A queue as a passive declare sees it (depth, consumers), on a channel of its own, since a
/// missing queue closes the channel it was asked on; `Ok(None)` if it does not exist. The
/// channel is closed before the caller closes the connection (lapin logs an error otherwise).
pub async fn inspect_queue(
    connection: &Connection,
    queue: &str,
) -> lapin::Result<Option<lapin::Queue>> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let Ok(found) = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    else {
        return Ok(None);
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), channel.close(200, "".into())).await;
    Ok(Some(found))
}

/// The broker refused a declare because the queue exists with other arguments or type.
fn is_precondition_failed(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 406)
}

/// Declares a durable queue with `arguments`.
pub async fn declare_queue(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
) -> lapin::Result<()> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    Ok(())
}

/// `x-queue-type: quorum`, the type of every pipeline queue.
pub fn quorum_arguments() -> FieldTable {
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

/// A confirm channel that many tasks publish on. lapin numbers a publish and queues its frames
/// under two different locks, so two concurrent publishes can reach the broker in the other
/// order and each get the other's confirm; harmless while all are acks, wrong when one is a
/// nack or a return. The send is therefore serialised (the confirms are still awaited
/// concurrently, so throughput is unchanged).
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    send: Arc<tokio::sync::Mutex<()>>,
}

impl Publisher {
    pub async fn open(connection: &Connection) -> lapin::Result<Self> {
        Ok(Self {
            channel: confirm_channel(connection).await?,
            send: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes and waits for the broker's answer.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<Confirmation> {
        let confirm = {
            let _in_order = self.send.lock().await;
            self.channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    options,
                    body,
                    properties,
                )
                .await?
        };
        confirm.await
    }
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
        assert_eq!(t.valid_exchange(), "t1.valid");
        assert_eq!(
            t.sink_queues(
                "vendor",
                &[Duration::from_secs(1), Duration::from_millis(30_000)]
            ),
            vec![
                "t1.sink.vendor",
                "t1.sink.vendor.retry.1000ms",
                "t1.sink.vendor.retry.30000ms",
                "t1.sink.vendor.dlq"
            ]
        );
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
