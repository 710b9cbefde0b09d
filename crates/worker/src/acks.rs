//! Ack tracking for one consuming channel. Deliveries finish out of order; acking each one
//! alone costs the broker a frame per delivery (about 10k/s here, against 50k/s with
//! `multiple`). The tracker acks the longest settled prefix of delivery tags with one
//! `multiple` ack, so a frame covers every delivery finished since the last one. A delivery
//! to be returned (requeued) is nacked alone at once; it never holds the prefix back.
//!
//! A delivery finished behind an unfinished one still counts towards the channel's prefetch
//! until it is acked. One delivery held long (a probe to a slow sink waits up to its
//! `spill_after_ms`) would otherwise stop the consumer once `prefetch` deliveries finished
//! behind it: the worker would drain one prefetch per hold. So a finished delivery waits for
//! the ones before it at most [`HOLD`], or until more than half the prefetch waits; then it
//! is acked alone. Deliveries that finish a little out of order (two batches of one sink in
//! flight) still go in one `multiple` ack.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Everything it carried is somewhere durable: ack it.
    Done,
    /// Give it back to the queue (it counts towards the delivery limit).
    Requeue,
}

/// What to send the broker now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// `basic.ack` with `multiple`: every delivery up to this tag not settled before.
    AckUpTo(u64),
    /// `basic.ack` of this one delivery, finished behind an unfinished one.
    Ack(u64),
    /// `basic.nack` of this one delivery, requeued.
    Requeue(u64),
}

/// How long a finished delivery waits for the ones before it before it is acked alone.
pub const HOLD: Duration = Duration::from_millis(50);

/// Where a delivery settled out of order stands with the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ahead {
    /// Done since then, not acked yet: the next `multiple` ack covers it.
    Waiting(Instant),
    /// Acked alone, or nacked: nothing more to send for it.
    Sent,
}

/// Delivery tags of one channel start at 1 and grow by one per delivery.
#[derive(Debug)]
pub struct AckTracker {
    /// Every tag below this one is settled (acked or nacked) with the broker.
    next: u64,
    /// Tags settled out of order, before the ones below them.
    ahead: BTreeMap<u64, Ahead>,
    /// How many of `ahead` are `Waiting`.
    waiting: usize,
    /// Beyond this many waiting, each is acked alone.
    hold_at_most: usize,
}

impl AckTracker {
    /// For a channel with this prefetch: at most half of it waits behind an unfinished
    /// delivery (with three quarters, MongoDB drained at 0.77 to 0.81 of its rate alone beside
    /// a slow sink, against 0.90 to 0.94 with half: the window left for its batches shrank).
    pub fn new(prefetch: u16) -> Self {
        Self {
            next: 1,
            ahead: BTreeMap::new(),
            waiting: 0,
            hold_at_most: usize::from(prefetch / 2),
        }
    }

    /// Records one delivery's fate at `now`; returns the frames that become due: a requeue at
    /// once, an ack of the prefix if it grew, and single acks when too many wait behind it.
    pub fn settle(&mut self, tag: u64, settled: Settled, now: Instant) -> Vec<Frame> {
        let mut frames = Vec::new();
        if tag < self.next || self.ahead.contains_key(&tag) {
            return frames; // already settled: never ack or nack twice
        }
        match settled {
            Settled::Requeue => {
                frames.push(Frame::Requeue(tag));
                self.ahead.insert(tag, Ahead::Sent);
            }
            Settled::Done => {
                self.ahead.insert(tag, Ahead::Waiting(now));
                self.waiting += 1;
            }
        }
        let mut last_waiting = None;
        while let Some(ahead) = self.ahead.remove(&self.next) {
            if let Ahead::Waiting(_) = ahead {
                last_waiting = Some(self.next);
                self.waiting -= 1;
            }
            self.next += 1;
        }
        // A `multiple` ack names a tag the broker still holds unacked; those acked alone
        // below it are skipped by the broker.
        if let Some(up_to) = last_waiting {
            frames.push(Frame::AckUpTo(up_to));
        }
        if self.waiting > self.hold_at_most {
            self.ack_alone(|_| true, &mut frames);
        }
        frames
    }

    /// Single acks for the deliveries that have waited [`HOLD`] or longer at `now`.
    pub fn overdue(&mut self, now: Instant) -> Vec<Frame> {
        let mut frames = Vec::new();
        self.ack_alone(
            |since| now.saturating_duration_since(since) >= HOLD,
            &mut frames,
        );
        frames
    }

    fn ack_alone(&mut self, due: impl Fn(Instant) -> bool, frames: &mut Vec<Frame>) {
        for (tag, ahead) in &mut self.ahead {
            if let Ahead::Waiting(since) = *ahead {
                if due(since) {
                    frames.push(Frame::Ack(*tag));
                    *ahead = Ahead::Sent;
                    self.waiting -= 1;
                }
            }
        }
    }

    /// Deliveries done out of order and not acked yet.
    pub fn waiting(&self) -> usize {
        self.waiting
    }
}

/// A consuming channel with its tracker: settles deliveries with as few frames as it can.
pub struct Acks {
    channel: Channel,
    tracker: AckTracker,
}

impl Acks {
    pub fn new(channel: Channel, prefetch: u16) -> Self {
        Self {
            channel,
            tracker: AckTracker::new(prefetch),
        }
    }

    /// Deliveries finished behind an unfinished one, not acked yet.
    pub fn waiting(&self) -> usize {
        self.tracker.waiting()
    }

    /// Acks alone each delivery that has waited [`HOLD`] for the ones before it.
    pub async fn ack_overdue(&mut self) -> lapin::Result<()> {
        let frames = self.tracker.overdue(Instant::now());
        self.send(frames).await
    }

    /// Settles every `(tag, settled)`, then sends one `multiple` ack for the longest settled
    /// prefix (a nack for each requeue and a single ack for each delivery the tracker no
    /// longer holds back, at once).
    pub async fn settle_all(
        &mut self,
        settled: impl IntoIterator<Item = (u64, Settled)>,
    ) -> lapin::Result<()> {
        let now = Instant::now();
        let mut frames = Vec::new();
        for (tag, settled) in settled {
            frames.extend(self.tracker.settle(tag, settled, now));
        }
        self.send(frames).await
    }

    /// Sends `frames`, the `multiple` acks folded into the last one.
    async fn send(&mut self, frames: Vec<Frame>) -> lapin::Result<()> {
        let mut ack_up_to = None;
        for frame in frames {
            match frame {
                Frame::AckUpTo(tag) => ack_up_to = Some(tag),
                Frame::Ack(tag) => {
                    self.channel
                        .basic_ack(tag, BasicAckOptions { multiple: false })
                        .await?;
                }
                Frame::Requeue(tag) => {
                    let requeue = BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    };
                    self.channel.basic_nack(tag, requeue).await?;
                }
            }
        }
        if let Some(tag) = ack_up_to {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settles at one instant, for the tests where time plays no part.
    fn at_once(t: &mut AckTracker, tag: u64, settled: Settled) -> Vec<Frame> {
        t.settle(tag, settled, Instant::now())
    }

    #[test]
    fn in_order_deliveries_are_acked_as_they_finish() {
        let mut t = AckTracker::new(64);
        assert_eq!(at_once(&mut t, 1, Settled::Done), vec![Frame::AckUpTo(1)]);
        assert_eq!(at_once(&mut t, 2, Settled::Done), vec![Frame::AckUpTo(2)]);
    }

    #[test]
    fn out_of_order_deliveries_wait_and_go_in_one_multiple_ack() {
        let mut t = AckTracker::new(64);
        assert_eq!(at_once(&mut t, 3, Settled::Done), vec![]);
        assert_eq!(at_once(&mut t, 2, Settled::Done), vec![]);
        assert_eq!(t.waiting(), 2);
        assert_eq!(at_once(&mut t, 1, Settled::Done), vec![Frame::AckUpTo(3)]);
        assert_eq!(t.waiting(), 0);
    }

    #[test]
    fn a_requeue_goes_at_once_and_never_holds_the_prefix_back() {
        let mut t = AckTracker::new(64);
        assert_eq!(at_once(&mut t, 2, Settled::Done), vec![]);
        assert_eq!(
            at_once(&mut t, 1, Settled::Requeue),
            vec![Frame::Requeue(1), Frame::AckUpTo(2)]
        );
        // A requeue at the end of the prefix acks only what is done before it.
        assert_eq!(
            at_once(&mut t, 3, Settled::Requeue),
            vec![Frame::Requeue(3)]
        );
        assert_eq!(at_once(&mut t, 4, Settled::Done), vec![Frame::AckUpTo(4)]);
    }

    #[test]
    fn past_half_the_prefetch_waiting_behind_the_prefix_each_is_acked_alone() {
        let mut t = AckTracker::new(6);
        for tag in 2..=4 {
            assert_eq!(at_once(&mut t, tag, Settled::Done), vec![]);
        }
        assert_eq!(t.waiting(), 3);
        // A fourth is more than half the prefetch (6) held by delivery 1: 2 to 5 go alone.
        assert_eq!(
            at_once(&mut t, 5, Settled::Done),
            vec![Frame::Ack(2), Frame::Ack(3), Frame::Ack(4), Frame::Ack(5)]
        );
        assert_eq!(t.waiting(), 0);
        assert_eq!(at_once(&mut t, 7, Settled::Done), vec![]);
        // Delivery 1 finishes: the multiple ack names 7, the highest not acked yet (2 to 5
        // are, 6 was nacked); the broker skips those acked alone.
        assert_eq!(
            at_once(&mut t, 6, Settled::Requeue),
            vec![Frame::Requeue(6)]
        );
        assert_eq!(at_once(&mut t, 1, Settled::Done), vec![Frame::AckUpTo(7)]);
        assert_eq!(at_once(&mut t, 8, Settled::Done), vec![Frame::AckUpTo(8)]);
    }

    #[test]
    fn a_delivery_waiting_past_the_hold_is_acked_alone_and_a_fresh_one_waits_on() {
        let mut t = AckTracker::new(64);
        let start = Instant::now();
        assert_eq!(t.settle(2, Settled::Done, start), vec![]);
        assert_eq!(t.settle(3, Settled::Done, start + HOLD / 2), vec![]);
        assert_eq!(t.overdue(start + HOLD / 2), vec![]);
        assert_eq!(t.overdue(start + HOLD), vec![Frame::Ack(2)]);
        assert_eq!(t.waiting(), 1);
        assert_eq!(t.overdue(start + HOLD), vec![], "acked once only");
        // Delivery 1 finishes: the multiple ack covers 3; 2 was acked already.
        assert_eq!(
            t.settle(1, Settled::Done, start + HOLD),
            vec![Frame::AckUpTo(3)]
        );
    }

    #[test]
    fn a_prefix_of_deliveries_acked_alone_sends_no_multiple_ack() {
        let mut t = AckTracker::new(2);
        assert_eq!(at_once(&mut t, 2, Settled::Done), vec![]);
        assert_eq!(
            at_once(&mut t, 3, Settled::Done),
            vec![Frame::Ack(2), Frame::Ack(3)]
        );
        // 1 was requeued: nothing below 4 is left unacked, so no multiple ack is due.
        assert_eq!(
            at_once(&mut t, 1, Settled::Requeue),
            vec![Frame::Requeue(1)]
        );
        assert_eq!(at_once(&mut t, 4, Settled::Done), vec![Frame::AckUpTo(4)]);
    }

    #[test]
    fn a_tag_settled_twice_sends_nothing_the_second_time() {
        let mut t = AckTracker::new(64);
        assert_eq!(at_once(&mut t, 1, Settled::Done), vec![Frame::AckUpTo(1)]);
        assert_eq!(at_once(&mut t, 1, Settled::Requeue), vec![]);
        assert_eq!(at_once(&mut t, 3, Settled::Done), vec![]);
        assert_eq!(at_once(&mut t, 3, Settled::Done), vec![]);
    }
}
