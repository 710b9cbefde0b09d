//! A confirm channel that many tasks publish on, and that replaces itself when the broker
//! nacks on it.
//!
//! Why a nack renews the channel: a RabbitMQ channel keeps, per quorum queue, a client state
//! made on its first publish to that queue, and that first publish asks the node the queue's
//! metadata names as leader. In RabbitMQ 3.10 (read from `rabbit_fifo_client`), when that node
//! is down the ask fails, the publish is nacked, and the state stays as it was: every later
//! publish on the channel to that queue asks the dead node again and is nacked, for as long as
//! the node is down, while the queue has a new leader on the nodes still up. A channel opened
//! after the metadata names the new leader publishes normally. So a nack is answered by
//! publishing once more on a fresh channel; a nack there too is the broker's answer (a queue
//! at its `reject-publish` cap, a queue without a majority). The old channel is closed once
//! its publishes in flight have had time to be answered.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

/// A channel is renewed at most this often: a queue at its cap nacks every publish, and each
/// nack must not open a channel.
const RENEW_EVERY: Duration = Duration::from_millis(500);
/// How long a replaced channel stays open for the confirms of publishes already sent on it.
const REPLACED_GRACE: Duration = Duration::from_secs(60);
/// Opening a channel on a node that stopped answering must not hold up a publish.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A channel in confirm mode: every publish on it gets an ack or a nack from the broker.
pub async fn confirm_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// How the broker answered a mandatory publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Taken: persisted in a queue.
    Confirmed,
    /// Unroutable: the queue (or every queue bound to the exchange) does not exist.
    Returned,
    /// Refused, e.g. by a queue at its `reject-publish` cap.
    Nacked,
}

/// The channel publishes go to now; `generation` counts the renewals.
struct Current {
    channel: Channel,
    generation: u64,
    opened: Instant,
}

/// A confirm channel that many tasks publish on. lapin numbers a publish and queues its frames
/// under two different locks, so two concurrent publishes can reach the broker in the other
/// order and each get the other's confirm; harmless while all are acks, wrong when one is a
/// nack or a return. The send is therefore serialised (the confirms are still awaited
/// concurrently, so throughput is unchanged).
#[derive(Clone)]
pub struct Publisher {
    connection: Arc<Connection>,
    current: Arc<RwLock<Arc<Current>>>,
    send: Arc<tokio::sync::Mutex<()>>,
    renewing: Arc<tokio::sync::Mutex<()>>,
}

impl Publisher {
    pub async fn open(connection: Arc<Connection>) -> lapin::Result<Self> {
        let channel = confirm_channel(&connection).await?;
        Ok(Self {
            connection,
            current: Arc::new(RwLock::new(Arc::new(Current {
                channel,
                generation: 0,
                opened: Instant::now(),
            }))),
            send: Arc::new(tokio::sync::Mutex::new(())),
            renewing: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    fn current(&self) -> Arc<Current> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the channel publishes go to is open.
    pub fn connected(&self) -> bool {
        self.current().channel.status().connected()
    }

    /// How many times the channel has been replaced after a nack.
    pub fn renewals(&self) -> u64 {
        self.current().generation
    }

    /// Publishes and waits for the broker's answer. A nack is answered by publishing once more
    /// on a fresh channel (see the module's notes); the answer to that is returned.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<Confirmation> {
        self.confirmed(exchange, routing_key, options, body, properties, None)
            .await
    }

    /// Publishes `mandatory` and waits for the broker's answer however long it takes. A publish
    /// is never abandoned for a late confirm: its frames stay queued in lapin until the broker
    /// takes them (during a memory alarm it takes none), so publishing the same body again
    /// would send it twice and grow memory with every round. After `patience` without an
    /// answer, this logs once and counts `broker_confirm_waits_total`, then goes on waiting;
    /// a lost connection ends the wait with an error. A nack is answered as by
    /// [`Publisher::publish`].
    pub async fn publish_and_wait(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        patience: Duration,
    ) -> lapin::Result<Answer> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirmation = self
            .confirmed(
                exchange,
                routing_key,
                options,
                body,
                properties,
                Some(patience),
            )
            .await?;
        Ok(match confirmation {
            Confirmation::Ack(None) => Answer::Confirmed,
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Answer::Returned,
            Confirmation::Nack(None) | Confirmation::NotRequested => Answer::Nacked,
        })
    }

    /// Sends and waits for the confirm (logging once past `patience`, if given); after a nack,
    /// sends once more on a fresh channel.
    async fn confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
        patience: Option<Duration>,
    ) -> lapin::Result<Confirmation> {
        let mut sent_again = false;
        loop {
            let (generation, confirm) = self
                .send(exchange, routing_key, options, body, properties.clone())
                .await?;
            let confirmation = match patience {
                Some(patience) => patiently(confirm, exchange, routing_key, patience).await?,
                None => confirm.await?,
            };
            let nacked = matches!(confirmation, Confirmation::Nack(None));
            if !nacked || sent_again || !self.renew(generation).await {
                return Ok(confirmation);
            }
            sent_again = true;
        }
    }

    /// Hands the publish to lapin in order with the others; the returned confirm is its answer,
    /// with the generation of the channel it went on.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> lapin::Result<(u64, lapin::PublisherConfirm)> {
        let _in_order = self.send.lock().await;
        let current = self.current();
        let confirm = current
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                body,
                properties,
            )
            .await?;
        Ok((current.generation, confirm))
    }

    /// After a nack on the channel of `generation`: replaces it with a fresh channel, unless
    /// another publish already did, or it was opened less than [`RENEW_EVERY`] ago. Whether
    /// publishes now go to a newer channel than the nacking one.
    async fn renew(&self, generation: u64) -> bool {
        let _one_at_a_time = self.renewing.lock().await;
        let current = self.current();
        if current.generation != generation {
            return true;
        }
        if current.opened.elapsed() < RENEW_EVERY {
            return false;
        }
        let opened = tokio::time::timeout(OPEN_TIMEOUT, confirm_channel(&self.connection)).await;
        let channel = match opened {
            Ok(Ok(channel)) => channel,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot open a channel to publish again after a nack");
                return false;
            }
            Err(_) => {
                tracing::warn!(timeout = ?OPEN_TIMEOUT, "opening a channel to publish again after a nack timed out");
                return false;
            }
        };
        let renewed = Arc::new(Current {
            channel,
            generation: generation + 1,
            opened: Instant::now(),
        });
        match self.current.write() {
            Ok(mut slot) => *slot = renewed,
            Err(poisoned) => *poisoned.into_inner() = renewed,
        }
        metrics::counter!("broker_channels_renewed_total").increment(1);
        tracing::info!(
            renewals = generation + 1,
            "the broker nacked a publish; publishing on a new channel (a channel's queue client can name a node that is gone)"
        );
        // Closed once the publishes sent on it have had time to be answered.
        let replaced = current.channel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(REPLACED_GRACE).await;
            if replaced.status().connected() {
                let _ = replaced.close(200, "replaced after a nack".into()).await;
            }
        });
        true
    }
}

/// Waits for a confirm; past `patience`, logs once and counts, then waits on.
async fn patiently(
    confirm: lapin::PublisherConfirm,
    exchange: &str,
    routing_key: &str,
    patience: Duration,
) -> lapin::Result<Confirmation> {
    let mut confirm = std::pin::pin!(confirm);
    match tokio::time::timeout(patience, &mut confirm).await {
        Ok(answer) => answer,
        Err(_) => {
            metrics::counter!("broker_confirm_waits_total").increment(1);
            tracing::warn!(
                exchange,
                routing_key,
                ?patience,
                "no confirm from the broker yet (a resource alarm?); waiting, not publishing again"
            );
            confirm.await
        }
    }
}
