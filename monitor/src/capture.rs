//! The daemon's side of payload capture: configuring what the kernel captures,
//! draining the sample ring buffer and decoding samples into segments.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray, RingBuf},
};
use monitor_common::{
    capture::{
        CaptureConfig, DIRECTION_REQUEST, DIRECTION_RESPONSE, PORT_BITMAP_WORDS, READER_PARKED,
        READER_POLLING, SAMPLE_DATA_LEN, SAMPLE_RING_BYTES, Sample, SampleHeader,
    },
    maps,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use crate::{
    cidr,
    config::CaptureSettings,
    maps::{MapsError, take},
};

/// Which way a segment went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to server (captured on ingress).
    Request,
    /// Server to client (captured on egress).
    Response,
}

impl Direction {
    pub const fn name(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}

/// One decoded sample: (part of) a TCP segment's payload, borrowed from the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    /// CLOCK_MONOTONIC ns.
    pub timestamp_ns: u64,
    pub direction: Direction,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Sequence number of `data[0]`.
    pub seq: u32,
    /// `monitor_common::capture::TCP_*` bits.
    pub flags: u8,
    /// The payload, read in place from the ring buffer (no copy).
    pub data: &'a [u8],
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("sample of {0} bytes, expected {expected}", expected = size_of::<Sample>())]
    Size(usize),
    #[error("sample claims {0} data bytes, at most {SAMPLE_DATA_LEN} fit")]
    DataLen(usize),
    #[error("unknown direction {0}")]
    Direction(u8),
}

/// Decodes one ring buffer record; the segment's payload stays in the record.
pub fn decode(record: &[u8]) -> Result<Segment<'_>, DecodeError> {
    if record.len() < size_of::<Sample>() {
        return Err(DecodeError::Size(record.len()));
    }
    // SAFETY: `record` holds at least a `SampleHeader`, which is plain old data;
    // the read is unaligned-safe.
    let header: SampleHeader = unsafe { record.as_ptr().cast::<SampleHeader>().read_unaligned() };
    let data_len = usize::from(header.data_len);
    if data_len > SAMPLE_DATA_LEN {
        return Err(DecodeError::DataLen(data_len));
    }
    let direction = match header.direction {
        DIRECTION_REQUEST => Direction::Request,
        DIRECTION_RESPONSE => Direction::Response,
        other => return Err(DecodeError::Direction(other)),
    };
    let start = size_of::<SampleHeader>();
    let addr = |bytes: [u8; 16]| cidr::canonical_addr(IpAddr::V6(Ipv6Addr::from(bytes)));
    let segment = Segment {
        timestamp_ns: header.timestamp_ns,
        direction,
        client: SocketAddr::new(addr(header.client_addr), header.client_port),
        server: SocketAddr::new(addr(header.server_addr), header.server_port),
        seq: header.seq,
        flags: header.tcp_flags,
        data: &record[start..start + data_len],
    };
    Ok(segment)
}

/// The capture's control and counter maps.
pub struct CaptureMaps {
    config: Array<MapData, CaptureConfig>,
    ports: Array<MapData, u32>,
    captured: PerCpuArray<MapData, u64>,
    lost: PerCpuArray<MapData, u64>,
}

/// Counts of samples since the programs were loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleTotals {
    pub captured: u64,
    pub lost: u64,
}

impl CaptureMaps {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            config: take(ebpf, maps::CAPTURE_CONFIG)?,
            ports: take(ebpf, maps::CAPTURE_PORTS)?,
            captured: take(ebpf, maps::SAMPLES_CAPTURED)?,
            lost: take(ebpf, maps::SAMPLES_LOST)?,
        })
    }

    /// Tells the kernel which server ports to capture and how much per message.
    pub fn configure(&mut self, settings: &CaptureSettings) -> Result<(), MapsError> {
        let mut bitmap = vec![0u32; PORT_BITMAP_WORDS as usize];
        for port in &settings.ports {
            bitmap[usize::from(*port >> 5)] |= 1 << (port & 31);
        }
        let map_error = |name, source| MapsError::Map { name, source };
        for (index, word) in bitmap.iter().enumerate() {
            self.ports
                .set(index as u32, word, 0)
                .map_err(|e| map_error(maps::CAPTURE_PORTS, e))?;
        }
        let max = if settings.ports.is_empty() {
            0
        } else {
            settings.max_bytes_per_request
        };
        self.config
            .set(
                0,
                CaptureConfig {
                    max_bytes_per_message: max,
                    wakeup_bytes: wakeup_bytes(settings.ring_bytes),
                },
                0,
            )
            .map_err(|e| map_error(maps::CAPTURE_CONFIG, e))
    }

    pub fn totals(&self) -> Result<SampleTotals, MapsError> {
        let sum = |map: &PerCpuArray<MapData, u64>, name| {
            map.get(&0, 0)
                .map(|values| values.iter().sum::<u64>())
                .map_err(|source| MapsError::Map { name, source })
        };
        Ok(SampleTotals {
            captured: sum(&self.captured, maps::SAMPLES_CAPTURED)?,
            lost: sum(&self.lost, maps::SAMPLES_LOST)?,
        })
    }
}

/// Unread bytes at which the kernel wakes the reader early: a quarter of the ring, so
/// that a burst between two polls still finds three quarters free. At least one
/// sample, so that a tiny ring still wakes it.
fn wakeup_bytes(ring_bytes: u32) -> u32 {
    (ring_bytes / 4).max(SAMPLE_RING_BYTES)
}

/// The sample ring and the flag by which the daemon asks the kernel to wake it.
pub struct SampleRing {
    pub ring: RingBuf<MapData>,
    pub reader: ReaderFlag,
}

impl SampleRing {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            ring: take(ebpf, maps::SAMPLES)?,
            reader: ReaderFlag {
                map: take(ebpf, maps::CAPTURE_READER)?,
                warned: false,
            },
        })
    }
}

/// Whether the daemon polls the ring (`READER_POLLING`) or sleeps until the kernel
/// wakes it with the next sample (`READER_PARKED`).
pub struct ReaderFlag {
    map: Array<MapData, u32>,
    warned: bool,
}

impl ReaderFlag {
    /// Tells the kernel whether the next sample must wake the reader.
    pub fn set_parked(&mut self, parked: bool) -> Result<(), MapsError> {
        let state = if parked {
            READER_PARKED
        } else {
            READER_POLLING
        };
        self.map.set(0, state, 0).map_err(Self::error)
    }

    /// Whether the reader is parked: the kernel sets it back as it wakes it.
    pub fn parked(&self) -> Result<bool, MapsError> {
        self.map
            .get(&0, 0)
            .map(|state| state == READER_PARKED)
            .map_err(Self::error)
    }

    fn error(source: aya::maps::MapError) -> MapsError {
        MapsError::Map {
            name: maps::CAPTURE_READER,
            source,
        }
    }

    /// Parks the reader of `ring` unless a sample is already on its way; false: keep
    /// polling (a sample is coming, or the flag cannot be written, which short of the
    /// map vanishing cannot happen: then it warns once).
    fn park(&mut self, ring: BorrowedFd<'_>) -> bool {
        if let Err(error) = self.set_parked(true) {
            if !std::mem::replace(&mut self.warned, true) {
                warn!(%error, "Cannot ask the kernel for wake-ups; polling on");
            }
            return false;
        }
        // The kernel reads the flag between reserving a sample and committing it: one
        // reserved before the flag was set wakes nobody. The ring's poll counts
        // reserved bytes, committed or not.
        if reserved_bytes_pending(ring) {
            self.unpark();
            return false;
        }
        true
    }

    /// Back to polling, when the reader took samples without the kernel waking it
    /// (which sets the flag back itself).
    fn unpark(&mut self) {
        if let Err(error) = self.set_parked(false)
            && !std::mem::replace(&mut self.warned, true)
        {
            // Harmless: the next sample wakes the reader once more.
            warn!(%error, "Cannot tell the kernel the reader polls again");
        }
    }
}

/// Whether the ring holds bytes not consumed yet (reserved, committed or not). An
/// error counts as yes: the caller then keeps polling.
fn reserved_bytes_pending(ring: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(ring, PollFlags::POLLIN)];
    !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

/// Records handed over between two looks at the clock, at most.
const BATCH: usize = 1024;
/// Empty drains in a row after which the reader parks: a trickle of samples keeps it
/// on the timer instead of paying a forced wake-up and a park per sample.
const PARK_AFTER_EMPTY_DRAINS: u32 = 5;
/// While parked, the ring is still looked at this often (or at the poll interval, if
/// longer): the bound on the delay of a sample whose wake-up a race took away.
const PARKED_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// How often the sink is told time passed with nothing new (idle flows end).
const IDLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Who consumes samples as the ring yields them.
pub trait SampleSink {
    /// One segment, borrowed from the ring for the duration of the call.
    fn segment(&mut self, segment: &Segment<'_>);
    /// The end of a batch of segments (at most `BATCH`).
    fn batch_done(&mut self);
    /// A second passed (with or without traffic).
    fn idle(&mut self);
}

/// Drains the ring buffer straight into `sink`: no copy, no queue. Ends only if the
/// ring cannot be polled.
///
/// While samples flow, the ring is drained every `poll_interval` (the kernel wakes the
/// reader early only when a quarter of the ring is unread): one wake-up per batch, not
/// per sample. After `PARK_AFTER_EMPTY_DRAINS` empty drains the reader parks: the
/// kernel wakes it with the next sample, and until then it looks only every
/// `PARKED_POLL_INTERVAL`. A quiet daemon's thread then wakes about 20 times a second
/// for this (measured: tokio's timer wheel wakes once to move a 100 ms timer down a
/// level, then at its deadline) instead of 500 (on a busy two-CPU host, those 500
/// cost the workload about 4 % of its throughput), and the first request after a
/// quiet spell is read as it arrives rather than at the next tick.
pub async fn read_samples(
    ring: SampleRing,
    poll_interval: std::time::Duration,
    sink: &mut impl SampleSink,
) {
    let SampleRing { ring, mut reader } = ring;
    let fd = ring.as_raw_fd();
    // SAFETY: `ring` owns the fd, and the AsyncFd owns `ring` for as long as it exists.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(error) => {
            warn!(%error, fd, "Sample ring buffer cannot be polled; no HTTP capture");
            return;
        }
    };
    let interval = |period| {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    };
    let mut tick = interval(poll_interval);
    let mut parked_tick = interval(PARKED_POLL_INTERVAL.max(poll_interval));
    let mut idle = interval(IDLE_INTERVAL);
    let mut parked = false;
    let mut empty_drains = 0;
    loop {
        let (taken, woken) = tokio::select! {
            readable = ring.readable_mut() => match readable {
                Ok(mut guard) => {
                    let taken = drain(guard.get_inner_mut(), sink).await;
                    guard.clear_ready();
                    (taken, true)
                }
                Err(error) => {
                    warn!(%error, "Sample ring buffer polling failed; no HTTP capture");
                    return;
                }
            },
            _ = tick.tick(), if !parked => (drain(ring.get_mut(), sink).await, false),
            _ = parked_tick.tick(), if parked => (drain(ring.get_mut(), sink).await, false),
            _ = idle.tick() => {
                sink.idle();
                continue;
            }
        };
        if taken > 0 {
            empty_drains = 0;
            if parked {
                parked = false;
                if !woken {
                    reader.unpark();
                }
                tick.reset();
            }
        } else if !parked {
            empty_drains += 1;
            if empty_drains >= PARK_AFTER_EMPTY_DRAINS {
                empty_drains = 0;
                parked = reader.park(ring.get_ref().as_fd());
                parked_tick.reset();
            }
        }
    }
}

/// Hands everything in the ring to the sink, yielding between batches so that the
/// control socket and metrics stay responsive under load.
async fn drain(ring: &mut RingBuf<MapData>, sink: &mut impl SampleSink) -> usize {
    let mut total = 0;
    loop {
        let mut taken = 0;
        while taken < BATCH {
            let Some(record) = ring.next() else {
                break;
            };
            taken += 1;
            match decode(&record) {
                Ok(segment) => sink.segment(&segment),
                Err(error) => warn!(%error, "Dropped an undecodable sample"),
            }
        }
        total += taken;
        if taken > 0 {
            sink.batch_done();
        }
        if taken < BATCH {
            return total;
        }
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::capture::TCP_FIN;

    use super::*;

    fn record(header: SampleHeader, data: &[u8]) -> Vec<u8> {
        let mut sample = Sample {
            header,
            data: [0; SAMPLE_DATA_LEN],
        };
        sample.data[..data.len()].copy_from_slice(data);
        // SAFETY: Sample is repr(C) plain old data.
        unsafe { std::slice::from_raw_parts((&raw const sample).cast::<u8>(), size_of::<Sample>()) }
            .to_vec()
    }

    #[test]
    fn samples_decode_to_segments() {
        let mut client = [0u8; 16];
        client[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 2]);
        let header = SampleHeader {
            timestamp_ns: 42,
            client_addr: client,
            server_addr: "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets(),
            client_port: 40000,
            server_port: 8080,
            ifindex: 3,
            seq: 1000,
            segment_len: 14,
            data_len: 14,
            direction: DIRECTION_REQUEST,
            tcp_flags: TCP_FIN,
            _pad: 0,
        };
        let record = record(header, b"GET / HTTP/1.1");
        let segment = decode(&record).unwrap();
        assert_eq!(segment.data, b"GET / HTTP/1.1");
        assert_eq!(segment.client, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(segment.server, "[2001:db8::1]:8080".parse().unwrap());
        assert_eq!(
            (segment.seq, segment.flags, segment.direction),
            (1000, TCP_FIN, Direction::Request)
        );
    }

    #[test]
    fn the_kernel_wakes_the_reader_at_a_quarter_of_the_ring() {
        assert_eq!(wakeup_bytes(16 << 20), 4 << 20);
        // A ring too small for a quarter to hold a sample wakes at every sample.
        assert_eq!(wakeup_bytes(4096), SAMPLE_RING_BYTES);
    }

    #[test]
    fn bad_records_are_errors() {
        let error = |record: &[u8]| decode(record).map(|_| ()).unwrap_err();
        assert_eq!(error(&[0; 10]), DecodeError::Size(10));
        let header = SampleHeader {
            data_len: 5000,
            ..SampleHeader::default()
        };
        assert_eq!(error(&record(header, b"")), DecodeError::DataLen(5000));
        let header = SampleHeader {
            direction: 9,
            ..SampleHeader::default()
        };
        assert_eq!(error(&record(header, b"")), DecodeError::Direction(9));
    }
}
