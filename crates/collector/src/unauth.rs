//! Work spent on requests that proved no key, per client address. A body whose key can only be
//! read from the body is inflated and scanned before the key is known; when that key turns out
//! missing or unknown (or the body unusable), the bytes inflated and scanned become the
//! address's debt, which drains at `unauthenticated_bytes_per_second`. While an address owes
//! more than `unauthenticated_burst_bytes`, its requests without a key in the header or query
//! get 429 before their body is read: a stream of bogus beacons costs a bounded share of CPU
//! per address, never the runtime's time that other clients need.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Addresses with a debt that are tracked one by one; past it, new ones share one debt.
const MAX_CLIENTS: usize = 65_536;
/// Where the debts of addresses past [`MAX_CLIENTS`] go.
const SHARED: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

struct Debt {
    bytes: f64,
    updated: Instant,
}

pub struct UnauthenticatedWork {
    per_second: f64,
    burst: f64,
    debts: Mutex<HashMap<IpAddr, Debt>>,
}

impl UnauthenticatedWork {
    /// `per_second` = 0: no bound.
    pub fn new(per_second: u64, burst: u64) -> Self {
        Self {
            per_second: per_second as f64,
            burst: burst as f64,
            debts: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` while `client` owes more than the burst: the time until it does not.
    pub fn check(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut debts = self.debts.lock().unwrap_or_else(PoisonError::into_inner);
        let key = if debts.contains_key(&client) {
            client
        } else {
            SHARED
        };
        let Some(debt) = debts.get_mut(&key) else {
            return Ok(());
        };
        let owed = self.drained(debt, now);
        if owed <= self.burst {
            return Ok(());
        }
        let wait = (owed - self.burst) / self.per_second;
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
    }

    /// `client` spent `bytes` of work without proving a key.
    pub fn charge(&self, client: IpAddr, bytes: usize, now: Instant) {
        if self.per_second <= 0.0 || bytes == 0 {
            return;
        }
        let mut debts = self.debts.lock().unwrap_or_else(PoisonError::into_inner);
        if !debts.contains_key(&client) && debts.len() >= MAX_CLIENTS {
            // Forget who owes nothing any more; if all still owe, the newcomer shares a debt.
            debts.retain(|_, debt| self.drained(debt, now) > 0.0);
        }
        let key = if debts.contains_key(&client) || debts.len() < MAX_CLIENTS {
            client
        } else {
            SHARED
        };
        let debt = debts.entry(key).or_insert(Debt {
            bytes: 0.0,
            updated: now,
        });
        let owed = self.drained(debt, now);
        debt.bytes = owed + bytes as f64;
    }

    /// The debt as it stands at `now`, brought up to date.
    fn drained(&self, debt: &mut Debt, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(debt.updated).as_secs_f64();
        debt.bytes = (debt.bytes - elapsed * self.per_second).max(0.0);
        debt.updated = now;
        debt.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn an_address_owing_more_than_the_burst_waits_until_it_has_drained_and_others_do_not() {
        let work = UnauthenticatedWork::new(1000, 2000);
        let t0 = Instant::now();
        assert!(work.check(ip(1), t0).is_ok(), "owes nothing");
        work.charge(ip(1), 2000, t0);
        assert!(work.check(ip(1), t0).is_ok(), "at the burst");
        work.charge(ip(1), 1500, t0);
        let wait = work.check(ip(1), t0).expect_err("1,500 over the burst");
        assert_eq!(wait, Duration::from_millis(1500));
        assert!(
            work.check(ip(2), t0).is_ok(),
            "another address owes nothing"
        );
        let later = t0 + Duration::from_millis(1500);
        assert!(work.check(ip(1), later).is_ok(), "drained to the burst");
    }

    #[test]
    fn no_rate_is_no_bound() {
        let work = UnauthenticatedWork::new(0, 0);
        let now = Instant::now();
        work.charge(ip(1), usize::MAX, now);
        assert!(work.check(ip(1), now).is_ok());
    }
}
