//! The "until taken" loop against a scripted stand-in for the broker.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use super::*;

/// Answers each publish with the next scripted answer (`None`: never answers); after the
/// script, confirms. Counts tries and the hooks' calls.
#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<Option<Result<(), PublishError>>>>,
    tries: AtomicU32,
    returned: AtomicU32,
    nacked: AtomicU32,
}

impl Script {
    fn new(answers: impl IntoIterator<Item = Option<Result<(), PublishError>>>) -> Self {
        Self {
            answers: Mutex::new(answers.into_iter().collect()),
            ..Self::default()
        }
    }

    fn counts(&self) -> (u32, u32, u32) {
        (
            self.tries.load(Ordering::Relaxed),
            self.nacked.load(Ordering::Relaxed),
            self.returned.load(Ordering::Relaxed),
        )
    }
}

#[async_trait::async_trait]
impl Confirmed for Script {
    async fn publish_once(
        &self,
        _: &str,
        _: &str,
        _: &[u8],
        _: &BasicProperties,
        _: Duration,
    ) -> Result<(), PublishError> {
        self.tries.fetch_add(1, Ordering::Relaxed);
        let next = self
            .answers
            .lock()
            .map(|mut a| a.pop_front())
            .ok()
            .flatten();
        match next {
            None => Ok(()),
            Some(Some(answer)) => answer,
            Some(None) => std::future::pending().await,
        }
    }

    async fn returned(&self, _: &str) {
        self.returned.fetch_add(1, Ordering::Relaxed);
    }

    fn nacked(&self, _: &str) {
        self.nacked.fetch_add(1, Ordering::Relaxed);
    }
}

async fn publish(script: &Script, policy: Policy) -> Result<(), PublishError> {
    until_taken(script, "", "q", b"{}", BasicProperties::default(), &policy).await
}

fn nack() -> Option<Result<(), PublishError>> {
    Some(Err(PublishError::Nacked))
}

fn unroutable() -> Option<Result<(), PublishError>> {
    Some(Err(PublishError::Returned))
}

#[tokio::test(start_paused = true)]
async fn nacks_below_the_policy_are_ridden_out() {
    let script = Script::new([nack(), nack(), nack(), nack()]);
    let answer = publish(&script, Policy::patient(Duration::from_secs(10))).await;
    assert!(answer.is_ok(), "{answer:?}");
    assert_eq!(script.counts(), (5, 4, 0));
}

#[tokio::test(start_paused = true)]
async fn the_policy_s_last_nack_is_the_answer() {
    let script = Script::new(std::iter::repeat_with(nack).take(20));
    let answer = publish(&script, Policy::patient(Duration::from_secs(10))).await;
    assert!(matches!(answer, Err(PublishError::Nacked)), "{answer:?}");
    assert_eq!(script.counts(), (5, 5, 0));

    let script = Script::new(std::iter::repeat_with(nack).take(20));
    let answer = publish(
        &script,
        Policy::patient(Duration::from_secs(10)).with_nacks(1),
    )
    .await;
    assert!(matches!(answer, Err(PublishError::Nacked)), "{answer:?}");
    assert_eq!(script.counts(), (1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn an_unroutable_publish_asks_for_the_queues_again_before_each_next_try() {
    let script = Script::new([unroutable(), unroutable()]);
    let answer = publish(&script, Policy::patient(Duration::from_secs(10))).await;
    assert!(answer.is_ok(), "{answer:?}");
    assert_eq!(script.counts(), (3, 0, 2));

    let script = Script::new(std::iter::repeat_with(unroutable).take(20));
    let answer = publish(&script, Policy::patient(Duration::from_secs(10))).await;
    assert!(matches!(answer, Err(PublishError::Returned)), "{answer:?}");
    assert_eq!(script.counts(), (10, 0, 9));
}

#[tokio::test(start_paused = true)]
async fn a_lost_channel_is_the_answer_at_once() {
    let lost = Some(Err(PublishError::Lost(lapin::Error::from(
        lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "closed"),
    ))));
    let script = Script::new([lost]);
    let answer = publish(&script, Policy::patient(Duration::from_secs(10))).await;
    assert!(matches!(answer, Err(PublishError::Lost(_))), "{answer:?}");
    assert_eq!(script.counts(), (1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn answer_within_gives_up_on_a_silent_broker_and_tries_once() {
    let script = Script::new([None]);
    let limit = Duration::from_secs(5);
    let started = tokio::time::Instant::now();
    let answer = publish(&script, Policy::answer_within(limit)).await;
    assert!(
        matches!(answer, Err(PublishError::TimedOut(l)) if l == limit),
        "{answer:?}"
    );
    assert_eq!(started.elapsed(), limit);
    assert_eq!(script.counts(), (1, 0, 0));

    let script = Script::new([nack()]);
    let answer = publish(&script, Policy::answer_within(limit)).await;
    assert!(matches!(answer, Err(PublishError::Nacked)), "{answer:?}");
    assert_eq!(script.counts(), (1, 1, 0));
}
