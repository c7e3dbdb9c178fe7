//! Captured segments made by hand: one direction of a connection, cut as on an Ethernet
//! MTU, for feeding the daemon's pipeline without a kernel (corpus replay, benchmark).

use std::net::SocketAddr;

use monitor::capture::{Direction, Segment};

/// Payload bytes per segment, as on an Ethernet MTU.
pub const MSS: usize = 1448;

/// One direction of a connection: each segment follows the previous in sequence space.
pub struct Stream {
    pub direction: Direction,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Sequence number of the next segment's first byte.
    pub seq: u32,
}

impl Stream {
    pub fn new(direction: Direction, client: SocketAddr, server: SocketAddr, seq: u32) -> Self {
        Self {
            direction,
            client,
            server,
            seq,
        }
    }

    /// The next segment, carrying `data` (at most `MSS` bytes) seen at `t` ns.
    pub fn next<'a>(&mut self, data: &'a [u8], t: u64) -> Segment<'a> {
        let segment = Segment {
            timestamp_ns: t,
            direction: self.direction,
            client: self.client,
            server: self.server,
            seq: self.seq,
            flags: 0,
            data,
        };
        self.seq = self.seq.wrapping_add(data.len() as u32);
        segment
    }
}
