//! From captured segments to HTTP exchanges: a bounded flow table, reassembly per
//! direction, incremental parsing, and request/response pairing per connection.

pub mod parse;
pub mod query;
pub mod reassembly;
pub mod route;

use std::{collections::VecDeque, net::SocketAddr, sync::Arc, time::Duration};

use monitor_common::capture::{TCP_FIN, TCP_RST};

use self::{
    parse::{
        Item, MessageParser, OtherProtocol, ParseErrorKind, Parsed, RequestHead, Side,
        starts_message,
    },
    reassembly::{Delivery, Reassembler},
    route::Routes,
};
use crate::capture::{Direction, Segment};

/// One request with its response, as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub request: RequestHead,
    /// The request's route template (computed once, when its head arrived).
    pub route: Arc<str>,
    /// CLOCK_MONOTONIC ns of the request's first byte (kernel timestamp).
    pub started_ns: u64,
    /// The request body's size, as far as it came (whole when `request_body_complete`).
    pub request_body_bytes: u64,
    /// The request's body ended as its framing said (or it had none). False when the
    /// connection ended first or the framing broke: what its head announced never
    /// came whole.
    pub request_body_complete: bool,
    /// The start of the request body kept for inspection (chunking removed); whole
    /// when its length is `request_body_bytes`.
    pub request_body: Vec<u8>,
    /// None when no response was read: the connection ended before one, or its head
    /// could not be read (a parse error says which).
    pub status: Option<u16>,
    pub response_body_bytes: u64,
    /// From the request's first byte to the response's first byte.
    pub latency: Option<Duration>,
}

/// A request whose head just arrived (its response, if any, still to come), lent to
/// observers: it stays with its connection until the exchange ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestStart<'a> {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub head: &'a RequestHead,
    pub route: &'a Arc<str>,
    /// CLOCK_MONOTONIC ns of its first byte.
    pub started_ns: u64,
}

/// What the pipeline reports, as it happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// As soon as a request head is parsed: what policy decisions are made on.
    Request(RequestStart<'a>),
    /// A request with its response (or without, when the connection ended first).
    Exchange(&'a Exchange),
    ParseError(Problem),
    OtherProtocol(OtherProtocol),
}

/// Who hears the pipeline's events, in stream order, while a segment is taken.
pub trait Observer {
    fn observe(&mut self, event: Event<'_>);
}

impl<F: FnMut(Event<'_>)> Observer for F {
    fn observe(&mut self, event: Event<'_>) {
        self(event)
    }
}

/// Bytes that could not be parsed as HTTP, and on which connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: ParseErrorKind,
    /// Which side sent them.
    pub side: Side,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// Limits of the flow table.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_flows: usize,
    /// Bytes buffered (early segments, partial heads) across all flows.
    pub max_memory: usize,
    pub idle_timeout: Duration,
    /// Request body bytes kept per request for detections.
    pub body_inspect_bytes: usize,
}

/// A connection's key: its addresses as plain words, cheap to hash and compare (the
/// flow table looks one up for every segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowId {
    client_ip: u128,
    server_ip: u128,
    /// Both ports, and the address family (IPv4 and IPv6 addresses may share bits).
    ports_and_family: u64,
}

impl FlowId {
    fn of(client: SocketAddr, server: SocketAddr) -> Self {
        let bits = |addr: &SocketAddr| match addr.ip() {
            std::net::IpAddr::V4(ip) => u128::from(ip.to_bits()),
            std::net::IpAddr::V6(ip) => ip.to_bits(),
        };
        Self {
            client_ip: bits(&client),
            server_ip: bits(&server),
            ports_and_family: u64::from(client.is_ipv6()) << 32
                | u64::from(client.port()) << 16
                | u64::from(server.port()),
        }
    }
}

#[derive(Debug)]
struct Pending {
    /// None: a request whose head could not be read. It takes its response, so that
    /// later ones pair with their own requests, and is not reported.
    head: Option<RequestHead>,
    route: Arc<str>,
    started_ns: u64,
    /// Set once the request's body has ended, or stopped short.
    body_end: Option<BodyEnd>,
    body: Vec<u8>,
    answer: Answer,
}

/// How far a request's response has come; a head is (status, first-byte time).
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// No response head yet.
    Awaited,
    /// Its head came; its body is arriving.
    Arriving((u16, u64)),
    /// It ended (or stopped short): its head, None when it could not be read, and
    /// its body's size.
    Ended(Option<(u16, u64)>, u64),
}

/// How a request body ended, and after how many bytes.
#[derive(Clone, Copy, Debug)]
enum BodyEnd {
    /// As its framing said.
    Whole(u64),
    /// Early: the connection ended, or the framing broke.
    Cut(u64),
}

impl Pending {
    fn new(head: Option<RequestHead>, route: Arc<str>, started_ns: u64) -> Self {
        Self {
            head,
            route,
            started_ns,
            body_end: None,
            body: Vec::new(),
            answer: Answer::Awaited,
        }
    }

    /// Servers may answer before the request body is in (an early 413, or an
    /// endpoint that ignores the body): an exchange ends when both sides have.
    fn complete(&self) -> bool {
        self.body_end.is_some() && matches!(self.answer, Answer::Ended(..))
    }

    fn awaits_response(&self) -> bool {
        matches!(self.answer, Answer::Awaited)
    }
}

#[derive(Debug)]
struct Half {
    reassembler: Reassembler,
    parser: MessageParser,
}

impl Half {
    fn new(side: Side, keep_body: usize) -> Self {
        Self {
            reassembler: Reassembler::default(),
            parser: MessageParser::new(side).keeping_body(keep_body),
        }
    }

    fn buffered(&self) -> usize {
        self.reassembler.pending_bytes() + self.parser.buffered()
    }
}

#[derive(Debug)]
struct Flow {
    client: SocketAddr,
    server: SocketAddr,
    request: Half,
    response: Half,
    /// Requests awaiting (the end of) their response, oldest first.
    pending: VecDeque<Pending>,
    /// Body bytes the pending requests hold (for the memory bound).
    pending_body_bytes: usize,
    last_seen_ns: u64,
}

impl Flow {
    fn buffered(&self) -> usize {
        self.request.buffered() + self.response.buffered() + self.pending_body_bytes
    }
}

/// Per-direction byte budget for early segments of one flow.
const MAX_PENDING_BYTES_PER_HALF: usize = 256 * 1024;

/// Connections by key, least recently active first out. Flat (no allocation per
/// entry beyond the flow itself), so a segment's lookup touches little memory.
type FlowTable =
    schnellru::LruMap<FlowId, Box<Flow>, schnellru::ByLength, foldhash::fast::RandomState>;

pub struct Pipeline {
    flows: FlowTable,
    routes: Routes,
    limits: Limits,
    memory: usize,
    /// Scratch space for one segment's parsed items, and spare request heads.
    parsed: Parsed,
}

impl Pipeline {
    /// `routes` names each request's route template, once, as its head arrives.
    pub fn new(limits: Limits, routes: Routes) -> Self {
        let max_flows = u32::try_from(limits.max_flows.max(1)).unwrap_or(u32::MAX);
        Self {
            flows: FlowTable::with_hasher(
                schnellru::ByLength::new(max_flows),
                foldhash::fast::RandomState::default(),
            ),
            routes,
            limits,
            memory: 0,
            parsed: Parsed::default(),
        }
    }

    pub fn active_flows(&self) -> usize {
        self.flows.len()
    }

    /// Starts following a connection, from a message start only (the kernel does the
    /// same). False when this segment does not start one.
    fn open_flow(&mut self, id: FlowId, segment: &Segment, events: &mut impl Observer) -> bool {
        // Connections are followed from their client's side.
        if segment.direction != Direction::Request {
            return false;
        }
        if !starts_message(Side::Request, segment.data)
            && OtherProtocol::recognise(segment.data).is_none()
        {
            return false;
        }
        let flow = Flow {
            client: segment.client,
            server: segment.server,
            request: Half::new(Side::Request, self.limits.body_inspect_bytes),
            response: Half::new(Side::Response, 0),
            pending: VecDeque::new(),
            pending_body_bytes: 0,
            last_seen_ns: segment.timestamp_ns,
        };
        // The table is full: the least recently active connection makes room, and
        // reports what it still held.
        if self.flows.len() >= self.flows.limiter().max_length() as usize
            && let Some((_, evicted)) = self.flows.pop_oldest()
        {
            self.memory = self.memory.saturating_sub(evicted.buffered());
            flush(*evicted, events, &mut self.routes, &mut self.parsed);
        }
        self.flows.insert(id, Box::new(flow))
    }

    /// Takes one segment; what it completes goes to `events`. Connections over the
    /// memory bound end here; idle ones when `enforce_limits` is called.
    pub fn ingest(&mut self, segment: &Segment, events: &mut impl Observer) {
        let id = FlowId::of(segment.client, segment.server);
        // One lookup for a known connection (nearly every segment).
        let flow = match self.flows.get(&id) {
            Some(flow) => flow,
            None => {
                if !self.open_flow(id, segment, events) {
                    return;
                }
                let Some(flow) = self.flows.get(&id) else {
                    return;
                };
                flow
            }
        };
        let before = flow.buffered();
        flow.last_seen_ns = flow.last_seen_ns.max(segment.timestamp_ns);
        // Reused across segments: its allocations are warm.
        let parsed = &mut self.parsed;
        let half = match segment.direction {
            Direction::Request => &mut flow.request,
            Direction::Response => &mut flow.response,
        };
        let Half {
            reassembler,
            parser,
        } = half;
        let now = segment.timestamp_ns;
        reassembler.push(segment.seq, segment.data, &mut |d| {
            feed(parser, d, now, parsed)
        });
        // Missing bytes: skip them at once if the parser can live with that (body the
        // kernel did not capture, or a new message waiting), else wait, boundedly.
        while let Some(missing) = reassembler.gap_ahead() {
            let next_starts = reassembler
                .first_pending()
                .is_some_and(|data| starts_message(side_of(segment.direction), data));
            if !(parser.absorbs_gap(missing)
                || next_starts
                || reassembler.over_limit(MAX_PENDING_BYTES_PER_HALF))
            {
                break;
            }
            reassembler.skip_gap(&mut |d| feed(parser, d, now, parsed));
        }
        let closing = segment.flags & (TCP_FIN | TCP_RST) != 0;
        if closing {
            // Bytes the kernel did not capture up to the close (the rest of a large
            // body) still count, exactly, where the message can take them.
            let end = segment.seq.wrapping_add(segment.data.len() as u32);
            if let Some(missing) = reassembler.missing_until(end)
                && parser.absorbs_gap(missing)
            {
                reassembler.skip(missing, &mut |d| feed(parser, d, now, parsed));
            }
            parser.close(parsed);
        }
        pair(flow, segment.direction, parsed, events, &mut self.routes);
        // After pairing: kept bodies move into (and out of) the pending requests.
        let after = flow.buffered();
        self.memory = (self.memory + after).saturating_sub(before);
        if segment.flags & TCP_RST != 0 || (closing && segment.direction == Direction::Response) {
            self.end_flow(&id, events);
        }
        if self.memory > self.limits.max_memory {
            self.enforce_limits(segment.timestamp_ns, events);
        }
    }

    fn end_flow(&mut self, id: &FlowId, events: &mut impl Observer) {
        if let Some(flow) = self.flows.remove(id) {
            self.memory = self.memory.saturating_sub(flow.buffered());
            flush(*flow, events, &mut self.routes, &mut self.parsed);
        }
    }

    /// Drops idle flows, then the least recently active while over the memory bound
    /// (the caller's timer: the daemon calls it after each batch, and when idle).
    pub fn enforce_limits(&mut self, now_ns: u64, events: &mut impl Observer) {
        let idle_ns = u64::try_from(self.limits.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        while let Some((id, flow)) = self.flows.peek_oldest() {
            let idle = now_ns.saturating_sub(flow.last_seen_ns) > idle_ns;
            if !idle && self.memory <= self.limits.max_memory {
                break;
            }
            let id = *id;
            self.end_flow(&id, events);
        }
    }
}

/// Hands one delivery of the reassembler to the parser.
fn feed(parser: &mut MessageParser, delivery: Delivery<'_>, now_ns: u64, out: &mut Parsed) {
    match delivery {
        Delivery::Data(data) => parser.feed(data, now_ns, out),
        Delivery::Gap(missing) => parser.gap(missing, out),
    }
}

fn side_of(direction: Direction) -> Side {
    match direction {
        Direction::Request => Side::Request,
        Direction::Response => Side::Response,
    }
}

/// Pairs parsed items with the connection's pending requests.
fn pair(
    flow: &mut Flow,
    direction: Direction,
    parsed: &mut Parsed,
    events: &mut impl Observer,
    routes: &mut Routes,
) {
    let mut items = parsed.take_items();
    for item in items.drain(..) {
        match item {
            Item::Request { head, started_ns } => {
                let route = routes.route(head.target());
                flow.response
                    .parser
                    .expect_response(head.method().eq_ignore_ascii_case("HEAD"));
                flow.pending
                    .push_back(Pending::new(Some(head), route, started_ns));
                if let Some(pending) = flow.pending.back()
                    && let Some(head) = &pending.head
                {
                    events.observe(Event::Request(RequestStart {
                        client: flow.client,
                        server: flow.server,
                        head,
                        route: &pending.route,
                        started_ns,
                    }));
                }
            }
            Item::Response { head, started_ns } => {
                if head.is_interim() {
                    continue;
                }
                if let Some(pending) = flow.pending.iter_mut().find(|p| p.awaits_response()) {
                    pending.answer = Answer::Arriving((head.status, started_ns));
                }
            }
            Item::End { body_bytes } => {
                end_message(flow, direction, BodyEnd::Whole(body_bytes));
                report_completed(flow, events, parsed);
            }
            Item::Body(body) => {
                if let Some(pending) = flow.pending.back_mut() {
                    flow.pending_body_bytes =
                        (flow.pending_body_bytes + body.len()).saturating_sub(pending.body.len());
                    pending.body = body;
                }
            }
            Item::Cut { body_bytes } => {
                end_message(flow, direction, BodyEnd::Cut(body_bytes));
                report_completed(flow, events, parsed);
            }
            Item::Error(kind) => {
                events.observe(Event::ParseError(Problem {
                    kind,
                    side: side_of(direction),
                    client: flow.client,
                    server: flow.server,
                }));
            }
            Item::UnreadableHead { head_request } => match direction {
                // A request all the same: its response is not the next one's.
                Direction::Request => {
                    flow.response.parser.expect_response(head_request);
                    flow.pending.push_back(Pending {
                        body_end: Some(BodyEnd::Whole(0)),
                        ..Pending::new(None, Arc::from(""), 0)
                    });
                }
                // Its request is answered, unreadably (no status).
                Direction::Response => {
                    if let Some(pending) = flow.pending.iter_mut().find(|p| p.awaits_response()) {
                        pending.answer = Answer::Ended(None, 0);
                        report_completed(flow, events, parsed);
                    }
                }
            },
            Item::NotHttp(protocol) => events.observe(Event::OtherProtocol(protocol)),
        }
    }
    parsed.return_items(items);
}

/// A message on `direction` ended (or stopped short): its request's body, or the
/// body of the oldest response still arriving.
fn end_message(flow: &mut Flow, direction: Direction, end: BodyEnd) {
    match direction {
        Direction::Request => {
            if let Some(pending) = flow.pending.back_mut() {
                pending.body_end = Some(end);
            }
        }
        Direction::Response => {
            let oldest_arriving = flow.pending.iter_mut().find_map(|p| match p.answer {
                Answer::Arriving(head) => Some((p, head)),
                _ => None,
            });
            if let Some((pending, head)) = oldest_arriving {
                let (BodyEnd::Whole(bytes) | BodyEnd::Cut(bytes)) = end;
                pending.answer = Answer::Ended(Some(head), bytes);
            }
        }
    }
}

/// Reports the exchanges at the head of the connection's queue that have ended on
/// both sides (in order: a later one waits for the earlier ones).
fn report_completed(flow: &mut Flow, events: &mut impl Observer, parsed: &mut Parsed) {
    while flow.pending.front().is_some_and(Pending::complete) {
        if let Some(done) = flow.pending.pop_front() {
            flow.pending_body_bytes = flow.pending_body_bytes.saturating_sub(done.body.len());
            report(flow.client, flow.server, done, events, parsed);
        }
    }
}

/// Reports a finished request; its head then serves a later one.
fn report(
    client: SocketAddr,
    server: SocketAddr,
    pending: Pending,
    events: &mut impl Observer,
    parsed: &mut Parsed,
) {
    if let Some(exchange) = exchange(client, server, pending) {
        events.observe(Event::Exchange(&exchange));
        parsed.recycle(exchange.request);
    }
}

fn exchange(client: SocketAddr, server: SocketAddr, pending: Pending) -> Option<Exchange> {
    let request = pending.head?;
    let (response, response_body_bytes) = match pending.answer {
        Answer::Awaited => (None, 0),
        Answer::Arriving(head) => (Some(head), 0),
        Answer::Ended(head, bytes) => (head, bytes),
    };
    let (status, latency) = match response {
        Some((status, started_ns)) => (
            Some(status),
            Some(Duration::from_nanos(
                started_ns.saturating_sub(pending.started_ns),
            )),
        ),
        None => (None, None),
    };
    Some(Exchange {
        client,
        server,
        request,
        route: pending.route,
        started_ns: pending.started_ns,
        request_body_bytes: match pending.body_end {
            Some(BodyEnd::Whole(bytes) | BodyEnd::Cut(bytes)) => bytes,
            None => 0,
        },
        request_body_complete: matches!(pending.body_end, Some(BodyEnd::Whole(_))),
        request_body: pending.body,
        status,
        response_body_bytes,
        latency,
    })
}

/// A connection is gone: report what it still held.
fn flush(mut flow: Flow, events: &mut impl Observer, routes: &mut Routes, parsed: &mut Parsed) {
    flow.request.parser.cut(parsed);
    pair(&mut flow, Direction::Request, parsed, events, routes);
    flow.response.parser.close(parsed);
    // A response the connection ended inside reports the bytes that came.
    flow.response.parser.cut(parsed);
    pair(&mut flow, Direction::Response, parsed, events, routes);
    for pending in flow.pending.drain(..) {
        report(flow.client, flow.server, pending, events, parsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "10.0.0.2:40000";
    const SERVER: &str = "10.0.0.1:8080";

    fn segment(direction: Direction, seq: u32, data: &[u8], t: u64, flags: u8) -> Segment<'_> {
        Segment {
            timestamp_ns: t,
            direction,
            client: CLIENT.parse().unwrap(),
            server: SERVER.parse().unwrap(),
            seq,
            flags,
            data,
        }
    }

    /// The client resets the connection after sending `sent` request bytes from seq 1.
    fn reset_after(sent: &[u8], t: u64) -> Segment<'static> {
        segment(Direction::Request, 1 + sent.len() as u32, b"", t, TCP_RST)
    }

    fn pipeline() -> Pipeline {
        Pipeline::new(
            Limits {
                max_flows: 16,
                max_memory: 1 << 20,
                idle_timeout: Duration::from_secs(60),
                body_inspect_bytes: 16 * 1024,
            },
            Routes::default(),
        )
    }

    /// Events as the tests keep them: a request by its target.
    #[derive(Debug, PartialEq)]
    enum Seen {
        Request(String),
        Exchange(Exchange),
        Other(Event<'static>),
    }

    impl Observer for Vec<Seen> {
        fn observe(&mut self, event: Event<'_>) {
            self.push(match event {
                Event::Request(request) => Seen::Request(request.head.target().to_owned()),
                Event::Exchange(exchange) => Seen::Exchange(exchange.clone()),
                Event::ParseError(problem) => Seen::Other(Event::ParseError(problem)),
                Event::OtherProtocol(protocol) => Seen::Other(Event::OtherProtocol(protocol)),
            });
        }
    }

    fn exchanges(events: &[Seen]) -> Vec<&Exchange> {
        events
            .iter()
            .filter_map(|e| match e {
                Seen::Exchange(x) => Some(x),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn requests_pair_with_responses_in_order() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        let req = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b?q=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi";
        p.ingest(&segment(Direction::Request, 1, req, 1_000, 0), &mut events);
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        p.ingest(
            &segment(Direction::Response, 900, resp, 5_000, 0),
            &mut events,
        );
        let done = exchanges(&events);
        assert_eq!(done.len(), 2);
        assert_eq!(
            (
                done[0].request.target(),
                done[0].status,
                done[0].response_body_bytes
            ),
            ("/a", Some(200), 3)
        );
        assert_eq!(
            (
                done[1].request.target(),
                done[1].status,
                done[1].request_body_bytes
            ),
            ("/b?q=1", Some(404), 2)
        );
        assert_eq!(done[0].latency, Some(Duration::from_nanos(4_000)));
        assert!(done[0].request_body_complete && done[1].request_body_complete);
        assert_eq!(p.active_flows(), 1);
    }

    #[test]
    fn a_body_the_connection_cut_short_is_not_complete() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        let head = b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234";
        p.ingest(&segment(Direction::Request, 1, head, 1_000, 0), &mut events);
        p.ingest(&reset_after(head, 2_000), &mut events);
        let done = exchanges(&events);
        assert_eq!(done.len(), 1, "{events:?}");
        assert!(!done[0].request_body_complete);
        assert_eq!(done[0].request_body, b"01234", "what came is kept");
        assert_eq!(done[0].request_body_bytes, 5, "and counted");
        assert_eq!(done[0].status, None);
    }

    /// Heads reuse the allocations of reported ones: nothing of an earlier request
    /// may show in a later one.
    #[test]
    fn a_recycled_head_carries_nothing_of_its_last_request() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        let mut seq = 1;
        let mut response_seq = 900;
        for (i, request) in [
            &b"GET /a/long/path?with=query HTTP/1.1\r\nHost: first.example\r\nUser-Agent: one\r\nX-Extra: 1\r\n\r\n"[..],
            b"GET /b HTTP/1.0\r\n\r\n",
            b"POST /c HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
        ]
        .into_iter()
        .enumerate()
        {
            let t = 1_000 * (i as u64 + 1);
            p.ingest(&segment(Direction::Request, seq, request, t, 0), &mut events);
            seq += request.len() as u32;
            let response = b"HTTP/1.1 204 No Content\r\n\r\n";
            p.ingest(
                &segment(Direction::Response, response_seq, response, t + 1, 0),
                &mut events,
            );
            response_seq += response.len() as u32;
        }
        let heads: Vec<_> = exchanges(&events)
            .iter()
            .map(|x| {
                let head = &x.request;
                (
                    head.method().to_owned(),
                    head.target().to_owned(),
                    head.host().map(str::to_owned),
                    head.user_agent().map(str::to_owned),
                    head.header_count(),
                    head.version(),
                    head.content_length(),
                )
            })
            .collect();
        assert_eq!(
            heads,
            [
                (
                    "GET".into(),
                    "/a/long/path?with=query".into(),
                    Some("first.example".into()),
                    Some("one".into()),
                    3,
                    1,
                    None
                ),
                ("GET".into(), "/b".into(), None, None, 0, 0, None),
                (
                    "POST".into(),
                    "/c".into(),
                    Some("h".into()),
                    None,
                    2,
                    1,
                    Some(0)
                ),
            ]
        );
        assert_eq!(exchanges(&events)[1].request.headers(), []);
    }

    /// A chunked response larger than the capture budget stops at a gap: it ends there
    /// (with the bytes seen), and the next response pairs with its own request at once.
    #[test]
    fn a_response_cut_by_a_gap_ends_and_the_next_pairs_with_its_own_request() {
        let (_, events) = deliver(
            &[b"GET /big HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n"],
            &[
                (
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n",
                    0,
                ),
                (b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", 5_000),
            ],
        );
        let done: Vec<_> = exchanges(&events)
            .iter()
            .map(|x| (x.request.target(), x.status, x.response_body_bytes))
            .collect();
        assert_eq!(
            done,
            [("/big", Some(200), 16), ("/next", Some(201), 2)],
            "{events:?}"
        );
        assert!(events.iter().any(|e| matches!(
            e,
            Seen::Other(Event::ParseError(Problem {
                kind: ParseErrorKind::Gap,
                ..
            }))
        )));
    }

    /// A connection that ends inside a response reports the bytes that came.
    #[test]
    fn a_response_the_connection_cut_short_counts_what_came() {
        let request = b"GET /file HTTP/1.1\r\n\r\n";
        let (mut p, mut events) = deliver(
            &[request],
            &[(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                0,
            )],
        );
        p.ingest(&reset_after(request, 3_000), &mut events);
        let done = exchanges(&events);
        assert_eq!(done.len(), 1, "{events:?}");
        assert_eq!(
            (done[0].status, done[0].response_body_bytes),
            (Some(200), 10)
        );
    }

    /// Feeds each request delivery in turn (from seq 1, at t = 1000 ns on), then each
    /// response delivery (from seq 900, at t = 2000 ns on), each after a gap of the
    /// bytes given with it.
    fn deliver(requests: &[&[u8]], responses: &[(&[u8], u32)]) -> (Pipeline, Vec<Seen>) {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        let mut seq = 1;
        for (t, request) in requests.iter().enumerate() {
            p.ingest(
                &segment(Direction::Request, seq, request, 1_000 + t as u64, 0),
                &mut events,
            );
            seq += request.len() as u32;
        }
        let mut seq = 900;
        for (t, (response, gap_before)) in responses.iter().enumerate() {
            seq += gap_before;
            p.ingest(
                &segment(Direction::Response, seq, response, 2_000 + t as u64, 0),
                &mut events,
            );
            seq += response.len() as u32;
        }
        (p, events)
    }

    /// (target, status) of the exchanges `deliver` reports.
    fn pair_up(requests: &[&[u8]], responses: &[(&[u8], u32)]) -> Vec<(String, Option<u16>)> {
        let (_, events) = deliver(requests, responses);
        exchanges(&events)
            .iter()
            .map(|x| (x.request.target().to_owned(), x.status))
            .collect()
    }

    /// A response head that breaks answers its request (unreadably): the responses
    /// after it pair with their own requests, a HEAD's bodiless answer included.
    #[test]
    fn a_broken_response_head_does_not_shift_the_pairing() {
        let done = pair_up(
            &[b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\nHEAD /c HTTP/1.1\r\n\r\nGET /d HTTP/1.1\r\n\r\n"],
            &[
                (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 0),
                (b"\r\nHTTP/1.1 2x0 Broken\r\n\r\n", 0),
                (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", 0),
                (b"HTTP/1.1 204 No Content\r\n\r\n", 0),
            ],
        );
        let want = [
            ("/a", Some(200)),
            ("/b", None),
            ("/c", Some(200)),
            ("/d", Some(204)),
        ];
        assert_eq!(done, want.map(|(t, s)| (t.to_owned(), s)));
    }

    /// A request head that cannot be read still takes its response (the server's 400):
    /// the next request gets its own.
    #[test]
    fn a_broken_request_head_takes_its_own_response() {
        let done = pair_up(
            &[
                b"GET /a HTTP/1.1\r\n\r\n",
                b"GET /b HTTP/1.1\r\nBad Header: 1\r\n\r\n",
                b"GET /c HTTP/1.1\r\n\r\n",
            ],
            &[(
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n\
                  HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\nbad\
                  HTTP/1.1 204 No Content\r\n\r\n",
                0,
            )],
        );
        let want = [("/a", Some(200)), ("/c", Some(204))];
        assert_eq!(done, want.map(|(t, s)| (t.to_owned(), s)));
    }

    /// A request head cut by a gap shows only when the next request arrives, after its
    /// response: it must not take the next request's response.
    #[test]
    fn a_request_head_cut_by_a_gap_takes_no_response() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        let deliveries: [(Direction, u32, &[u8]); 4] = [
            (Direction::Request, 1, b"GET /a HTTP/1.1\r\nX-Long: aaaa"),
            (
                Direction::Response,
                900,
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            ),
            (Direction::Request, 20_000, b"GET /b HTTP/1.1\r\n\r\n"),
            (Direction::Response, 938, b"HTTP/1.1 204 No Content\r\n\r\n"),
        ];
        for (t, (direction, seq, data)) in deliveries.into_iter().enumerate() {
            p.ingest(
                &segment(direction, seq, data, 1_000 + t as u64, 0),
                &mut events,
            );
        }
        let done: Vec<_> = exchanges(&events)
            .iter()
            .map(|x| (x.request.target(), x.status))
            .collect();
        assert_eq!(done, [("/b", Some(204))], "{events:?}");
    }

    /// An unreadable HEAD request's answer has no body, whatever its Content-Length.
    #[test]
    fn a_broken_head_request_is_answered_without_a_body() {
        let done = pair_up(
            &[
                b"HEAD /a HTTP/1.1\r\nBad Header: 1\r\n\r\n",
                b"GET /b HTTP/1.1\r\n\r\n",
            ],
            &[(
                b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n\
                  HTTP/1.1 204 No Content\r\n\r\n",
                0,
            )],
        );
        assert_eq!(done, [("/b".to_owned(), Some(204))]);
    }

    /// A head cut by a gap counts as a response; a gap between messages guesses none.
    #[test]
    fn a_response_head_cut_by_a_gap_answers_its_request() {
        let done = pair_up(
            &[b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"],
            &[
                (b"HTTP/1.1 200 OK\r\nContent-", 0),
                (b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 40),
            ],
        );
        assert_eq!(
            done,
            [("/a".to_owned(), None), ("/b".to_owned(), Some(201))]
        );
    }

    /// Bytes after a whole response that start no response are no answer to anything.
    #[test]
    fn stray_bytes_after_a_response_answer_no_request() {
        let done = pair_up(
            &[b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"],
            &[(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA\r\n\r\n",
                0,
            )],
        );
        assert_eq!(done, [("/a".to_owned(), Some(200))], "/b still waits");
    }

    #[test]
    fn an_answer_before_the_request_body_ends_waits_for_the_body() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        let head = b"POST /up HTTP/1.1\r\nContent-Length: 10\r\n\r\n01234";
        p.ingest(&segment(Direction::Request, 1, head, 1_000, 0), &mut events);
        let resp = b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n";
        p.ingest(
            &segment(Direction::Response, 500, resp, 2_000, 0),
            &mut events,
        );
        assert!(
            exchanges(&events).is_empty(),
            "the request is still arriving"
        );
        let rest = b"56789GET /next HTTP/1.1\r\n\r\n";
        let seq = 1 + head.len() as u32;
        p.ingest(
            &segment(Direction::Request, seq, rest, 3_000, 0),
            &mut events,
        );
        let done = exchanges(&events);
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].status, done[0].request_body_bytes, done[0].latency),
            (Some(413), 10, Some(Duration::from_nanos(1_000)))
        );
    }

    #[test]
    fn a_close_after_an_uncaptured_body_tail_gives_the_exact_size() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        let head = b"POST /up HTTP/1.1\r\nContent-Length: 100000\r\n\r\nfirst bytes";
        p.ingest(&segment(Direction::Request, 1, head, 1_000, 0), &mut events);
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        p.ingest(
            &segment(Direction::Response, 7, resp, 2_000, 0),
            &mut events,
        );
        let body_start = 1 + (head.len() - b"first bytes".len()) as u32;
        let fin = segment(
            Direction::Request,
            body_start + 100_000,
            b"",
            3_000,
            TCP_FIN,
        );
        p.ingest(&fin, &mut events);
        let done = exchanges(&events);
        assert_eq!(done.len(), 1, "{events:?}");
        assert_eq!(done[0].request_body_bytes, 100_000);
    }

    #[test]
    fn reordered_segments_and_a_close_framed_response() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        p.ingest(
            &segment(Direction::Request, 10, b"GET /x HT", 1, 0),
            &mut events,
        );
        p.ingest(&segment(Direction::Request, 27, b"\r\n", 2, 0), &mut events);
        p.ingest(
            &segment(Direction::Request, 19, b"TP/1.0\r\n", 3, 0),
            &mut events,
        );
        p.ingest(
            &segment(
                Direction::Response,
                50,
                b"HTTP/1.0 200 OK\r\n\r\nbody",
                4,
                0,
            ),
            &mut events,
        );
        assert!(
            exchanges(&events).is_empty(),
            "the body ends with the connection"
        );
        p.ingest(
            &segment(Direction::Response, 73, b"more", 5, TCP_FIN),
            &mut events,
        );
        let done = exchanges(&events);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].response_body_bytes, 8);
        assert_eq!(p.active_flows(), 0);
    }

    #[test]
    fn flows_start_only_at_a_request_and_are_bounded() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        p.ingest(
            &segment(Direction::Request, 1, b"middle of a body", 1, 0),
            &mut events,
        );
        p.ingest(
            &segment(Direction::Response, 1, b"HTTP/1.1 200 OK\r\n\r\n", 1, 0),
            &mut events,
        );
        assert_eq!(p.active_flows(), 0);
        for port in 0..40u16 {
            let mut s = segment(Direction::Request, 1, b"GET / HTTP/1.1\r\n\r\n", 2, 0);
            s.client.set_port(1000 + port);
            p.ingest(&s, &mut events);
        }
        assert_eq!(p.active_flows(), 16);
        // Evicted flows report their unanswered requests.
        assert_eq!(exchanges(&events).len(), 24);
        p.enforce_limits(2 + 61_000_000_000, &mut events);
        assert_eq!(p.active_flows(), 0);
    }

    #[test]
    fn other_protocols_are_reported_once() {
        let mut p = pipeline();
        let mut events: Vec<Seen> = Vec::new();
        p.ingest(
            &segment(Direction::Request, 1, &[0x16, 0x03, 0x01, 0x00, 0x10], 1, 0),
            &mut events,
        );
        p.ingest(
            &segment(Direction::Request, 6, &[0x01; 16], 2, 0),
            &mut events,
        );
        assert_eq!(
            events,
            [Seen::Other(Event::OtherProtocol(OtherProtocol::Tls))]
        );
    }
}
