//! Per-source quotas in events per second (`policy`): the volume a source, or one user of it,
//! may send to the live lane. A request past its source's quota or one of its users' goes to
//! the overflow lane (`<prefix>.overflow`) instead of being refused: it is kept, and workers
//! drain it behind the raw queue, so one flooding app version or user slows only itself. Past
//! the hard ceiling (`max_events_per_second`) the answer is 429 with Retry-After.
//!
//! Each collector counts on its own: with N collectors behind a balancer a source gets about N
//! times the quota. Users are kept by a keyed hash of their id (8 bytes each, whatever the id's
//! length), at most [`MAX_USERS_PER_SOURCE`] per source; a user whose bucket has refilled is
//! forgotten when room is needed, and a user met while the table is full of active ones is not
//! counted (`collector_quota_users_untracked_total`): the source's own quota still holds.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ingest_pipeline::settings::PolicySettings;

/// Users tracked at once per source.
pub const MAX_USERS_PER_SOURCE: usize = 100_000;
/// How often a full user table looks for users it can forget.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Live,
    /// Over its source's quota or a user's: to the overflow lane.
    Overflow(OverflowReason),
    /// Over the hard ceiling: 429, retry after this long.
    Refuse(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverflowReason {
    Source,
    User,
}

impl OverflowReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::User => "user",
        }
    }
}

/// A token bucket of events: `rate` per second, `capacity` at most. It may go into debt by a
/// request larger than what is left, so a batch larger than the capacity passes when the
/// bucket is full rather than never.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    per_second: f64,
    capacity: f64,
}

impl Rate {
    fn new(per_second: f64, burst_seconds: f64) -> Option<Self> {
        (per_second > 0.0).then(|| Self {
            per_second,
            capacity: (per_second * burst_seconds).max(1.0),
        })
    }

    fn full(&self, now: Instant) -> Bucket {
        Bucket {
            tokens: self.capacity,
            updated: now,
        }
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.capacity);
        bucket.updated = now;
    }

    /// Whether `events` may be taken now (the bucket refilled first).
    fn fits(&self, bucket: &mut Bucket, events: f64, now: Instant) -> bool {
        self.refill(bucket, now);
        bucket.tokens >= events.min(self.capacity)
    }

    /// How long until `events` fit.
    fn wait(&self, bucket: &Bucket, events: f64) -> Duration {
        let short = events.min(self.capacity) - bucket.tokens;
        Duration::try_from_secs_f64((short / self.per_second).max(0.0)).unwrap_or(Duration::MAX)
    }

    fn is_full_by(&self, bucket: &Bucket, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens + elapsed * self.per_second >= self.capacity
    }
}

struct SourceQuota {
    ceiling: Option<(Rate, Mutex<Bucket>)>,
    source: Option<(Rate, Mutex<Bucket>)>,
    users: Option<(Rate, Mutex<Users>)>,
}

struct Users {
    buckets: HashMap<u64, Bucket>,
    swept: Instant,
}

pub struct Quotas {
    sources: HashMap<String, SourceQuota>,
    /// Whether any source has per-user quotas: asked of every request whose key is in its body.
    any_users: bool,
}

/// A user id's key in the tables: a hash keyed at random per process, so ids cannot be chosen
/// to collide.
pub fn user_key(id: &str) -> u64 {
    static KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    KEY.get_or_init(Default::default).hash_one(id)
}

impl Quotas {
    /// Sources are known up front (one per write key), so the map never grows with input.
    pub fn new<'a>(sources: impl IntoIterator<Item = &'a String>, policy: &PolicySettings) -> Self {
        let now = Instant::now();
        let bucket = |rate: Option<Rate>| rate.map(|r| (r, Mutex::new(r.full(now))));
        let sources: HashMap<String, SourceQuota> = sources
            .into_iter()
            .map(|name| {
                let p = policy.for_source(name);
                let quota = SourceQuota {
                    ceiling: bucket(Rate::new(p.max_events_per_second, p.burst_seconds)),
                    source: bucket(Rate::new(p.events_per_second, p.burst_seconds)),
                    users: Rate::new(p.user_events_per_second, p.burst_seconds).map(|r| {
                        let users = Users {
                            buckets: HashMap::new(),
                            swept: now,
                        };
                        (r, Mutex::new(users))
                    }),
                };
                (name.clone(), quota)
            })
            .collect();
        let any_users = sources.values().any(|q| q.users.is_some());
        Self { sources, any_users }
    }

    /// Whether `source` has per-user quotas (the body's user ids are read only then).
    pub fn counts_users(&self, source: &str) -> bool {
        self.sources.get(source).is_some_and(|q| q.users.is_some())
    }

    /// Whether any source has per-user quotas.
    pub fn counts_any_users(&self) -> bool {
        self.any_users
    }

    /// Where a request of `events` events goes, with `users` its users (key, events) when the
    /// source counts them. A request past the ceiling takes nothing; one sent to the overflow
    /// lane counts against the ceiling only (neither its source's quota nor its users').
    pub fn check(
        &self,
        source: &str,
        events: usize,
        users: &[(u64, usize)],
        now: Instant,
    ) -> Verdict {
        let Some(quota) = self.sources.get(source) else {
            return Verdict::Live;
        };
        let events = events as f64;
        if let Some((rate, bucket)) = &quota.ceiling {
            let Ok(mut bucket) = bucket.lock() else {
                return Verdict::Live;
            };
            if !rate.fits(&mut bucket, events, now) {
                return Verdict::Refuse(rate.wait(&bucket, events));
            }
            bucket.tokens -= events;
        }
        // The source's bucket is held while the users are looked at, so that a request that
        // overflows for the source spends no user's quota, and one that overflows for a user
        // spends none of the source's.
        let mut source = match &quota.source {
            Some((rate, bucket)) => match bucket.lock() {
                Ok(mut bucket) => {
                    if !rate.fits(&mut bucket, events, now) {
                        return Verdict::Overflow(OverflowReason::Source);
                    }
                    Some(bucket)
                }
                Err(_) => None,
            },
            None => None,
        };
        if let Some((rate, table)) = &quota.users {
            if let Ok(mut table) = table.lock() {
                if !take_users(rate, &mut table, users, now) {
                    return Verdict::Overflow(OverflowReason::User);
                }
            }
        }
        if let Some(bucket) = &mut source {
            bucket.tokens -= events;
        }
        Verdict::Live
    }
}

/// Takes each user's events if every one of them fits; `false` (taking nothing) otherwise.
fn take_users(rate: &Rate, table: &mut Users, users: &[(u64, usize)], now: Instant) -> bool {
    for (key, events) in users {
        if let Some(bucket) = table.buckets.get_mut(key) {
            if !rate.fits(bucket, *events as f64, now) {
                return false;
            }
        }
    }
    for (key, events) in users {
        if !table.buckets.contains_key(key) && !make_room(rate, table, now) {
            metrics::counter!("collector_quota_users_untracked_total").increment(1);
            continue;
        }
        let bucket = table.buckets.entry(*key).or_insert_with(|| rate.full(now));
        bucket.tokens -= *events as f64;
    }
    true
}

/// Whether a new user can be tracked: the table has room, or users whose buckets have refilled
/// are forgotten to make some (at most once per [`SWEEP_EVERY`]).
fn make_room(rate: &Rate, table: &mut Users, now: Instant) -> bool {
    if table.buckets.len() < MAX_USERS_PER_SOURCE {
        return true;
    }
    if now.saturating_duration_since(table.swept) < SWEEP_EVERY {
        return false;
    }
    table.swept = now;
    table
        .buckets
        .retain(|_, bucket| !rate.is_full_by(bucket, now));
    table.buckets.len() < MAX_USERS_PER_SOURCE
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ingest_pipeline::settings::{SourcePolicy, SourcePolicyChanges};

    use super::*;

    fn quotas(changes: SourcePolicyChanges) -> Quotas {
        let policy = PolicySettings {
            default: SourcePolicy::keep_all(),
            sources: BTreeMap::from([("app".to_owned(), changes)]),
        };
        Quotas::new([&"app".to_owned(), &"other".to_owned()], &policy)
    }

    #[test]
    fn a_flooding_user_overflows_while_another_user_of_the_source_stays_live() {
        let quotas = quotas(SourcePolicyChanges {
            user_events_per_second: Some(10.0),
            burst_seconds: Some(1.0),
            ..Default::default()
        });
        let now = Instant::now();
        let (flood, calm) = (user_key("flood"), user_key("calm"));
        let sent: Vec<Verdict> = (0..5)
            .map(|_| quotas.check("app", 4, &[(flood, 4)], now))
            .collect();
        // 10 a second with a burst of 1 s: two requests of 4, then the third is over.
        assert_eq!(&sent[..2], &[Verdict::Live; 2]);
        assert_eq!(&sent[2..], &[Verdict::Overflow(OverflowReason::User); 3]);
        assert_eq!(quotas.check("app", 1, &[(calm, 1)], now), Verdict::Live);
        // A batch of both is over for one of them (the flood has 2 events left): it overflows
        // whole.
        assert_eq!(
            quotas.check("app", 4, &[(calm, 1), (flood, 3)], now),
            Verdict::Overflow(OverflowReason::User)
        );
        // A second later the flood's bucket has refilled.
        assert_eq!(
            quotas.check("app", 4, &[(flood, 4)], now + Duration::from_secs(1)),
            Verdict::Live
        );
        assert_eq!(quotas.check("other", 1000, &[], now), Verdict::Live);
    }

    #[test]
    fn the_source_quota_overflows_and_the_ceiling_refuses_with_the_wait() {
        let quotas = quotas(SourcePolicyChanges {
            events_per_second: Some(100.0),
            max_events_per_second: Some(200.0),
            burst_seconds: Some(1.0),
            ..Default::default()
        });
        let now = Instant::now();
        assert_eq!(quotas.check("app", 100, &[], now), Verdict::Live);
        assert_eq!(
            quotas.check("app", 50, &[], now),
            Verdict::Overflow(OverflowReason::Source)
        );
        assert_eq!(
            quotas.check("app", 50, &[], now),
            Verdict::Overflow(OverflowReason::Source)
        );
        // 200 taken from the ceiling: 100 more are 0.5 s away.
        match quotas.check("app", 100, &[], now) {
            Verdict::Refuse(wait) => assert_eq!(wait, Duration::from_millis(500)),
            other => panic!("expected a refusal, got {other:?}"),
        }
        // A batch larger than a bucket passes when it is full.
        let big = quotas.check("app", 1000, &[], now + Duration::from_secs(5));
        assert_eq!(big, Verdict::Live);
    }

    #[test]
    fn the_user_table_is_bounded_and_forgets_users_whose_buckets_refilled() {
        let quotas = quotas(SourcePolicyChanges {
            user_events_per_second: Some(1.0),
            burst_seconds: Some(1.0),
            ..Default::default()
        });
        let now = Instant::now();
        for i in 0..MAX_USERS_PER_SOURCE + 50 {
            assert_eq!(
                quotas.check("app", 1, &[(user_key(&i.to_string()), 1)], now),
                Verdict::Live
            );
        }
        let tracked = |q: &Quotas| {
            let (_, users) = q.sources["app"].users.as_ref().expect("users");
            users.lock().expect("lock").buckets.len()
        };
        assert_eq!(tracked(&quotas), MAX_USERS_PER_SOURCE);
        let later = now + Duration::from_secs(2);
        assert_eq!(
            quotas.check("app", 1, &[(user_key("new"), 1)], later),
            Verdict::Live
        );
        assert_eq!(tracked(&quotas), 1, "the refilled users were forgotten");
    }
}

#[cfg(test)]
mod order_tests {
    use std::collections::BTreeMap;

    use ingest_pipeline::settings::{SourcePolicy, SourcePolicyChanges};

    use super::*;

    #[test]
    fn a_request_over_the_source_quota_spends_none_of_its_users_quota() {
        let policy = PolicySettings {
            default: SourcePolicy::keep_all(),
            sources: BTreeMap::from([(
                "app".to_owned(),
                SourcePolicyChanges {
                    events_per_second: Some(10.0),
                    user_events_per_second: Some(10.0),
                    burst_seconds: Some(1.0),
                    ..Default::default()
                },
            )]),
        };
        let quotas = Quotas::new([&"app".to_owned()], &policy);
        let now = Instant::now();
        let (a, b) = (user_key("a"), user_key("b"));
        assert_eq!(quotas.check("app", 10, &[(a, 10)], now), Verdict::Live);
        // The source is spent: b's request overflows for the source, and b keeps its quota.
        assert_eq!(
            quotas.check("app", 5, &[(b, 5)], now),
            Verdict::Overflow(OverflowReason::Source)
        );
        let later = now + Duration::from_secs(1);
        assert_eq!(quotas.check("app", 10, &[(b, 10)], later), Verdict::Live);
    }
}
