//! HTTP payload samples streamed from the kernel to the daemon through two ring buffers
//! (requests, responses).

/// Bytes of TCP payload one sample carries: an Ethernet MTU's segment fits one sample,
/// larger (GSO) egress skbs are cut into pieces of this size. A power of two, so the
/// kernel can bound copy lengths with a mask the verifier follows.
pub const SAMPLE_DATA_LEN: usize = 2048;

/// Segment carried a request (client to server, seen on ingress).
pub const DIRECTION_REQUEST: u8 = 0;
/// Segment carried a response (server to client, seen on egress).
pub const DIRECTION_RESPONSE: u8 = 1;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Fixed part of a sample. Addresses are IPv6 or IPv4-mapped; ports and the sequence
/// number are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleHeader {
    /// CLOCK_MONOTONIC ns when the program saw the segment.
    pub timestamp_ns: u64,
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub ifindex: u32,
    /// TCP sequence number of the first byte of `data`.
    pub seq: u32,
    /// TCP payload bytes of the whole segment this sample was cut from.
    pub segment_len: u32,
    /// Bytes of `data` that are valid.
    pub data_len: u16,
    /// `DIRECTION_*`.
    pub direction: u8,
    /// `TCP_*` bits of the segment.
    pub tcp_flags: u8,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SampleHeader>() == 64);

/// A sample as the kernel assembles it. Its ring record holds only the header and the
/// `data_len` valid bytes: records vary in size, so a ring holds about ten times more
/// of the small samples HTTP APIs mostly make, and the kernel and the daemon touch no
/// unused memory between them.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub header: SampleHeader,
    pub data: [u8; SAMPLE_DATA_LEN],
}
const _: () = assert!(core::mem::size_of::<Sample>() == 64 + SAMPLE_DATA_LEN);
const _: () = assert!(core::mem::size_of::<Sample>().is_multiple_of(8));

/// Ring bytes the record of a sample carrying `data_len` bytes takes: the ring's
/// 8-byte record header, the sample header and the data, rounded up to 8 bytes.
pub const fn sample_ring_bytes(data_len: usize) -> u32 {
    let record = 8 + core::mem::size_of::<SampleHeader>() + data_len;
    record.next_multiple_of(8) as u32
}
/// Ring bytes the largest sample takes.
pub const SAMPLE_RING_BYTES: u32 = sample_ring_bytes(SAMPLE_DATA_LEN);

/// Capture settings the daemon writes into the one-slot `CAPTURE_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Payload bytes captured per message, counted from each request (or response)
    /// start; 0 disables capture.
    pub max_bytes_per_message: u32,
    /// Unread ring bytes whose crossing wakes the daemon early (it also polls on a
    /// timer); 0 never wakes it.
    pub wakeup_bytes: u32,
}
const _: () = assert!(core::mem::size_of::<CaptureConfig>() == 8);

/// `CAPTURE_READER` value: the daemon polls the rings on its own timer.
pub const READER_POLLING: u32 = 0;
/// `CAPTURE_READER` value: the daemon found the rings empty and sleeps until the next
/// sample wakes it (the kernel sets `READER_POLLING` back as it does).
pub const READER_PARKED: u32 = 1;

/// Key of the kernel's per-connection capture budget, the same for both directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 36);

/// Bytes still to capture of the current request and response of a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowBudget {
    pub request_left: u32,
    pub response_left: u32,
}
const _: () = assert!(core::mem::size_of::<FlowBudget>() == 8);

/// Words in the `CAPTURE_PORTS` bitmap: one bit per TCP port.
pub const PORT_BITMAP_WORDS: u32 = 65536 / 32;

/// True when a payload starting with these bytes starts an HTTP/1.x request: the
/// kernel resets the request's capture budget there.
#[inline(always)]
pub const fn starts_request(head: [u8; 4]) -> bool {
    matches!(
        &head,
        b"GET " | b"POST" | b"PUT " | b"HEAD" | b"DELE" | b"PATC" | b"OPTI" | b"CONN" | b"TRAC"
    )
}

/// True when a payload starting with these bytes starts an HTTP/1.x response.
#[inline(always)]
pub const fn starts_response(head: [u8; 4]) -> bool {
    matches!(&head, b"HTTP")
}
