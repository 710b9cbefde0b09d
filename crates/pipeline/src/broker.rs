//! Broker topology and connection: every queue the pipeline uses is declared here, by both
//! services, with the same arguments. Every queue the pipeline consumes (raw, each sink's) has
//! a delivery limit and a dead-letter queue, so a message that keeps failing ends where ops
//! can see it instead of looping. RabbitMQ refuses a declare whose arguments differ from the
//! existing queue's; a queue declared by an earlier release (without the byte cap or the
//! delivery limit) is used as it is, with a warning and a metric, so that an upgrade does not
//! stop ingest (`docs/design.md`, "Changing a queue's arguments", says how to apply the new arguments
//! with a policy).

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

pub use crate::publish::{
    confirm_channel, until_taken, ConfirmWait, Confirmed, Policy, PublishError, Publisher,
};
use crate::settings::{ArchiveSettings, BrokerSettings};

/// Names of the pipeline's queues, all under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    raw_max_length_bytes: u64,
    invalid_max_length_bytes: u64,
    delivery_limit: u32,
    /// The archive stream's retention; `None`: no archive.
    archive: Option<ArchiveSettings>,
}

/// The delivery limit of a topology built from names only.
const DEFAULT_DELIVERY_LIMIT: u32 = 20;

impl Topology {
    /// Names only; declaring with it gives the raw queue no size cap.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            raw_max_length_bytes: 0,
            invalid_max_length_bytes: 0,
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            archive: None,
        }
    }

    /// The topology the services declare: names from `broker.prefix`, and the raw queue's cap
    /// (every declarer must pass the same arguments, or the broker refuses the declare).
    pub fn from_settings(settings: &BrokerSettings) -> Self {
        Self {
            prefix: settings.prefix.clone(),
            raw_max_length_bytes: settings.raw_max_length_bytes,
            invalid_max_length_bytes: settings.invalid_max_length_bytes,
            delivery_limit: settings.delivery_limit,
            archive: settings.archive.enabled.then(|| settings.archive.clone()),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Accepted request bodies, exactly as the collector received them.
    pub fn raw(&self) -> String {
        format!("{}.raw", self.prefix)
    }

    /// The exchange the collector publishes raw requests to: it routes each to the raw queue
    /// and, with the archive on, to the archive stream. A fanout: every queue bound gets all.
    pub fn ingest_exchange(&self) -> String {
        format!("{}.ingest", self.prefix)
    }

    /// The stream that keeps every raw request for replay (`broker.archive`).
    pub fn archive(&self) -> String {
        format!("{}.archive", self.prefix)
    }

    /// Archived requests `ingestctl replay` sends through the pipeline again: a lane of their
    /// own, which workers consume beside the raw queue with a smaller prefetch
    /// (`worker.replay_prefetch`), so a backfill takes a smaller share than live traffic.
    pub fn replay(&self) -> String {
        format!("{}.replay", self.prefix)
    }

    /// Requests past their source's quota or one of its users' (`policy`): the collector
    /// publishes them here instead of the raw queue, and workers drain it behind the raw queue
    /// with a smaller prefetch (`worker.overflow_prefetch`), so a flood slows only itself.
    pub fn overflow(&self) -> String {
        format!("{}.overflow", self.prefix)
    }

    /// The exchange the collector publishes overflowed requests to: it routes each to the
    /// overflow lane and, with the archive on, to the archive stream, as the ingest exchange
    /// does for the raw queue.
    pub fn overflow_exchange(&self) -> String {
        format!("{}.ingest.overflow", self.prefix)
    }

    /// The live feed's fanout exchange (`ingestctl tail`, `console`): workers publish to it only
    /// while [`Topology::live_viewers`] has consumers.
    pub fn live_exchange(&self) -> String {
        format!("{}.live", self.prefix)
    }

    /// The live feed's presence queue: each viewer holds a consumer on it (it never gets a
    /// message), and the workers read its consumer count.
    pub fn live_viewers(&self) -> String {
        format!("{}.live.viewers", self.prefix)
    }

    /// Declares the live feed's exchange and presence queue (idempotent, neither durable: a
    /// viewer or worker declares them again); the presence queue's consumer count.
    pub async fn declare_live(&self, channel: &Channel) -> lapin::Result<u32> {
        channel
            .exchange_declare(
                self.live_exchange().as_str().into(),
                lapin::ExchangeKind::Fanout,
                lapin::options::ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let queue = channel
            .queue_declare(
                self.live_viewers().as_str().into(),
                lapin::options::QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(queue.consumer_count())
    }

    /// Raw payloads that reached the delivery limit (workers kept failing on them), with
    /// RabbitMQ's `x-death` header.
    pub fn raw_dlq(&self) -> String {
        format!("{}.raw.dlq", self.prefix)
    }

    /// Events that failed decoding or validation, with every error and the original event.
    pub fn invalid(&self) -> String {
        format!("{}.invalid", self.prefix)
    }

    pub fn all_queues(&self) -> Vec<String> {
        vec![
            self.raw(),
            self.replay(),
            self.overflow(),
            self.invalid(),
            self.raw_dlq(),
        ]
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

    /// Arguments of a queue the pipeline consumes: past the delivery limit a message is
    /// dead-lettered to `dead_letter_queue`, at least once (which quorum queues do only with
    /// `reject-publish` overflow).
    fn consumed_arguments(&self, dead_letter_queue: &str) -> FieldTable {
        let mut args = quorum_arguments();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert("x-dead-letter-exchange".into(), long_string(""));
        args.insert(
            "x-dead-letter-routing-key".into(),
            long_string(dead_letter_queue),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            long_string("at-least-once"),
        );
        args.insert("x-overflow".into(), long_string("reject-publish"));
        args
    }

    /// Declares the raw queue, its dead-letter queue and the invalid queue (idempotent):
    /// durable quorum queues. With a cap, the raw queue refuses publishes past it
    /// (`reject-publish`: the publisher gets a nack, so the collector answers 503) rather than
    /// growing until a broker alarm.
    pub async fn declare(&self, connection: &Connection) -> lapin::Result<()> {
        declare_alone(connection, &self.raw_dlq(), quorum_arguments()).await?;
        let mut raw = self.consumed_arguments(&self.raw_dlq());
        let mut capped = quorum_arguments();
        if self.raw_max_length_bytes > 0 {
            let cap = i64::try_from(self.raw_max_length_bytes).unwrap_or(i64::MAX);
            for args in [&mut raw, &mut capped] {
                args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(cap));
                args.insert("x-overflow".into(), long_string("reject-publish"));
            }
        }
        // Earlier releases: the cap without the delivery limit, and before that neither.
        let kept = declare_or_keep(
            connection,
            &self.raw(),
            raw,
            vec![capped, quorum_arguments()],
        )
        .await?;
        if self.raw_max_length_bytes > 0 && kept == Some(1) {
            metrics::counter!("broker_raw_queue_without_cap_total", "queue" => self.raw())
                .increment(1);
        }
        // Capped like the raw queue: the worker counts and summarises what it refuses. Kept as
        // an earlier release declared it (no cap) with a warning, as the raw queue is.
        let mut invalid = quorum_arguments();
        if self.invalid_max_length_bytes > 0 {
            let cap = i64::try_from(self.invalid_max_length_bytes).unwrap_or(i64::MAX);
            invalid.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(cap));
            invalid.insert("x-overflow".into(), long_string("reject-publish"));
        }
        declare_or_keep(
            connection,
            &self.invalid(),
            invalid,
            vec![quorum_arguments()],
        )
        .await?;
        self.declare_ingest(connection).await
    }

    /// The ingest exchange, the raw queue bound to it, and with the archive on, the stream
    /// bound to it too. Bindings are only ever added: a service with the archive off leaves an
    /// archive that another declared in place.
    async fn declare_ingest(&self, connection: &Connection) -> lapin::Result<()> {
        let exchange = self.ingest_exchange();
        let channel = connection.create_channel().await?;
        declare_fanout(&channel, &exchange).await?;
        bind(&channel, &self.raw(), &exchange).await?;
        // The overflow lane: the raw queue's arguments, so a flood there is capped and
        // dead-lettered as raw requests are.
        let overflow_exchange = self.overflow_exchange();
        declare_fanout(&channel, &overflow_exchange).await?;
        let warning = "the overflow lane exists with other arguments; using it as it is";
        declare_as_it_is(connection, &self.overflow(), self.raw_arguments(), warning).await?;
        bind(&channel, &self.overflow(), &overflow_exchange).await?;
        if let Some(archive) = &self.archive {
            declare_archive(connection, &self.archive(), archive).await?;
            bind(&channel, &self.archive(), &exchange).await?;
            bind(&channel, &self.archive(), &overflow_exchange).await?;
        }
        let _ = channel.close(200, "".into()).await;
        Ok(())
    }

    /// The replay lane, with the raw queue's arguments (its cap makes a replay wait, not grow
    /// the broker). Declared by the workers and `ingestctl replay`, never by the collector:
    /// one that exists with other arguments is used as it is, with a warning.
    pub async fn declare_replay(&self, connection: &Connection) -> lapin::Result<()> {
        // With `reject-publish`: a full lane nacks the replay's publish (it stops, to be
        // resumed) instead of dropping the oldest requests, a quorum queue's default.
        let args = self.raw_arguments();
        let warning = "the replay lane exists with other arguments; using it as it is";
        declare_as_it_is(connection, &self.replay(), args, warning).await
    }

    /// The raw queue's arguments as this release declares them: the dead-letter queue and
    /// delivery limit, and the cap refusing publishes past it.
    fn raw_arguments(&self) -> FieldTable {
        let mut args = self.consumed_arguments(&self.raw_dlq());
        if self.raw_max_length_bytes > 0 {
            let cap = i64::try_from(self.raw_max_length_bytes).unwrap_or(i64::MAX);
            args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(cap));
            args.insert("x-overflow".into(), long_string("reject-publish"));
        }
        args
    }

    /// Declares the fan-out exchange and, for each sink, its queue (bound to the exchange),
    /// its delay queues and its dead-letter queue; and the replay lane.
    pub async fn declare_sinks(
        &self,
        connection: &Connection,
        sinks: &[String],
        retry_delays: &[Duration],
    ) -> lapin::Result<()> {
        self.declare(connection).await?;
        self.declare_replay(connection).await?;
        let channel = connection.create_channel().await?;
        declare_fanout(&channel, &self.valid_exchange()).await?;
        for sink in sinks {
            let queue = self.sink_queue(sink);
            declare_queue(&channel, &self.sink_dlq(sink), quorum_arguments()).await?;
            let args = self.consumed_arguments(&self.sink_dlq(sink));
            declare_or_keep(connection, &queue, args, vec![quorum_arguments()]).await?;
            bind(&channel, &queue, &self.valid_exchange()).await?;
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
        }
        let _ = channel.close(200, "".into()).await;
        Ok(())
    }
}

/// Declares a durable fanout exchange.
async fn declare_fanout(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Fanout,
            options,
            FieldTable::default(),
        )
        .await
}

/// Binds `queue` to the fanout `exchange`.
async fn bind(channel: &Channel, queue: &str, exchange: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
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

/// Declares `queue` with `wanted`; if the broker refuses because the queue exists with other
/// arguments, keeps it if it matches one of `earlier` (what earlier releases declared), with a
/// warning and `broker_queue_kept_with_old_arguments_total`. Any other difference (type,
/// durability) is still refused. Returns which earlier form was kept, if any.
async fn declare_or_keep(
    connection: &Connection,
    queue: &str,
    wanted: FieldTable,
    earlier: Vec<FieldTable>,
) -> lapin::Result<Option<usize>> {
    let refused = match declare_alone(connection, queue, wanted).await {
        Ok(()) => return Ok(None),
        Err(error) if is_precondition_failed(&error) => error,
        Err(error) => return Err(error),
    };
    for (i, args) in earlier.into_iter().enumerate() {
        if declare_alone(connection, queue, args).await.is_ok() {
            tracing::warn!(
                queue,
                %refused,
                "queue exists with an earlier release's arguments (no delivery limit or byte cap); using it as it is (docs/design.md: \"Changing a queue's arguments\")"
            );
            metrics::counter!("broker_queue_kept_with_old_arguments_total", "queue" => queue.to_owned())
                .increment(1);
            return Ok(Some(i));
        }
    }
    Err(refused)
}

/// The arguments of the archive stream: its type, its retention, and segments small enough for
/// retention by size to act (a stream drops whole segments, never the one being written).
fn archive_arguments(archive: &ArchiveSettings) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("stream"));
    args.insert("x-max-age".into(), long_string(&archive.max_age));
    let max_bytes = i64::try_from(archive.max_bytes).unwrap_or(i64::MAX);
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(max_bytes),
    );
    let segment = (max_bytes / 8).clamp(1 << 20, 500 << 20);
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(segment),
    );
    args
}

/// Declares the archive stream; one that exists with another retention (changed in the
/// settings since) is used as it is, with a warning: a stream's arguments are fixed when it is
/// first declared, and a policy changes them.
async fn declare_archive(
    connection: &Connection,
    stream: &str,
    archive: &ArchiveSettings,
) -> lapin::Result<()> {
    declare_as_it_is(
        connection,
        stream,
        archive_arguments(archive),
        "the archive stream exists with other arguments; using it as it is (change its retention with a policy)",
    )
    .await
}

/// Declares `queue` with `arguments`; one that exists with other arguments is used as it is,
/// with `warning` and `broker_queue_kept_with_old_arguments_total`.
async fn declare_as_it_is(
    connection: &Connection,
    queue: &str,
    arguments: FieldTable,
    warning: &str,
) -> lapin::Result<()> {
    match declare_alone(connection, queue, arguments).await {
        Ok(()) => Ok(()),
        Err(error) if is_precondition_failed(&error) => {
            if inspect_queue(connection, queue).await?.is_none() {
                return Err(error);
            }
            tracing::warn!(queue, %error, "{warning}");
            metrics::counter!("broker_queue_kept_with_old_arguments_total", "queue" => queue.to_owned())
                .increment(1);
            Ok(())
        }
        Err(error) => Err(error),
    }
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

/// How long one node may take to accept a connection (TCP and the AMQP handshake): a frozen
/// node accepts TCP from its kernel's backlog and then says nothing.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to one of the broker's nodes (`broker.urls`, or `broker.url`): each is tried once,
/// from a random one on, so that a fleet of services spreads over a cluster and a dead node
/// costs one failed attempt. The last node's error if none answers.
pub async fn connect(settings: &BrokerSettings, name: &str) -> lapin::Result<Connection> {
    let first = fastrand::usize(0..settings.nodes().len().max(1));
    connect_from(settings, name, first)
        .await
        .map(|(connection, _)| connection)
}

/// Like [`connect`], trying the nodes from the `first`-th on (modulo their number); also returns
/// which node took the connection, so that a service leaving a node that failed it can start
/// with the next one.
pub async fn connect_from(
    settings: &BrokerSettings,
    name: &str,
    first: usize,
) -> lapin::Result<(Connection, usize)> {
    let nodes = settings.nodes();
    let start = first % nodes.len().max(1);
    let mut last_error = None;
    for i in 0..nodes.len() {
        let index = (start + i) % nodes.len();
        let url = nodes[index].expose();
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let error =
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await
            {
                Ok(Ok(connection)) => return Ok((connection, index)),
                Ok(Err(error)) => error,
                Err(_) => lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no AMQP handshake within {CONNECT_TIMEOUT:?}"),
                )),
            };
        if nodes.len() > 1 {
            tracing::warn!(node = node_address(url), %error, "cannot connect to this broker node; trying the next");
        }
        last_error = Some(error);
    }
    Err(last_error.unwrap_or_else(|| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no broker URL configured",
        ))
    }))
}

/// A node's host and port out of its AMQP URL, for logs: never the credentials.
pub fn node_address(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let after_credentials = after_scheme
        .rsplit_once('@')
        .map_or(after_scheme, |(_, rest)| rest);
    after_credentials
        .split(['/', '?'])
        .next()
        .unwrap_or(after_credentials)
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
        assert_eq!(
            t.all_queues(),
            vec![
                "t1.raw",
                "t1.replay",
                "t1.overflow",
                "t1.invalid",
                "t1.raw.dlq"
            ]
        );
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
    fn node_addresses_in_logs_carry_no_credentials() {
        assert_eq!(
            node_address("amqp://user:p@ss@rabbit-1:5672/%2f?heartbeat=10"),
            "rabbit-1:5672"
        );
        assert_eq!(node_address("amqps://rabbit-2"), "rabbit-2");
        assert_eq!(node_address("127.0.0.1:5672"), "127.0.0.1:5672");
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
