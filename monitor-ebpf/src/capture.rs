//! HTTP payload capture: segments to and from the monitored server ports go to the
//! daemon through one ring buffer per direction, bounded per message by a budget the
//! kernel keeps per connection.

use core::mem::size_of;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, xdp_md},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use monitor_common::{
    capture::{
        CaptureConfig, DIRECTION_REQUEST, FlowBudget, FlowKey, PORT_BITMAP_WORDS, READER_PARKED,
        READER_POLLING, SAMPLE_DATA_LEN, Sample, SampleHeader, TCP_FIN, TCP_RST, TCP_SYN,
        sample_ring_bytes, starts_request, starts_response,
    },
    datapath::IpKey,
    maps::{DEFAULT_CAPTURE_FLOWS, DEFAULT_SAMPLES_RING_BYTES},
};

use crate::packet::Tcp;

// One ring per direction: requests are captured on the CPUs that receive, responses
// on those that send, and a shared ring's producer lock and position would bounce
// between them on every packet.
#[map]
static REQUEST_SAMPLES: RingBuf = RingBuf::with_byte_size(DEFAULT_SAMPLES_RING_BYTES, 0);
#[map]
static RESPONSE_SAMPLES: RingBuf = RingBuf::with_byte_size(DEFAULT_SAMPLES_RING_BYTES, 0);
/// Where each CPU assembles a sample before it goes to its ring: one per direction,
/// so that a program capturing requests never shares one with a program capturing
/// responses on the same CPU.
#[map]
static SCRATCH: PerCpuArray<Sample> = PerCpuArray::with_max_entries(2, 0);
#[map]
static SAMPLES_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SAMPLES_CAPTURED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
#[map]
static CAPTURE_CONFIG: Array<CaptureConfig> = Array::with_max_entries(1, 0);
#[map]
static CAPTURE_PORTS: Array<u32> = Array::with_max_entries(PORT_BITMAP_WORDS, 0);
#[map]
static CAPTURE_READER: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static CAPTURE_FLOWS: LruHashMap<FlowKey, FlowBudget> =
    LruHashMap::with_max_entries(DEFAULT_CAPTURE_FLOWS, 0);

/// Bytes of a new connection captured before any message start is seen.
const FIRST_BYTES: u32 = 64;

/// Samples one segment can yield (16 KiB): the default message budget of a GSO skb on
/// egress. Bytes beyond reach the daemon as a gap, like an exhausted budget. Each
/// iteration multiplies the verifier's work, so this stays small.
const MAX_SAMPLES_PER_SEGMENT: usize = 8;

/// Where payload bytes are copied from: XDP and TC have different helpers.
pub trait Payload {
    /// Copies `len` (1..=SAMPLE_DATA_LEN) bytes at `offset` from the frame start.
    fn copy(&self, offset: usize, dst: *mut u8, len: u32) -> bool;
    fn ifindex(&self) -> u32;
}

impl Payload for XdpContext {
    #[inline(always)]
    fn copy(&self, offset: usize, dst: *mut u8, len: u32) -> bool {
        let Some(len) = checked_copy_len(len) else {
            return false;
        };
        // SAFETY: `dst` has room for `len` bytes (checked by the caller and the verifier).
        unsafe {
            bpf_xdp_load_bytes(
                self.as_ptr().cast::<xdp_md>(),
                offset as u32,
                dst.cast(),
                len,
            ) == 0
        }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }
}

impl Payload for TcContext {
    #[inline(always)]
    fn copy(&self, offset: usize, dst: *mut u8, len: u32) -> bool {
        let Some(len) = checked_copy_len(len) else {
            return false;
        };
        // SAFETY: as above.
        unsafe {
            bpf_skb_load_bytes(self.as_ptr().cast_const(), offset as u32, dst.cast(), len) == 0
        }
    }

    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: the context is a valid __sk_buff.
        unsafe { (*self.skb.skb).ifindex }
    }
}

/// A segment between `client` and `server` (addresses IPv4-mapped for IPv4).
pub struct Segment<'a> {
    pub direction: u8,
    pub client: IpKey,
    pub server: IpKey,
    pub client_port: u16,
    pub server_port: u16,
    pub tcp: &'a Tcp,
}

/// The load helpers take a size the verifier must see as 1..=SAMPLE_DATA_LEN. LLVM
/// folds range checks into a test on a copy of the register, which the verifier cannot
/// follow; `((len - 1) & (SAMPLE_DATA_LEN - 1)) + 1` bounds the very register passed,
/// and is the identity on the valid range.
#[inline(always)]
fn checked_copy_len(len: u32) -> Option<u32> {
    if len == 0 || len > SAMPLE_DATA_LEN as u32 {
        return None;
    }
    Some(((len - 1) & (SAMPLE_DATA_LEN as u32 - 1)) + 1)
}

#[inline(always)]
fn port_monitored(port: u16) -> bool {
    CAPTURE_PORTS
        .get(u32::from(port) >> 5)
        .is_some_and(|word| word & (1 << (port & 31)) != 0)
}

#[inline(always)]
fn bump(counter: &PerCpuArray<u64>) {
    if let Some(value) = counter.get_ptr_mut(0) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe { *value += 1 };
    }
}

/// Captures what the budget allows of one segment. Never affects the packet's fate.
#[inline(always)]
pub fn capture<P: Payload>(ctx: &P, segment: &Segment<'_>) {
    if !port_monitored(segment.server_port) {
        return;
    }
    let Some(config) = CAPTURE_CONFIG.get(0) else {
        return;
    };
    if config.max_bytes_per_message == 0 {
        return;
    }
    let tcp = segment.tcp;
    let key = FlowKey {
        client_addr: segment.client,
        server_addr: segment.server,
        client_port: segment.client_port,
        server_port: segment.server_port,
    };
    if tcp.payload_len == 0 {
        if tcp.flags & TCP_SYN != 0 && segment.direction == DIRECTION_REQUEST {
            // A new connection: its first bytes are captured whatever they are, so the
            // daemon can tell TLS, HTTP/2 or garbage on a monitored port.
            let sniff = FlowBudget {
                request_left: FIRST_BYTES,
                response_left: FIRST_BYTES,
            };
            let _ = CAPTURE_FLOWS.insert(key, sniff, 0);
        } else if tcp.flags & (TCP_FIN | TCP_RST) != 0 && CAPTURE_FLOWS.get_ptr(key).is_some() {
            // Connection ends are worth telling the daemon, for connections it follows.
            emit(ctx, config, segment, 0, 0, 0);
        }
        return;
    }
    let mut head = [0u8; 4];
    let starts = tcp.payload_len >= 4
        && ctx.copy(tcp.payload_offset, head.as_mut_ptr(), 4)
        && if segment.direction == DIRECTION_REQUEST {
            starts_request(head)
        } else {
            starts_response(head)
        };
    let budget_ptr = match CAPTURE_FLOWS.get_ptr_mut(key) {
        Some(budget) => budget,
        None if starts => {
            let fresh = FlowBudget::default();
            if CAPTURE_FLOWS.insert(key, fresh, 0).is_err() {
                return;
            }
            match CAPTURE_FLOWS.get_ptr_mut(key) {
                Some(budget) => budget,
                None => return,
            }
        }
        // Mid-message on a connection we never saw a message start on.
        None => return,
    };
    // SAFETY: `budget_ptr` points at a map value; two CPUs racing on one connection
    // only mis-size one message's budget.
    let left = unsafe {
        let left = if segment.direction == DIRECTION_REQUEST {
            &mut (*budget_ptr).request_left
        } else {
            &mut (*budget_ptr).response_left
        };
        if starts {
            *left = config.max_bytes_per_message;
        }
        let take = (tcp.payload_len as u32).min(*left);
        *left -= take;
        take as usize
    };
    let mut done = 0;
    for _ in 0..MAX_SAMPLES_PER_SEGMENT {
        if done >= left {
            break;
        }
        let len = (left - done).min(SAMPLE_DATA_LEN);
        if !emit(ctx, config, segment, done, len, tcp.payload_len) {
            break;
        }
        done += len;
    }
    if done < tcp.payload_len && tcp.flags & (TCP_FIN | TCP_RST) != 0 {
        // The daemon learns where an uncaptured stream ended (exact body sizes).
        emit(ctx, config, segment, tcp.payload_len, 0, 0);
    }
}

/// Writes one sample: `len` payload bytes starting `skip` bytes into the segment.
/// False when the ring was full (counted) or the bytes were not there.
///
/// The sample is assembled in a per-CPU scratch buffer and copied into the ring at its
/// own size: a ring reservation's size must be a constant, and the largest sample is
/// ten times the usual one. Copying a few hundred hot bytes once more costs less than
/// writing records spread over ten times as many ring pages (measured under load, old
/// and new builds alternating: the capture programs 2–12 % faster in three runs, level
/// in a fourth; the daemon 13–14 % less CPU per sample in both runs that measured it).
#[inline(always)]
fn emit<P: Payload>(
    ctx: &P,
    config: &CaptureConfig,
    segment: &Segment<'_>,
    skip: usize,
    len: usize,
    segment_len: usize,
) -> bool {
    let ring = if segment.direction == DIRECTION_REQUEST {
        &REQUEST_SAMPLES
    } else {
        &RESPONSE_SAMPLES
    };
    // Precise time (not the coarse clock the datapath uses): request and response
    // timestamps give the latency, often well under a jiffy. Read before the record is
    // reserved (in the output below): whatever is reserved ahead of a request then has
    // an earlier time than that request's response, even if its writer is held up, and
    // the daemon merges the two rings by time.
    // SAFETY: helper without preconditions.
    let timestamp_ns = unsafe { bpf_ktime_get_ns() };
    let Some(sample) = SCRATCH.get_ptr_mut(u32::from(segment.direction)) else {
        return false;
    };
    let tcp = segment.tcp;
    // SAFETY: `sample` points at this CPU's scratch sample; the program runs to its
    // end on this CPU.
    unsafe {
        (*sample).header = SampleHeader {
            timestamp_ns,
            client_addr: segment.client,
            server_addr: segment.server,
            client_port: segment.client_port,
            server_port: segment.server_port,
            ifindex: ctx.ifindex(),
            seq: tcp.seq.wrapping_add(skip as u32),
            segment_len: segment_len as u32,
            data_len: len as u16,
            direction: segment.direction,
            tcp_flags: tcp.flags,
            _pad: 0,
        };
    }
    let mut data_len = 0;
    if len > 0 {
        let Some(len) = checked_copy_len(len as u32) else {
            return false;
        };
        // SAFETY: as above; `data` has SAMPLE_DATA_LEN bytes.
        let data = unsafe { (*sample).data.as_mut_ptr() };
        if !ctx.copy(tcp.payload_offset + skip, data, len) {
            return false;
        }
        data_len = len as usize;
    }
    let size = size_of::<SampleHeader>() + data_len;
    let wakeup = wakes_reader(config, ring, data_len);
    // SAFETY: `size` is at most the scratch sample's size, all of it written above.
    let record = unsafe { core::slice::from_raw_parts(sample.cast::<u8>(), size) };
    let flags = if wakeup {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if ring.output::<[u8]>(record, u64::from(flags)).is_err() {
        if wakeup {
            // The wake-up went with the lost sample: the next sample is to send it.
            set_reader(READER_PARKED);
        }
        bump(&SAMPLES_LOST);
        return false;
    }
    if !wakeup && reader_parked() {
        // The reader parked between the look above and this record's reservation, and
        // may have found the ring empty: wake it now.
        nudge(ring);
    }
    bump(&SAMPLES_CAPTURED);
    true
}

/// Whether the sample about to be written (`data_len` bytes of data) should wake the
/// daemon. A wake-up costs an interrupt here and a context switch in the daemon, which
/// polls on a short timer while samples flow: only the first sample after it parked
/// (after a quiet spell), and the sample whose record crosses the threshold of unread
/// bytes, wake it.
#[inline(always)]
fn wakes_reader(config: &CaptureConfig, ring: &RingBuf, data_len: usize) -> bool {
    if reader_parked() {
        // Two CPUs seeing the reader parked both wake it: harmless.
        set_reader(READER_POLLING);
        return true;
    }
    let unread = ring.query(u64::from(BPF_RB_AVAIL_DATA));
    let threshold = u64::from(config.wakeup_bytes);
    threshold > 0
        && unread < threshold
        && unread + u64::from(sample_ring_bytes(data_len)) >= threshold
}

#[inline(always)]
fn reader_parked() -> bool {
    CAPTURE_READER
        .get(0)
        .is_some_and(|reader| *reader == READER_PARKED)
}

/// Wakes the reader of `ring` with an empty record it skips: the ring wakes readers
/// only as a record is committed or discarded. On a full ring the reader stays parked
/// (the flag says so), and the next sample that finds room wakes it.
#[inline(always)]
fn nudge(ring: &RingBuf) {
    if let Some(entry) = ring.reserve::<u64>(0) {
        set_reader(READER_POLLING);
        entry.discard(u64::from(BPF_RB_FORCE_WAKEUP));
    }
}

#[inline(always)]
fn set_reader(state: u32) {
    if let Some(reader) = CAPTURE_READER.get_ptr_mut(0) {
        // SAFETY: a map value; the kernel and the daemon only ever store whole states.
        unsafe { *reader = state };
    }
}
