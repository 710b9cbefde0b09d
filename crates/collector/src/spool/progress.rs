//! How far the broker has confirmed a segment, kept on disk beside it (`<seq>.forwarded`), so
//! that a restart does not forward again what was confirmed before it.
//!
//! The file holds one record of 16 bytes, overwritten in place: the magic `ISF1`, the offset
//! (u64, little-endian) up to which every frame of the segment is confirmed, and the CRC-32 of
//! that offset. The forwarder writes it at most every [`PERSIST_EVERY`] and when it pauses or
//! stops, each time with an fsync. It only ever understates: a file that is missing, torn or
//! unreadable reads as offset 0, which costs duplicates (frames forwarded twice), never a lost
//! frame. A progress file is removed before its segment, and a spool never reuses a sequence
//! number that a segment or a progress file of its directory still has, so a stale file can
//! never speak for another segment.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::private;

pub(super) const SUFFIX: &str = "forwarded";
const MAGIC: [u8; 4] = *b"ISF1";
const BYTES: usize = 16;
/// The forwarder records its progress at most this often while it forwards: a crash forwards
/// again what was confirmed in the last such stretch (and frames confirmed out of order).
pub const PERSIST_EVERY: Duration = Duration::from_millis(200);

pub(super) fn path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.{SUFFIX}"))
}

/// Records that every frame of segment `seq` before `offset` is confirmed, durably.
pub(super) fn write(dir: &Path, seq: u64, offset: u64) -> io::Result<()> {
    let mut record = [0u8; BYTES];
    record[..4].copy_from_slice(&MAGIC);
    record[4..12].copy_from_slice(&offset.to_le_bytes());
    let crc = crc32fast::hash(&record[4..12]);
    record[12..].copy_from_slice(&crc.to_le_bytes());
    let path = path(dir, seq);
    let mut file = private::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&record)?;
    file.sync_data()
}

/// The confirmed offset recorded for segment `seq`; 0 when there is none or it cannot be read.
pub(super) fn read(dir: &Path, seq: u64) -> u64 {
    let mut record = [0u8; BYTES];
    let read = std::fs::File::open(path(dir, seq)).and_then(|mut f| f.read_exact(&mut record));
    if read.is_err() || record[..4] != MAGIC {
        return 0;
    }
    let mut word = [0u8; 4];
    word.copy_from_slice(&record[12..]);
    if crc32fast::hash(&record[4..12]) != u32::from_le_bytes(word) {
        return 0;
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&record[4..12]);
    u64::from_le_bytes(offset)
}

/// Removes segment `seq`'s progress file, if it has one.
pub(super) fn remove(dir: &Path, seq: u64) -> io::Result<()> {
    match std::fs::remove_file(path(dir, seq)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_back_as_written_and_anything_damaged_reads_as_nothing_confirmed() {
        let dir = std::env::temp_dir().join(format!("progress-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(read(&dir, 7), 0, "no file");
        write(&dir, 7, 123_456).expect("write");
        assert_eq!(read(&dir, 7), 123_456);
        write(&dir, 7, 99).expect("overwrite in place");
        assert_eq!(read(&dir, 7), 99);
        let mut bytes = std::fs::read(path(&dir, 7)).expect("read");
        assert_eq!(bytes.len(), BYTES);
        bytes[5] ^= 0x01;
        std::fs::write(path(&dir, 7), &bytes).expect("corrupt");
        assert_eq!(read(&dir, 7), 0, "a bad checksum");
        std::fs::write(path(&dir, 7), &bytes[..10]).expect("torn");
        assert_eq!(read(&dir, 7), 0, "a torn record");
        remove(&dir, 7).expect("remove");
        remove(&dir, 7).expect("removing what is gone is fine");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
