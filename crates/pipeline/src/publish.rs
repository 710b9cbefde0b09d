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

/// Why the broker did not take a publish.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Refused, e.g. by a queue at its `reject-publish` cap or without a majority.
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// Unroutable: the queue (or every queue bound to the exchange) does not exist.
    #[error("the message could not be routed (its queue is missing)")]
    Returned,
    /// No answer within the caller's time (the message may still be taken later).
    #[error("no confirm from the broker within {0:?}")]
    TimedOut(Duration),
    /// The channel or its connection failed before the broker answered.
    #[error("the channel to the broker was lost: {0}")]
    Lost(#[from] lapin::Error),
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

    /// Publishes `mandatory` and waits for the broker's answer however long it takes. A publish
    /// is never abandoned for a late confirm: its frames stay queued in lapin until the broker
    /// takes them (during a memory alarm it takes none), so publishing the same body again
    /// would send it twice and grow memory with every round. After `patience` without an
    /// answer, this logs once and counts `broker_confirm_waits_total`, then goes on waiting;
    /// a lost connection ends the wait with an error. A nack is answered by publishing once
    /// more on a fresh channel (see the module's notes); the answer to that is returned.
    pub async fn publish_and_wait(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        patience: Duration,
    ) -> Result<(), PublishError> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirmation = self
            .confirmed(exchange, routing_key, options, body, properties, patience)
            .await?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(PublishError::Returned),
            Confirmation::Nack(None) | Confirmation::NotRequested => Err(PublishError::Nacked),
        }
    }

    /// Sends and waits for the confirm (logging once past `patience`); after a nack,
    /// sends once more on a fresh channel.
    async fn confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: &BasicProperties,
        patience: Duration,
    ) -> lapin::Result<Confirmation> {
        let mut sent_again = false;
        loop {
            let (generation, confirm) = self
                .send(exchange, routing_key, options, body, properties.clone())
                .await?;
            let confirmation = patiently(confirm, exchange, routing_key, patience).await?;
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

/// Waits for a confirm; past `patience` (unless it is `Duration::MAX`), logs once and counts,
/// then waits on.
async fn patiently(
    confirm: lapin::PublisherConfirm,
    exchange: &str,
    routing_key: &str,
    patience: Duration,
) -> lapin::Result<Confirmation> {
    if patience == Duration::MAX {
        return confirm.await;
    }
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

/// How long to wait for the broker's confirm of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmWait {
    /// However long it takes, logging once past this long: a publish is never sent twice for a
    /// late confirm (see [`Publisher::publish_and_wait`]).
    Patient(Duration),
    /// Give up after this long, tries and pauses included: for a caller that must answer its
    /// own client in time and keeps the message elsewhere if the broker was too slow.
    GiveUpAfter(Duration),
}

/// How [`until_taken`] tries: how many refusals of each kind it rides out, the pause between
/// tries, and how long it waits for a confirm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Publishes the broker may nack before the nack is the answer (each is already sent again
    /// once on a fresh channel by the [`Publisher`]).
    pub nacks: u32,
    /// Publishes that may come back unroutable before that is the answer; the caller's
    /// [`Confirmed::returned`] (declaring the queues again) runs before each next try.
    pub returns: u32,
    /// The pause before the first try again, doubled each time up to `pause_max`.
    pub pause: Duration,
    pub pause_max: Duration,
    pub confirm: ConfirmWait,
}

impl Policy {
    /// One try, answered within `timeout`: the collector, which spools what the broker does
    /// not take in time and must answer its client meanwhile.
    pub fn answer_within(timeout: Duration) -> Self {
        Self {
            nacks: 1,
            returns: 1,
            pause: Duration::ZERO,
            pause_max: Duration::ZERO,
            confirm: ConfirmWait::GiveUpAfter(timeout),
        }
    }

    /// The worker and `ingestctl`, which hold a delivery until the broker takes what it
    /// publishes: nacks are ridden out for about 3 s (a quorum queue's leader election),
    /// unroutable returns ten times with the queues declared again, and a late confirm is
    /// waited for (logged after `patience`).
    pub fn patient(patience: Duration) -> Self {
        Self {
            nacks: 5,
            returns: 10,
            pause: Duration::from_millis(200),
            pause_max: Duration::from_millis(1600),
            confirm: ConfirmWait::Patient(patience),
        }
    }

    /// The same, with `nacks` refusals ridden out.
    pub fn with_nacks(self, nacks: u32) -> Self {
        Self {
            nacks: nacks.max(1),
            ..self
        }
    }
}

/// One confirmed publish, which [`until_taken`] drives: the [`Publisher`], or a stand-in in a
/// unit test. The hooks are the caller's answer to a refusal, before the next try.
#[async_trait::async_trait]
pub trait Confirmed: Send + Sync {
    /// Publishes `mandatory` and waits for the broker's answer (see [`ConfirmWait::Patient`]).
    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        patience: Duration,
    ) -> Result<(), PublishError>;

    /// The publish came back unroutable: e.g. count it and declare the queues again.
    async fn returned(&self, _routing_key: &str) {}

    /// The broker nacked the publish: e.g. count it.
    fn nacked(&self, _routing_key: &str) {}
}

#[async_trait::async_trait]
impl Confirmed for Publisher {
    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: &BasicProperties,
        patience: Duration,
    ) -> Result<(), PublishError> {
        self.publish_and_wait(exchange, routing_key, body, properties, patience)
            .await
    }
}

/// Publishes until the broker takes the message, as `policy` says: `Ok` once it is confirmed,
/// else the last refusal (`Nacked`, `Returned`), `TimedOut` (only with
/// [`ConfirmWait::GiveUpAfter`]) or `Lost` at once (a lost channel is not tried again here: its
/// publishes in flight may still be taken, and the caller's connection is gone).
pub async fn until_taken(
    via: &dyn Confirmed,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    policy: &Policy,
) -> Result<(), PublishError> {
    let tries = tries(via, exchange, routing_key, body, properties, policy);
    match policy.confirm {
        ConfirmWait::Patient(_) => tries.await,
        ConfirmWait::GiveUpAfter(limit) => tokio::time::timeout(limit, tries)
            .await
            .unwrap_or(Err(PublishError::TimedOut(limit))),
    }
}

async fn tries(
    via: &dyn Confirmed,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    policy: &Policy,
) -> Result<(), PublishError> {
    // Giving up is the caller's timeout around all of this: no second timer per publish.
    let patience = match policy.confirm {
        ConfirmWait::Patient(patience) => patience,
        ConfirmWait::GiveUpAfter(_) => Duration::MAX,
    };
    let mut pause = crate::Backoff::new(policy.pause, policy.pause_max);
    let (mut nacked, mut returned) = (0, 0);
    loop {
        let answer = via
            .publish_once(exchange, routing_key, body, &properties, patience)
            .await;
        match answer {
            Err(PublishError::Returned) => {
                returned += 1;
                if returned >= policy.returns {
                    return Err(PublishError::Returned);
                }
                via.returned(routing_key).await;
            }
            Err(PublishError::Nacked) => {
                via.nacked(routing_key);
                nacked += 1;
                if nacked >= policy.nacks {
                    return Err(PublishError::Nacked);
                }
            }
            done => return done,
        }
        tokio::time::sleep(pause.next_delay()).await;
    }
}

#[cfg(test)]
#[path = "publish/tests.rs"]
mod tests;
