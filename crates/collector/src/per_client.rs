//! What one client (an IP address) may hold at once: open connections at accept, or, behind a
//! trusted proxy where every connection is the proxy's, requests in flight by the forwarded
//! address. A client over its share costs only itself; the map holds only clients that hold
//! something, so it is bounded by `collector.max_connections` and `max_in_flight`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Counts per client, each capped at `max`.
pub struct PerClient {
    held: Mutex<HashMap<IpAddr, u32>>,
    max: u32,
}

/// One unit a client holds; given back when dropped.
pub struct Held {
    owner: Arc<PerClient>,
    client: IpAddr,
}

impl PerClient {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::new(HashMap::new()),
            max: u32::try_from(max).unwrap_or(u32::MAX).max(1),
        })
    }

    /// A unit for `client`, or `None` when it holds `max` already.
    pub fn try_hold(self: &Arc<Self>, client: IpAddr) -> Option<Held> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(client).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(Held {
            owner: self.clone(),
            client,
        })
    }

    /// Clients holding anything now.
    pub fn clients(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self
            .owner
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_its_share_and_others_are_not_touched() {
        let per = PerClient::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let b: IpAddr = "192.0.2.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let first = per.try_hold(a).expect("first");
        let second = per.try_hold(a).expect("second");
        assert!(per.try_hold(a).is_none(), "a third for the same client");
        let other = per.try_hold(b).expect("another client is not touched");
        drop(first);
        let again = per.try_hold(a).expect("given back on drop");
        assert_eq!(per.clients(), 2);
        drop((second, again, other));
        assert_eq!(per.clients(), 0, "nobody holding anything is forgotten");
    }
}
