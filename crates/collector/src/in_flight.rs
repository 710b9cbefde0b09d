//! Slots for requests being read or published: a count and a budget of body bytes, with a
//! smaller share of each for requests whose write key is known only once the body is read.
//! A request that finds a budget full is answered 503 at once.

use tokio::sync::{Semaphore, SemaphorePermit};

/// Slots for requests being read or published: a count and a budget of body bytes, and for
/// requests without an Authorization header (their write key is known only once the body is
/// read) a smaller pool of each, so that such requests, slow or anonymous, can never hold every
/// slot or every byte and lock out clients whose key was checked from the header.
pub struct InFlight {
    all: Semaphore,
    body_keyed: Semaphore,
    bytes: Semaphore,
    body_keyed_bytes: Semaphore,
    /// `collector_in_flight_requests` and `collector_in_flight_bytes`, looked up once here
    /// rather than in the metrics registry on every request.
    requests_gauge: metrics::Gauge,
    bytes_gauge: metrics::Gauge,
}

/// Which budget a refused request found full, for `collector_load_shed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Requests,
    Bytes,
}

/// A request's slot: its permits and its count in `collector_in_flight_requests` and
/// `collector_in_flight_bytes`, given back when dropped (also when the client goes away
/// mid-request).
pub struct Slot<'a> {
    in_flight: &'a InFlight,
    _all: SemaphorePermit<'a>,
    _body_keyed: Option<SemaphorePermit<'a>>,
    bytes: SemaphorePermit<'a>,
    body_keyed_bytes: Option<SemaphorePermit<'a>>,
    requests_gauge: &'a metrics::Gauge,
    bytes_gauge: &'a metrics::Gauge,
}

impl InFlight {
    pub fn new(max: usize, max_body_keyed: usize, bytes: usize, body_keyed_bytes: usize) -> Self {
        let cap = |n: usize| n.min(Semaphore::MAX_PERMITS);
        Self {
            all: Semaphore::new(cap(max)),
            body_keyed: Semaphore::new(cap(max_body_keyed)),
            bytes: Semaphore::new(cap(bytes)),
            body_keyed_bytes: Semaphore::new(cap(body_keyed_bytes)),
            requests_gauge: metrics::gauge!("collector_in_flight_requests"),
            bytes_gauge: metrics::gauge!("collector_in_flight_bytes"),
        }
    }

    /// A slot holding `bytes` of the byte budget, or which budget is full.
    pub fn try_enter(&self, body_keyed: bool, bytes: usize) -> Result<Slot<'_>, Full> {
        let n = u32::try_from(bytes).map_err(|_| Full::Bytes)?;
        let (body_keyed, body_keyed_bytes) = if body_keyed {
            let slot = self.body_keyed.try_acquire().map_err(|_| Full::Requests)?;
            let held = self
                .body_keyed_bytes
                .try_acquire_many(n)
                .map_err(|_| Full::Bytes)?;
            (Some(slot), Some(held))
        } else {
            (None, None)
        };
        let all = self.all.try_acquire().map_err(|_| Full::Requests)?;
        let held = self.bytes.try_acquire_many(n).map_err(|_| Full::Bytes)?;
        self.requests_gauge.increment(1.0);
        self.bytes_gauge.increment(bytes as f64);
        Ok(Slot {
            in_flight: self,
            _all: all,
            _body_keyed: body_keyed,
            bytes: held,
            body_keyed_bytes,
            requests_gauge: &self.requests_gauge,
            bytes_gauge: &self.bytes_gauge,
        })
    }
}

impl Slot<'_> {
    /// Holds `bytes` of the byte budgets (a chunked body grows as it arrives), or which budget
    /// is full; on error the slot holds what it held before.
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), Full> {
        let held = self.bytes.num_permits();
        let Some(more) = bytes.checked_sub(held).filter(|more| *more > 0) else {
            return Ok(());
        };
        let more_permits = u32::try_from(more).map_err(|_| Full::Bytes)?;
        let keyed = match self.body_keyed_bytes {
            Some(_) => Some(
                self.in_flight
                    .body_keyed_bytes
                    .try_acquire_many(more_permits)
                    .map_err(|_| Full::Bytes)?,
            ),
            None => None,
        };
        let all = self
            .in_flight
            .bytes
            .try_acquire_many(more_permits)
            .map_err(|_| Full::Bytes)?;
        self.bytes.merge(all);
        if let (Some(held), Some(keyed)) = (self.body_keyed_bytes.as_mut(), keyed) {
            held.merge(keyed);
        }
        self.bytes_gauge.increment(more as f64);
        Ok(())
    }

    /// Gives back what the slot holds beyond `bytes` (the body turned out smaller than the
    /// reservation).
    pub fn shrink_to(&mut self, bytes: usize) {
        let excess = self.bytes.num_permits().saturating_sub(bytes);
        if excess == 0 {
            return;
        }
        drop(self.bytes.split(excess));
        if let Some(held) = self.body_keyed_bytes.as_mut() {
            drop(held.split(excess.min(held.num_permits())));
        }
        self.bytes_gauge.decrement(excess as f64);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.requests_gauge.decrement(1.0);
        self.bytes_gauge.decrement(self.bytes.num_permits() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_without_a_header_key_never_take_the_slots_kept_for_header_keys() {
        let slots = InFlight::new(4, 1, 1000, 1000);
        let anonymous = slots.try_enter(true, 1).expect("the body-keyed slot");
        assert_eq!(
            slots.try_enter(true, 1).err(),
            Some(Full::Requests),
            "a second body-keyed slot"
        );
        let keyed: Vec<_> = (0..3).map(|_| slots.try_enter(false, 1)).collect();
        assert!(keyed.iter().all(Result::is_ok), "header-keyed slots");
        assert!(slots.try_enter(false, 1).is_err(), "past max_in_flight");
        drop(keyed);
        drop(anonymous);
        assert!(slots.try_enter(true, 1).is_ok(), "given back on drop");
        // Header-keyed requests can fill every slot, and then a body-keyed one waits too.
        let all: Vec<_> = (0..4)
            .filter_map(|_| slots.try_enter(false, 1).ok())
            .collect();
        assert_eq!(all.len(), 4);
        assert!(slots.try_enter(true, 1).is_err());
    }

    #[test]
    fn a_chunked_body_holds_only_the_bytes_that_arrived_and_stops_at_a_full_budget() {
        let slots = InFlight::new(100, 25, 1000, 400);
        // A body-keyed chunked request starts with nothing reserved.
        let mut chunked = slots.try_enter(true, 0).expect("a slot");
        chunked.grow_to(300).expect("300 bytes arrived");
        chunked.grow_to(200).expect("never shrinks by growing");
        assert_eq!(slots.try_enter(true, 101).err(), Some(Full::Bytes));
        let other = slots
            .try_enter(true, 100)
            .expect("the body-keyed bytes left");
        // The body-keyed share is full: this body cannot grow, and holds what it held.
        assert_eq!(chunked.grow_to(301), Err(Full::Bytes));
        drop(other);
        chunked.grow_to(400).expect("room again");
        // Header-keyed bodies grow against the whole budget only.
        let mut keyed = slots.try_enter(false, 0).expect("a slot");
        keyed.grow_to(600).expect("the rest of the 1000");
        assert_eq!(keyed.grow_to(601), Err(Full::Bytes));
        drop((chunked, keyed));
        assert!(slots.try_enter(false, 1000).is_ok(), "all given back");
    }

    #[test]
    fn the_byte_budget_binds_before_the_count_and_a_read_body_gives_back_its_excess() {
        let slots = InFlight::new(100, 25, 1000, 400);
        let mut big = slots.try_enter(false, 700).expect("700 of 1000 bytes");
        assert_eq!(slots.try_enter(false, 301).err(), Some(Full::Bytes));
        let small = slots.try_enter(false, 300).expect("the last 300 bytes");
        assert_eq!(slots.try_enter(false, 1).err(), Some(Full::Bytes));
        // The body was 200 bytes, not the 700 reserved: 500 come back.
        big.shrink_to(200);
        let after = slots.try_enter(false, 500).expect("the 500 given back");
        drop((big, small, after));
        // Body-keyed requests have their own share of the bytes too.
        let anonymous = slots.try_enter(true, 400).expect("the body-keyed bytes");
        assert_eq!(slots.try_enter(true, 1).err(), Some(Full::Bytes));
        let keyed = slots.try_enter(false, 600).expect("the header-keyed bytes");
        drop((anonymous, keyed));
        assert!(
            slots.try_enter(false, 1000).is_ok(),
            "all given back on drop"
        );
    }
}
