//! A spooled request on disk: a frame that a torn or corrupted write cannot pass for a good one,
//! around what the collector would have published (the metadata of its raw message and the body
//! as received).
//!
//! Frame, integers little-endian: the magic `ISP1`, the payload's length (u32), the CRC-32 of the
//! payload (u32); then the payload: the metadata's length (u32), the metadata as JSON, the body.
//! A frame is only ever appended whole and fsync'd before its request is answered, so the one
//! frame a crash can leave half-written is the last one, which was never answered.

use std::io::{self, Read};

use chrono::{DateTime, Utc};
use ingest_pipeline::message::{cut_user_agent, Endpoint, RequestMeta};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};

const MAGIC: [u8; 4] = *b"ISP1";
/// Magic, payload length and CRC.
pub const HEADER_BYTES: usize = 12;

/// What a spooled request is published with: the raw message's properties, rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// When it was spooled (Unix milliseconds): the spool's age is its oldest entry's.
    pub spooled_at_ms: u64,
    pub request_id: String,
    pub received_at: DateTime<Utc>,
    pub source: String,
    pub endpoint: String,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub content_type: String,
    pub gzip: bool,
    /// The `x-refused-events` header, when the collector refused some events of the batch.
    pub refused_events: Option<String>,
}

impl Entry {
    pub fn new(
        meta: &RequestMeta,
        content_type: &str,
        gzip: bool,
        refused_events: Option<&str>,
    ) -> Self {
        Self {
            spooled_at_ms: now_ms(),
            request_id: meta.request_id.clone(),
            received_at: meta.received_at,
            source: meta.source.clone(),
            endpoint: meta.endpoint.as_str().to_owned(),
            client_ip: meta.client_ip.clone(),
            // Cut as its header is: a client's long header must not make a large record.
            user_agent: meta.user_agent.as_ref().map(|agent| cut_user_agent(agent)),
            content_type: content_type.to_owned(),
            gzip,
            refused_events: refused_events.map(str::to_owned),
        }
    }

    /// The properties it would have been published with when it was received.
    pub fn properties(&self) -> BasicProperties {
        let meta = RequestMeta {
            request_id: self.request_id.clone(),
            received_at: self.received_at,
            source: self.source.clone(),
            endpoint: Endpoint::from_name(&self.endpoint).unwrap_or(Endpoint::Batch),
            client_ip: self.client_ip.clone(),
            user_agent: self.user_agent.clone(),
        };
        crate::publisher::raw_properties(
            &meta,
            &self.content_type,
            self.gzip,
            self.refused_events.as_deref(),
        )
    }
}

pub fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

/// One frame for `entry` and `body`.
pub fn encode(entry: &Entry, body: &[u8]) -> io::Result<Vec<u8>> {
    let meta = serde_json::to_vec(entry)?;
    let payload = 4 + meta.len() + body.len();
    let too_large = || io::Error::new(io::ErrorKind::InvalidInput, "record over 4 GiB");
    let payload_len = u32::try_from(payload).map_err(|_| too_large())?;
    let meta_len = u32::try_from(meta.len()).map_err(|_| too_large())?;
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&payload_len.to_le_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(&meta_len.to_le_bytes());
    frame.extend_from_slice(&meta);
    frame.extend_from_slice(body);
    let crc = crc32fast::hash(&frame[HEADER_BYTES..]);
    frame[8..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    Ok(frame)
}

/// A frame read back.
#[derive(Debug)]
pub struct Record {
    pub entry: Entry,
    pub body: Vec<u8>,
    /// Its size on disk, header included.
    pub bytes: u64,
}

/// Why the frames of a segment end before its end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Bad {
    /// A frame cut short: the write a crash interrupted. It and what follows are dropped.
    #[error("torn record: {0}")]
    Torn(&'static str),
    /// A frame whose bytes are wrong: disk corruption, or not a spool file. It and what follows
    /// are dropped.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The disk did not give the bytes back: nothing is dropped for it, the read is tried again.
    #[error("cannot read the spool: {0}")]
    Io(String),
}

impl Bad {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Torn(_) => "torn",
            Self::Corrupt(_) => "corrupt",
            Self::Io(_) => "io",
        }
    }
}

/// Reads frames one after another from a stretch of `left` bytes: what a frame says its length
/// is cannot make it allocate more than the stretch holds.
pub struct Reader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R, left: u64) -> Self {
        Self { inner, left }
    }

    /// Bytes of the stretch not read yet.
    pub fn left(&self) -> u64 {
        self.left
    }

    /// The next frame; `Ok(None)` at a clean end.
    pub fn next_record(&mut self) -> Result<Option<Record>, Bad> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_BYTES];
        let read = fill(&mut self.inner, &mut header)?;
        self.left = self.left.saturating_sub(read as u64);
        match read {
            0 => return Err(Bad::Torn("the file ends before its recorded length")),
            n if n < HEADER_BYTES => return Err(Bad::Torn("header cut short")),
            _ => {}
        }
        if header[..4] != MAGIC {
            return Err(Bad::Corrupt("no record starts here".into()));
        }
        let length = le_u32(&header[4..8]) as u64;
        let crc = le_u32(&header[8..12]);
        if length > self.left {
            return Err(Bad::Torn("payload cut short"));
        }
        if length < 4 {
            return Err(Bad::Corrupt(format!("a length of {length} bytes")));
        }
        let mut payload = vec![0u8; length as usize];
        let read = fill(&mut self.inner, &mut payload)?;
        self.left = self.left.saturating_sub(read as u64);
        if (read as u64) < length {
            return Err(Bad::Torn("payload cut short"));
        }
        if crc32fast::hash(&payload) != crc {
            return Err(Bad::Corrupt("checksum mismatch".into()));
        }
        let meta_len = le_u32(&payload[..4]) as usize;
        let meta_end = 4usize.saturating_add(meta_len);
        let Some(meta) = payload.get(4..meta_end) else {
            return Err(Bad::Corrupt("metadata longer than its record".into()));
        };
        let entry: Entry = serde_json::from_slice(meta)
            .map_err(|e| Bad::Corrupt(format!("unreadable metadata: {e}")))?;
        let body = payload.split_off(meta_end);
        Ok(Some(Record {
            entry,
            body,
            bytes: HEADER_BYTES as u64 + length,
        }))
    }
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(word)
}

/// Reads until `buf` is full or the input ends; how many bytes it read.
fn fill(inner: &mut impl Read, buf: &mut [u8]) -> Result<usize, Bad> {
    let mut read = 0;
    while read < buf.len() {
        match inner.read(&mut buf[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Bad::Io(e.to_string())),
        }
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingest_pipeline::message::USER_AGENT_BYTES;

    pub fn entry(id: &str) -> Entry {
        Entry {
            spooled_at_ms: 1_795_262_400_250,
            request_id: id.into(),
            received_at: DateTime::parse_from_rfc3339("2026-11-21T12:00:00.250Z")
                .expect("time")
                .with_timezone(&Utc),
            source: "shop-ios".into(),
            endpoint: "track".into(),
            client_ip: Some("203.0.113.9".into()),
            user_agent: None,
            content_type: "application/json".into(),
            gzip: true,
            refused_events: Some("1:event_too_large:40000".into()),
        }
    }

    fn read_all(bytes: &[u8]) -> (Vec<Record>, Option<Bad>) {
        let mut reader = Reader::new(bytes, bytes.len() as u64);
        let mut records = Vec::new();
        loop {
            match reader.next_record() {
                Ok(Some(record)) => records.push(record),
                Ok(None) => return (records, None),
                Err(bad) => return (records, Some(bad)),
            }
        }
    }

    #[test]
    fn frames_read_back_as_written_with_the_properties_they_would_have_been_published_with() {
        let mut file = encode(&entry("a"), b"{\"x\":1}").expect("encode");
        file.extend(encode(&entry("b"), b"").expect("encode"));
        let (records, bad) = read_all(&file);
        assert_eq!(bad, None);
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].entry, entry("a"));
        assert_eq!(records[0].body, b"{\"x\":1}");
        assert_eq!(records[1].body, b"");
        assert_eq!(
            records.iter().map(|r| r.bytes).sum::<u64>(),
            file.len() as u64
        );
        let properties = records[0].entry.properties();
        assert_eq!(
            properties.message_id().as_ref().map(|s| s.as_str()),
            Some("a")
        );
        let headers = properties.headers().clone().expect("headers");
        let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "client_ip",
                "endpoint",
                "received_at",
                "source",
                "x-refused-events"
            ]
        );
        assert!(ingest_pipeline::message::is_gzip(&properties));
    }

    #[test]
    fn a_frame_cut_anywhere_is_torn_and_the_frames_before_it_stay() {
        let first = encode(&entry("a"), b"[1,2,3]").expect("encode");
        let second = encode(&entry("b"), b"[4,5,6]").expect("encode");
        for cut in 1..second.len() {
            let mut file = first.clone();
            file.extend_from_slice(&second[..cut]);
            let (records, bad) = read_all(&file);
            assert_eq!(records.len(), 1, "cut at {cut}");
            assert!(matches!(bad, Some(Bad::Torn(_))), "cut at {cut}: {bad:?}");
        }
    }

    #[test]
    fn a_flipped_byte_or_an_absurd_length_is_corrupt_and_costs_no_allocation_of_that_size() {
        let first = encode(&entry("a"), b"[1]").expect("encode");
        let second = encode(&entry("b"), b"[2]").expect("encode");
        for at in 0..second.len() {
            let mut file = first.clone();
            let mut bad_second = second.clone();
            bad_second[at] ^= 0x40;
            file.extend_from_slice(&bad_second);
            let (records, bad) = read_all(&file);
            assert_eq!(records.len(), 1, "flipped byte {at}");
            assert!(bad.is_some(), "flipped byte {at} went unnoticed");
        }
        let mut absurd = first.clone();
        absurd.extend_from_slice(&MAGIC);
        absurd.extend_from_slice(&u32::MAX.to_le_bytes());
        absurd.extend_from_slice(&[0; 4]);
        let (records, bad) = read_all(&absurd);
        assert_eq!(records.len(), 1);
        assert!(matches!(bad, Some(Bad::Torn(_))), "{bad:?}");
    }

    #[test]
    fn a_read_error_is_not_corruption_and_a_long_user_agent_is_cut() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("EIO"))
            }
        }
        let bad = Reader::new(Failing, 100)
            .next_record()
            .expect_err("an error");
        assert!(matches!(bad, Bad::Io(_)), "{bad:?}");
        let meta = RequestMeta {
            request_id: "r".into(),
            received_at: Utc::now(),
            source: "s".into(),
            endpoint: Endpoint::Track,
            client_ip: None,
            user_agent: Some("é".repeat(20_000)),
        };
        let entry = Entry::new(&meta, "application/json", false, None);
        // Cut in bytes, at a character's boundary: 256 two-byte characters.
        assert_eq!(entry.user_agent.map(|a| a.len()), Some(USER_AGENT_BYTES));
    }
}
