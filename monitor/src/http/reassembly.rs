//! Puts one direction of a TCP connection back in order: duplicates and overlaps are
//! trimmed, early segments wait (bounded), and gaps are made explicit.

use std::collections::BTreeMap;

/// What comes out of the reassembler, in stream order. In-order bytes are lent, not
/// copied: most segments arrive in order and go straight to the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery<'a> {
    Data(&'a [u8]),
    /// This many bytes are missing (never captured, or lost).
    Gap(u64),
}

/// Segments held while waiting for an earlier one, at most.
pub const MAX_PENDING_SEGMENTS: usize = 64;

#[derive(Debug, Default)]
pub struct Reassembler {
    /// Sequence number and stream offset of the next expected byte.
    next: Option<(u32, u64)>,
    /// Early segments by stream offset.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
}

impl Reassembler {
    /// Bytes held in early segments.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Offset of `seq` relative to the next expected byte (negative: already seen).
    fn offset_of(&self, seq: u32) -> Option<(i64, u64)> {
        let (next_seq, next_offset) = self.next?;
        Some((i64::from(seq.wrapping_sub(next_seq) as i32), next_offset))
    }

    /// Takes one segment; in-order bytes (and what they unblock) go to `out`.
    pub fn push(&mut self, seq: u32, data: &[u8], out: &mut impl FnMut(Delivery<'_>)) {
        if data.is_empty() {
            return;
        }
        if self.next.is_none() {
            self.next = Some((seq, 0));
        }
        let Some((relative, next_offset)) = self.offset_of(seq) else {
            return;
        };
        if relative > 0 {
            let offset = next_offset + relative as u64;
            let replaced = self.pending.insert(offset, data.to_vec());
            self.pending_bytes += data.len();
            if let Some(old) = replaced {
                self.pending_bytes -= old.len();
            }
            return;
        }
        let already_seen = relative.unsigned_abs() as usize;
        if already_seen >= data.len() {
            return; // a retransmission of bytes we have
        }
        self.deliver(&data[already_seen..], out);
        self.drain(out);
    }

    fn deliver(&mut self, data: &[u8], out: &mut impl FnMut(Delivery<'_>)) {
        if let Some((seq, offset)) = &mut self.next {
            *seq = seq.wrapping_add(data.len() as u32);
            *offset += data.len() as u64;
        }
        out(Delivery::Data(data));
    }

    /// Delivers early segments that are now in order (trimming overlaps).
    fn drain(&mut self, out: &mut impl FnMut(Delivery<'_>)) {
        while let Some((&offset, _)) = self.pending.first_key_value() {
            let Some((_, next_offset)) = self.next else {
                return;
            };
            if offset > next_offset {
                return;
            }
            let Some((_, data)) = self.pending.pop_first() else {
                return;
            };
            self.pending_bytes -= data.len();
            let already_seen = (next_offset - offset) as usize;
            if already_seen < data.len() {
                self.deliver(&data[already_seen..], out);
            }
        }
    }

    /// How many bytes are missing before the earliest held segment, if any is held.
    pub fn gap_ahead(&self) -> Option<u64> {
        let (&offset, _) = self.pending.first_key_value()?;
        let (_, next_offset) = self.next?;
        Some(offset.saturating_sub(next_offset))
    }

    /// The earliest held segment's first bytes.
    pub fn first_pending(&self) -> Option<&[u8]> {
        self.pending
            .first_key_value()
            .map(|(_, data)| data.as_slice())
    }

    /// Gives up on the missing bytes before the earliest held segment: reports the gap
    /// and delivers what follows it.
    pub fn skip_gap(&mut self, out: &mut impl FnMut(Delivery<'_>)) {
        let Some(missing) = self.gap_ahead() else {
            return;
        };
        self.skip(missing, out);
        self.drain(out);
    }

    /// Bytes never seen between what was delivered and `end_seq`, the end of the
    /// stream (a closing segment), when nothing is held.
    pub fn missing_until(&self, end_seq: u32) -> Option<u64> {
        if !self.pending.is_empty() {
            return None;
        }
        let (relative, _) = self.offset_of(end_seq)?;
        u64::try_from(relative).ok().filter(|&missing| missing > 0)
    }

    /// Gives up on the next `missing` bytes.
    pub fn skip(&mut self, missing: u64, out: &mut impl FnMut(Delivery<'_>)) {
        if let Some((seq, offset)) = &mut self.next {
            *seq = seq.wrapping_add(missing as u32);
            *offset += missing;
        }
        out(Delivery::Gap(missing));
    }

    /// True when the held segments exceed the bounds: time to give up waiting.
    pub fn over_limit(&self, max_bytes: usize) -> bool {
        self.pending.len() > MAX_PENDING_SEGMENTS || self.pending_bytes > max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects deliveries as bytes, a gap as that many '?'.
    #[derive(Default)]
    struct Out(Vec<u8>, Vec<Delivery<'static>>);

    impl Out {
        fn sink(&mut self) -> impl FnMut(Delivery<'_>) + '_ {
            |d| match d {
                Delivery::Data(bytes) => self.0.extend_from_slice(bytes),
                Delivery::Gap(n) => {
                    self.0.extend(std::iter::repeat_n(b'?', n as usize));
                    self.1.push(Delivery::Gap(n));
                }
            }
        }
    }

    #[test]
    fn in_order_reordered_duplicated_and_overlapping() {
        let mut r = Reassembler::default();
        let mut out = Out::default();
        r.push(1000, b"GET ", &mut out.sink());
        r.push(1007, b"HTTP", &mut out.sink()); // early
        r.push(1000, b"GET ", &mut out.sink()); // duplicate
        r.push(1002, b"T /x ", &mut out.sink()); // overlap: "T " seen, "/x " new, up to 1007
        assert_eq!(out.0, b"GET /x HTTP");
        assert_eq!(r.pending_bytes(), 0);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut r = Reassembler::default();
        let mut out = Out::default();
        r.push(u32::MAX - 1, b"ab", &mut out.sink());
        r.push(2, b"ef", &mut out.sink());
        r.push(0, b"cd", &mut out.sink());
        assert_eq!(out.0, b"abcdef");
    }

    #[test]
    fn gaps_are_reported_when_skipped() {
        let mut r = Reassembler::default();
        let mut out = Out::default();
        r.push(0, b"abc", &mut out.sink());
        r.push(10, b"xyz", &mut out.sink());
        assert_eq!(r.gap_ahead(), Some(7));
        assert_eq!(r.first_pending(), Some(&b"xyz"[..]));
        r.skip_gap(&mut out.sink());
        assert_eq!(out.1, [Delivery::Gap(7)]);
        assert_eq!(out.0, b"abc???????xyz");
        // A late arrival of the skipped bytes is ignored.
        r.push(3, b"defghij", &mut out.sink());
        assert_eq!(out.0, b"abc???????xyz");
    }

    #[test]
    fn held_segments_are_bounded() {
        let mut r = Reassembler::default();
        let mut out = Out::default();
        r.push(0, b"a", &mut out.sink());
        for i in 0..=MAX_PENDING_SEGMENTS as u32 {
            r.push(10 + i * 10, b"x", &mut out.sink());
        }
        assert!(r.over_limit(usize::MAX));
        assert!(!Reassembler::default().over_limit(0));
    }

    /// Any order of the same segments yields the same stream.
    #[test]
    fn permutations_agree() {
        let text = b"POST /items HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let segments: Vec<(u32, &[u8])> = text
            .chunks(7)
            .enumerate()
            .map(|(i, chunk)| (500 + (i * 7) as u32, chunk))
            .collect();
        let mut seed = 12345u64;
        for _ in 0..200 {
            let mut order = segments.clone();
            // Fisher-Yates with a tiny LCG, plus a duplicate.
            for i in (1..order.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (seed >> 33) as usize % (i + 1));
            }
            order.push(order[0]);
            let mut r = Reassembler::default();
            let mut out = Out::default();
            // The first segment must come first: it anchors the stream.
            r.push(segments[0].0, segments[0].1, &mut out.sink());
            for (seq, chunk) in order {
                r.push(seq, chunk, &mut out.sink());
            }
            assert_eq!(out.0, text);
        }
    }
}
