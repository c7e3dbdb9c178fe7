//! The daemon's side of payload capture: configuring what the kernel captures,
//! draining the sample ring buffers (one per direction) and decoding samples into segments.

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
        READER_POLLING, SAMPLE_DATA_LEN, SAMPLE_RING_BYTES, SampleHeader,
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
    #[error("sample of {0} bytes, shorter than its {header} byte header", header = size_of::<SampleHeader>())]
    Size(usize),
    #[error(
        "sample claims {claimed} data bytes, carries {carried} (at most {SAMPLE_DATA_LEN} fit)"
    )]
    DataLen { claimed: usize, carried: usize },
    #[error("unknown direction {0}")]
    Direction(u8),
}

/// Decodes one ring buffer record; the segment's payload stays in the record.
pub fn decode(record: &[u8]) -> Result<Segment<'_>, DecodeError> {
    if record.len() < size_of::<SampleHeader>() {
        return Err(DecodeError::Size(record.len()));
    }
    // SAFETY: `record` holds at least a `SampleHeader`, which is plain old data;
    // the read is unaligned-safe.
    let header: SampleHeader = unsafe { record.as_ptr().cast::<SampleHeader>().read_unaligned() };
    let data_len = usize::from(header.data_len);
    // Records are as long as their data; longer ones (a program that wrote fixed-size
    // records) decode too.
    let carried = record.len() - size_of::<SampleHeader>();
    if data_len > SAMPLE_DATA_LEN || data_len > carried {
        return Err(DecodeError::DataLen {
            claimed: data_len,
            carried,
        });
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

/// Unread bytes at which the kernel wakes the reader early: a quarter of a ring, so
/// that a burst between two polls still finds three quarters free. At least one
/// sample, so that a tiny ring still wakes it.
fn wakeup_bytes(ring_bytes: u32) -> u32 {
    (ring_bytes / 4).max(SAMPLE_RING_BYTES)
}

/// The sample rings (one per direction) and the flag by which the daemon asks the
/// kernel to wake it.
pub struct SampleRings {
    pub requests: SampleRing,
    pub responses: SampleRing,
    pub reader: ReaderFlag,
}

impl SampleRings {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            requests: SampleRing::take(ebpf, maps::REQUEST_SAMPLES)?,
            responses: SampleRing::take(ebpf, maps::RESPONSE_SAMPLES)?,
            reader: ReaderFlag {
                map: take(ebpf, maps::CAPTURE_READER)?,
                warned: false,
            },
        })
    }
}

/// One direction's ring: aya's reader, and what aya does not tell, whether the ring
/// holds bytes not consumed yet. aya reads a ring whose next record is still being
/// written as empty; merging two rings in time order must tell the two apart.
pub struct SampleRing {
    ring: RingBuf<MapData>,
    positions: std::sync::Arc<RingPositions>,
}

impl SampleRing {
    fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, MapsError> {
        let ring: RingBuf<MapData> = take(ebpf, name)?;
        let positions = RingPositions::map(ring.as_fd()).map_err(|source| MapsError::Map {
            name,
            source: aya::maps::MapError::SyscallError(source),
        })?;
        Ok(Self {
            ring,
            positions: std::sync::Arc::new(positions),
        })
    }
}

impl std::os::fd::AsFd for SampleRing {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl std::os::fd::AsRawFd for SampleRing {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// A read-only mapping of a ring's first two pages: the position up to which the
/// daemon consumed (aya publishes it at each record) and up to which the kernel
/// reserved. Read with relaxed loads (the memory is read-only); the ring's own read
/// that follows orders what matters.
pub struct RingPositions {
    pages: std::ptr::NonNull<std::ffi::c_void>,
    page_size: usize,
}

// SAFETY: the mapping belongs to this value alone and is only read, through atomics.
unsafe impl Send for RingPositions {}
// SAFETY: as above.
unsafe impl Sync for RingPositions {}

impl RingPositions {
    fn map(ring: BorrowedFd<'_>) -> Result<Self, aya::sys::SyscallError> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap};
        let failed = |call| {
            move |errno: nix::Error| aya::sys::SyscallError {
                call,
                io_error: errno.into(),
            }
        };
        let page_size = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .map_err(failed("sysconf"))?
            .and_then(|size| usize::try_from(size).ok())
            .ok_or(nix::Error::EINVAL)
            .map_err(failed("sysconf"))?;
        let length = std::num::NonZeroUsize::new(2 * page_size)
            .ok_or(nix::Error::EINVAL)
            .map_err(failed("mmap"))?;
        // SAFETY: a new shared read-only mapping of the ring's position pages, which the
        // kernel allows; nothing else refers to the address it returns.
        let pages = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                ring,
                0,
            )
        }
        .map_err(failed("mmap"))?;
        Ok(Self { pages, page_size })
    }

    fn load(&self, offset: usize) -> usize {
        // SAFETY: `offset` is 0 or one page, within the mapping; both positions are
        // page-aligned words the kernel and aya write atomically.
        let position = unsafe {
            &*self
                .pages
                .as_ptr()
                .cast::<u8>()
                .add(offset)
                .cast::<std::sync::atomic::AtomicUsize>()
        };
        position.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RingPositions {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this length, unmapped once.
        let _ = unsafe { nix::sys::mman::munmap(self.pages, 2 * self.page_size) };
    }
}

impl Positions for RingPositions {
    fn reserved(&self) -> usize {
        self.load(self.page_size)
    }

    fn consumed(&self, mark: usize) -> bool {
        // Positions only grow (and would wrap): compare their distance.
        (mark.wrapping_sub(self.load(0)) as isize) <= 0
    }
}

/// Whether the daemon polls the rings (`READER_POLLING`) or sleeps until the kernel
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

    /// Parks the reader of `rings` unless a sample is already on its way; false: keep
    /// polling (a sample is coming, or the flag cannot be written, which short of the
    /// map vanishing cannot happen: then it warns once).
    fn park(&mut self, rings: [BorrowedFd<'_>; 2]) -> bool {
        if let Err(error) = self.set_parked(true) {
            if !std::mem::replace(&mut self.warned, true) {
                warn!(%error, "Cannot ask the kernel for wake-ups; polling on");
            }
            return false;
        }
        // The kernel looks at the flag again after committing a sample that woke
        // nobody: one it committed before the flag was set is what this poll finds
        // (each ring's poll counts reserved bytes, committed or not). The fence orders
        // the flag's store (in the map update) before the poll's reads.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if reserved_bytes_pending(rings) {
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

/// Whether either ring holds bytes not consumed yet (reserved, committed or not). An
/// error counts as yes: the caller then keeps polling.
fn reserved_bytes_pending(rings: [BorrowedFd<'_>; 2]) -> bool {
    let mut fds = rings.map(|ring| PollFd::new(ring, PollFlags::POLLIN));
    !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

/// Records handed over between two looks at the clock, at most.
const BATCH: usize = 1024;
/// Empty drains in a row after which the reader parks: a trickle of samples keeps it
/// on the timer instead of paying a forced wake-up and a park per sample.
const PARK_AFTER_EMPTY_DRAINS: u32 = 5;
/// While parked, the rings are still looked at this often (or at the poll interval, if
/// longer): the bound on the delay of a sample whose wake-up a race took away.
const PARKED_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// How often the sink is told time passed with nothing new (idle flows end).
const IDLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Who consumes samples as the rings yield them.
pub trait SampleSink {
    /// One segment, borrowed from its ring for the duration of the call.
    fn segment(&mut self, segment: &Segment<'_>);
    /// The end of a batch of segments (at most `BATCH`).
    fn batch_done(&mut self);
    /// A second passed (with or without traffic).
    fn idle(&mut self);
}

/// Drains the two sample rings straight into `sink`, in time order: no copy, no
/// queue. Ends only if a ring cannot be polled.
///
/// While samples flow, the rings are drained every `poll_interval` (the kernel wakes
/// the reader early only when a quarter of a ring is unread): one wake-up per batch, not
/// per sample. After `PARK_AFTER_EMPTY_DRAINS` empty drains the reader parks: the
/// kernel wakes it with the next sample, and until then it looks only every
/// `PARKED_POLL_INTERVAL`. A quiet daemon's thread then wakes about 20 times a second
/// for this (measured: tokio's timer wheel wakes once to move a 100 ms timer down a
/// level, then at its deadline) instead of 500 (on a busy two-CPU host, those 500
/// cost the workload about 4 % of its throughput), and the first request after a
/// quiet spell is read as it arrives rather than at the next tick.
pub async fn read_samples(
    rings: SampleRings,
    poll_interval: std::time::Duration,
    sink: &mut impl SampleSink,
) {
    let SampleRings {
        requests,
        responses,
        mut reader,
    } = rings;
    let register = |ring: SampleRing| {
        let fd = ring.as_raw_fd();
        // SAFETY: `ring` owns the fd, and the AsyncFd owns `ring` for as long as it
        // exists.
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }.map_err(
            |error| warn!(%error, fd, "Sample ring buffer cannot be polled; no HTTP capture"),
        )
    };
    let (Ok(mut requests), Ok(mut responses)) = (register(requests), register(responses)) else {
        return;
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
        // Readiness is cleared before draining: a wake-up during the drain is not lost.
        let woken = tokio::select! {
            readable = requests.readable_mut() => readable.map(cleared),
            readable = responses.readable_mut() => readable.map(cleared),
            _ = tick.tick(), if !parked => Ok(false),
            _ = parked_tick.tick(), if parked => Ok(false),
            _ = idle.tick() => {
                sink.idle();
                continue;
            }
        };
        let woken = match woken {
            Ok(woken) => woken,
            Err(error) => {
                warn!(%error, "Sample ring buffer polling failed; no HTTP capture");
                return;
            }
        };
        let taken = drain(requests.get_mut(), responses.get_mut(), sink).await;
        if parked && (woken || taken > 0) {
            // Woken, the kernel set the flag back to polling itself (even if the sample
            // was not readable yet); found by the parked look, the reader sets it.
            parked = false;
            if !woken {
                reader.unpark();
            }
            tick.reset();
        }
        if taken > 0 {
            empty_drains = 0;
        } else if !parked && !woken {
            // (An empty drain right after a wake-up is the other ring's readiness,
            // cleared by the drain before: it says nothing about a quiet spell.)
            empty_drains += 1;
            if empty_drains >= PARK_AFTER_EMPTY_DRAINS {
                empty_drains = 0;
                parked = reader.park([requests.get_ref().as_fd(), responses.get_ref().as_fd()]);
                parked_tick.reset();
            }
        }
    }
}

/// Clears a ring's readiness; true: the kernel woke the reader.
fn cleared(mut guard: tokio::io::unix::AsyncFdReadyMutGuard<'_, SampleRing>) -> bool {
    guard.clear_ready();
    true
}

/// A ring of records, each consumed once read and dropped.
pub trait RecordRing {
    type Record<'a>: std::ops::Deref<Target = [u8]>
    where
        Self: 'a;
    type Positions: Positions;
    /// The next committed record: None if the ring is empty, or if its next record is
    /// still being written.
    fn next_record(&mut self) -> Option<Self::Record<'_>>;
    /// What tells those two apart, without borrowing the ring.
    fn positions(&self) -> Self::Positions;
}

/// Where a ring's writers and its reader are, in bytes since the ring was made.
pub trait Positions {
    /// Up to where records were reserved (committed or not).
    fn reserved(&self) -> usize;
    /// Whether everything reserved up to `mark` was consumed.
    fn consumed(&self, mark: usize) -> bool;
}

impl<T: Positions> Positions for std::sync::Arc<T> {
    fn reserved(&self) -> usize {
        T::reserved(self)
    }

    fn consumed(&self, mark: usize) -> bool {
        T::consumed(self, mark)
    }
}

impl RecordRing for SampleRing {
    type Record<'a> = aya::maps::ring_buf::RingBufItem<'a>;
    type Positions = std::sync::Arc<RingPositions>;

    fn next_record(&mut self) -> Option<Self::Record<'_>> {
        self.ring.next()
    }

    fn positions(&self) -> Self::Positions {
        self.positions.clone()
    }
}

/// Reads of a ring whose next record is still being written, at most, before the merge
/// goes on without it (a read and a spin-loop hint take some tens of ns, so about a
/// tenth of a millisecond; not timed). A record takes a few hundred ns to write; one
/// whose writer was interrupted, or whose vCPU the host took away, for longer is
/// handed over in the order it is read in, and the merge does not wait on that ring
/// again until the next batch.
const BUSY_READS: u32 = 4096;

/// The kernel timestamp of a record (0 for one too short to be a sample: handed on,
/// and reported, at once).
fn timestamp(record: &[u8]) -> u64 {
    const AT: usize = std::mem::offset_of!(SampleHeader, timestamp_ns);
    record
        .get(AT..AT + size_of::<u64>())
        .and_then(|bytes| bytes.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

/// Hands everything in the two rings to the sink, merged in time order, in batches of
/// `BATCH` with a yield between them so that the control socket and metrics stay
/// responsive under load. Returns once both rings are empty at once (records read
/// are consumed, so the merge cannot stop while it holds one); a daemon that cannot
/// keep up goes on batch after batch, each batch's end ending idle connections.
///
/// Merged, not drained one after the other: a request must reach the pipeline before
/// its response, and a client's FIN sent after a response after that response.
/// Whatever one side sent in answer to the other was captured after what it answers,
/// and that was committed to its ring before the packet went on: once the answer is
/// read, what it answers is in the other ring. So a ring found empty is read again
/// after the other ring's record was, and one whose next record is still being
/// written is waited for (up to `BUSY_READS`). Timestamps order the rest: the clock
/// is the same on every CPU, though within one ring, records written on two CPUs at
/// once may be out of order by up to the time a sample takes to copy (read before the
/// copy, the clock orders reservations only); each ring's own order is always kept.
async fn drain(
    requests: &mut impl RecordRing,
    responses: &mut impl RecordRing,
    sink: &mut impl SampleSink,
) -> usize {
    // Reads `$ring` into the empty `$slot` again (moved out before each read: it still
    // holds the ring's loan), waiting while a record reserved by then is still being
    // written, unless this batch already gave up waiting on that ring.
    macro_rules! read_again {
        ($slot:ident, $ring:ident, $positions:ident, $gave_up:ident) => {
            // Only what was reserved by now can be what the other record answers.
            let mark = $positions.reserved();
            let mut reads = 0;
            loop {
                drop($slot);
                $slot = $ring.next_record();
                reads += 1;
                if $slot.is_some() || $gave_up || $positions.consumed(mark) {
                    break;
                }
                if reads == BUSY_READS {
                    $gave_up = true;
                    break;
                }
                std::hint::spin_loop();
            }
        };
    }
    let (requests_positions, responses_positions) = (requests.positions(), responses.positions());
    let (mut requests_gave_up, mut responses_gave_up) = (false, false);
    let (mut total, mut in_batch) = (0, 0);
    let mut request = requests.next_record();
    let mut response = responses.next_record();
    loop {
        if request.is_some() && response.is_none() {
            read_again!(response, responses, responses_positions, responses_gave_up);
        } else if request.is_none() && response.is_some() {
            read_again!(request, requests, requests_positions, requests_gave_up);
        }
        let request_first = match (&request, &response) {
            (Some(request), Some(response)) => timestamp(request) <= timestamp(response),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        // Moved into `hand_over`, which drops it: a ring is read again only once the
        // record it lent is consumed.
        if request_first {
            hand_over(request, sink);
            request = requests.next_record();
        } else {
            hand_over(response, sink);
            response = responses.next_record();
        }
        total += 1;
        in_batch += 1;
        if in_batch == BATCH {
            in_batch = 0;
            // A drain under overload never ends: giving up lasts one batch.
            (requests_gave_up, responses_gave_up) = (false, false);
            sink.batch_done();
            tokio::task::yield_now().await;
        }
    }
    if in_batch > 0 {
        sink.batch_done();
    }
    total
}

fn hand_over<R: std::ops::Deref<Target = [u8]>>(record: Option<R>, sink: &mut impl SampleSink) {
    match record.as_deref().map(decode) {
        Some(Ok(segment)) => sink.segment(&segment),
        Some(Err(error)) => warn!(%error, "Dropped an undecodable sample"),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use monitor_common::capture::TCP_FIN;

    use super::*;

    /// A record as the kernel writes it: the header, then the data.
    fn record(header: SampleHeader, data: &[u8]) -> Vec<u8> {
        // SAFETY: SampleHeader is repr(C) plain old data without padding.
        let mut record = unsafe {
            std::slice::from_raw_parts((&raw const header).cast::<u8>(), size_of::<SampleHeader>())
        }
        .to_vec();
        record.extend_from_slice(data);
        record
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

    /// A test ring's records, and how many were ever written and read (its positions).
    #[derive(Default)]
    struct Queue {
        records: std::collections::VecDeque<Vec<u8>>,
        written: usize,
        read: usize,
    }

    impl Queue {
        fn push(&mut self, record: Vec<u8>) {
            self.records.push_back(record);
            self.written += 1;
        }
    }

    type Records = std::rc::Rc<std::cell::RefCell<Queue>>;

    /// A ring in a test, and what the kernel commits to the other ring while the
    /// daemon drains: each `(timestamp, other ring, record)` reaches that ring just
    /// before this ring's record with that timestamp is read.
    struct TestRing {
        records: Records,
        commits_before: Vec<(u64, Records, Vec<u8>)>,
        /// Reads still to find the next record being written.
        busy_reads: u32,
        /// Reads so far.
        reads: usize,
        /// A record whose writer reserves it (and is held up) as this read starts.
        reserved_at_read: Option<(usize, Vec<u8>)>,
    }

    impl TestRing {
        fn new(direction: u8, timestamps: &[u64]) -> Self {
            let mut queue = Queue::default();
            for &timestamp in timestamps {
                queue.push(sample(direction, timestamp));
            }
            Self {
                records: std::rc::Rc::new(std::cell::RefCell::new(queue)),
                commits_before: Vec::new(),
                busy_reads: 0,
                reads: 0,
                reserved_at_read: None,
            }
        }

        fn is_empty(&self) -> bool {
            self.records.borrow().records.is_empty()
        }
    }

    impl Positions for Records {
        fn reserved(&self) -> usize {
            self.borrow().written
        }

        fn consumed(&self, mark: usize) -> bool {
            self.borrow().read >= mark
        }
    }

    impl RecordRing for TestRing {
        type Record<'a> = Vec<u8>;
        type Positions = Records;

        fn positions(&self) -> Records {
            self.records.clone()
        }

        fn next_record(&mut self) -> Option<Vec<u8>> {
            self.reads += 1;
            if let Some((_, record)) = self
                .reserved_at_read
                .take_if(|(read, _)| *read == self.reads)
            {
                self.records.borrow_mut().push(record);
                self.busy_reads = u32::MAX;
            }
            if self.busy_reads > 0 && !self.is_empty() {
                self.busy_reads -= 1;
                return None;
            }
            let next = {
                let mut queue = self.records.borrow_mut();
                let next = queue.records.pop_front()?;
                queue.read += 1;
                next
            };
            for (at, ring, record) in &self.commits_before {
                if *at == timestamp(&next) {
                    ring.borrow_mut().push(record.clone());
                }
            }
            Some(next)
        }
    }

    fn sample(direction: u8, timestamp_ns: u64) -> Vec<u8> {
        let header = SampleHeader {
            timestamp_ns,
            direction,
            ..SampleHeader::default()
        };
        record(header, b"")
    }

    /// Remembers what it was handed: (direction, timestamp), and how many batches.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<(Direction, u64)>,
        batches: usize,
    }

    impl SampleSink for Recorder {
        fn segment(&mut self, segment: &Segment<'_>) {
            self.seen.push((segment.direction, segment.timestamp_ns));
        }
        fn batch_done(&mut self) {
            self.batches += 1;
        }
        fn idle(&mut self) {}
    }

    use Direction::{Request as Req, Response as Resp};

    #[tokio::test]
    async fn the_two_rings_reach_the_pipeline_in_time_order() {
        let mut requests = TestRing::new(DIRECTION_REQUEST, &[1, 4, 5, 9]);
        let mut responses = TestRing::new(DIRECTION_RESPONSE, &[2, 3, 5, 6]);
        let mut sink = Recorder::default();
        assert_eq!(drain(&mut requests, &mut responses, &mut sink).await, 8);
        assert_eq!(
            sink.seen,
            [
                (Req, 1),
                (Resp, 2),
                (Resp, 3),
                (Req, 4),
                // A tie goes to the request: the kernel saw it first or at once.
                (Req, 5),
                (Resp, 5),
                (Resp, 6),
                (Req, 9)
            ]
        );
        assert!(requests.is_empty() && responses.is_empty());
        assert_eq!(sink.batches, 1);
    }

    #[tokio::test]
    async fn a_request_committed_while_its_response_is_read_goes_first() {
        // The request ring is empty when first read; the request (10) is committed,
        // answered, and its response (20) committed before the response ring is read.
        // Then the client's FIN (30) reaches the request ring before the server's (40).
        let mut requests = TestRing::new(DIRECTION_REQUEST, &[]);
        let mut responses = TestRing::new(DIRECTION_RESPONSE, &[20, 40]);
        responses.commits_before = vec![
            (20, requests.records.clone(), sample(DIRECTION_REQUEST, 10)),
            (40, requests.records.clone(), sample(DIRECTION_REQUEST, 30)),
        ];
        let mut sink = Recorder::default();
        assert_eq!(drain(&mut requests, &mut responses, &mut sink).await, 4);
        assert_eq!(sink.seen, [(Req, 10), (Resp, 20), (Req, 30), (Resp, 40)]);
    }

    #[tokio::test]
    async fn batches_are_handed_over_whole_and_nothing_is_lost() {
        let many: Vec<u64> = (0..BATCH as u64 + 10).collect();
        let mut requests = TestRing::new(DIRECTION_REQUEST, &many);
        let mut responses = TestRing::new(DIRECTION_RESPONSE, &many);
        let mut sink = Recorder::default();
        let total = drain(&mut requests, &mut responses, &mut sink).await;
        assert_eq!(total, 2 * many.len());
        assert_eq!(sink.seen.len(), total);
        // Two full batches and the rest.
        assert_eq!(sink.batches, 3);
        // Each ring's records in their order, none twice.
        for direction in [Req, Resp] {
            let order: Vec<u64> = sink
                .seen
                .iter()
                .filter(|(d, _)| *d == direction)
                .map(|(_, t)| *t)
                .collect();
            assert_eq!(order, many);
        }
    }

    #[tokio::test]
    async fn a_record_still_being_written_is_waited_for() {
        // The request (10) is committed behind one another CPU is still writing; its
        // response (20) is read meanwhile.
        let mut requests = TestRing::new(DIRECTION_REQUEST, &[10]);
        requests.busy_reads = 3;
        let mut responses = TestRing::new(DIRECTION_RESPONSE, &[20]);
        let mut sink = Recorder::default();
        assert_eq!(drain(&mut requests, &mut responses, &mut sink).await, 2);
        assert_eq!(sink.seen, [(Req, 10), (Resp, 20)]);
    }

    #[tokio::test]
    async fn a_writer_gone_for_long_is_waited_for_once_per_batch() {
        let mut requests = TestRing::new(DIRECTION_REQUEST, &[10]);
        requests.busy_reads = u32::MAX;
        let mut responses = TestRing::new(DIRECTION_RESPONSE, &[20, 30, 40]);
        let mut sink = Recorder::default();
        assert_eq!(drain(&mut requests, &mut responses, &mut sink).await, 3);
        assert_eq!(sink.seen, [(Resp, 20), (Resp, 30), (Resp, 40)]);
        // The first read, the wait before the first response, one look before each of
        // the two others.
        assert_eq!(requests.reads, 1 + BUSY_READS as usize + 2);
        // The next drain finds it written.
        requests.busy_reads = 0;
        assert_eq!(drain(&mut requests, &mut responses, &mut sink).await, 1);
        assert_eq!(sink.seen.last(), Some(&(Req, 10)));
    }

    #[tokio::test]
    async fn giving_up_on_a_writer_lasts_one_batch() {
        let mut requests = TestRing::new(DIRECTION_REQUEST, &[10]);
        requests.busy_reads = u32::MAX;
        let many: Vec<u64> = (20..20 + BATCH as u64 + 2).collect();
        let mut responses = TestRing::new(DIRECTION_RESPONSE, &many);
        let mut sink = Recorder::default();
        assert_eq!(
            drain(&mut requests, &mut responses, &mut sink).await,
            many.len()
        );
        // The first read; a wait and a look before each other response of the first
        // batch; a wait again in the second batch, and one look.
        assert_eq!(
            requests.reads,
            1 + BUSY_READS as usize + (BATCH - 1) + BUSY_READS as usize + 1
        );
    }

    #[tokio::test]
    async fn records_reserved_after_the_look_are_not_waited_for() {
        // Holding a request, the merge looks at the empty response ring again; a
        // response is reserved just then, and its writer is held up. It cannot answer
        // the request held (nothing was reserved when the merge looked), so the
        // request goes on at once.
        let mut requests = TestRing::new(DIRECTION_REQUEST, &[10]);
        let mut responses = TestRing::new(DIRECTION_RESPONSE, &[]);
        responses.reserved_at_read = Some((2, sample(DIRECTION_RESPONSE, 30)));
        let mut sink = Recorder::default();
        assert_eq!(drain(&mut requests, &mut responses, &mut sink).await, 1);
        assert_eq!(sink.seen, [(Req, 10)]);
        // The first read, and one look while holding the request.
        assert_eq!(responses.reads, 2);
    }

    #[tokio::test]
    async fn an_undecodable_record_is_consumed_and_the_rest_follows() {
        // Too short to hold a timestamp: consumed and reported, and the rest follows.
        let mut requests = TestRing::new(DIRECTION_REQUEST, &[3]);
        requests.records.borrow_mut().push(vec![0; 4]);
        let mut responses = TestRing::new(DIRECTION_RESPONSE, &[1, 4]);
        let mut sink = Recorder::default();
        assert_eq!(drain(&mut requests, &mut responses, &mut sink).await, 4);
        assert_eq!(sink.seen, [(Resp, 1), (Req, 3), (Resp, 4)]);
        assert!(requests.is_empty());
    }

    #[test]
    fn the_kernel_wakes_the_reader_at_a_quarter_of_the_ring() {
        assert_eq!(wakeup_bytes(16 << 20), 4 << 20);
        // A ring too small for a quarter to hold a sample wakes at every sample.
        assert_eq!(wakeup_bytes(4096), SAMPLE_RING_BYTES);
    }

    #[test]
    fn a_record_is_as_long_as_its_data_and_longer_ones_decode_too() {
        let header = SampleHeader {
            data_len: 3,
            ..SampleHeader::default()
        };
        for padding in [0, 5] {
            let mut bytes = record(header, b"GET");
            bytes.resize(bytes.len() + padding, 0xaa);
            assert_eq!(decode(&bytes).unwrap().data, b"GET");
        }
        // Header-only records (a connection's end) carry no data.
        let header = SampleHeader::default();
        assert_eq!(decode(&record(header, b"")).unwrap().data, b"");
    }

    #[test]
    fn bad_records_are_errors() {
        let error = |record: &[u8]| decode(record).map(|_| ()).unwrap_err();
        assert_eq!(error(&[0; 10]), DecodeError::Size(10));
        let claiming = |claimed: u16, carried: &[u8]| {
            let header = SampleHeader {
                data_len: claimed,
                ..SampleHeader::default()
            };
            error(&record(header, carried))
        };
        let data_len = |claimed, carried| DecodeError::DataLen { claimed, carried };
        // More than a sample holds, even if the record carries it.
        assert_eq!(claiming(5000, &[0; 5000]), data_len(5000, 5000));
        // More than the record carries.
        assert_eq!(claiming(3, b"ab"), data_len(3, 2));
        let header = SampleHeader {
            direction: 9,
            ..SampleHeader::default()
        };
        assert_eq!(error(&record(header, b"")), DecodeError::Direction(9));
    }
}
