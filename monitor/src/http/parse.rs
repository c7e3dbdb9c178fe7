//! Incremental HTTP/1.x parsing of one direction of a connection with httparse:
//! heads over any number of segments, Content-Length and chunked bodies, keep-alive
//! and pipelining, bodies the kernel did not capture, resynchronisation after gaps.

/// The methods of RFC 9110, and PATCH (case-sensitive, as methods are).
pub const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Head bytes we wait for before calling a message broken.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Header slots per request head (uninitialised, so many cost nothing).
const MAX_HEADERS: usize = 256;
/// httparse initialises response header slots, so fewer: servers send far fewer headers.
const MAX_RESPONSE_HEADERS: usize = 48;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// A request's head. Observers borrow it, so it is never shared: once its exchange is
/// reported its allocations serve a later request (see `Parsed::recycle`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead(Box<Head>);

/// The head as received, with the places of the fields apimon reads on every request.
/// Other headers are found in the text when asked for: most requests are never asked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Head {
    /// The head as text (invalid UTF-8 replaced), as httparse accepted it.
    raw: String,
    method: Span,
    target: Span,
    host: Option<Span>,
    user_agent: Option<Span>,
    header_count: u16,
    version: u8,
    content_length: Option<u64>,
    chunked: bool,
    framing: Framing,
}

/// Framing a server might read differently from a proxy: accepted (the last
/// Transfer-Encoding wins, equal Content-Lengths agree) but remembered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framing {
    /// Both Content-Length and Transfer-Encoding.
    pub length_and_encoding: bool,
    /// Content-Length more than once (with equal values).
    pub repeated_length: bool,
    /// Transfer-Encoding whose last coding is not `chunked`, or given twice.
    pub odd_encoding: bool,
}

/// Where a field sits in `RequestHead::raw`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// The place of `part`, a subslice of `whole`.
    fn of(whole: &[u8], part: &[u8]) -> Self {
        let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
        let start = start.min(whole.len());
        let end = (start + part.len()).min(whole.len());
        Self {
            start: start as u32,
            end: end as u32,
        }
    }
}

/// What one attempt at a request head gave.
#[derive(Debug)]
pub enum HeadParse<T> {
    /// The head, and how many bytes it took.
    Complete(T, usize),
    Partial,
    Invalid(ParseErrorKind),
    /// A well-formed head with framing that cannot be trusted.
    BadFraming(ParseErrorKind),
}

impl RequestHead {
    /// Parses a request head at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> HeadParse<Self> {
        Self::parse_reusing(bytes, &mut Vec::new())
    }

    /// Parses a request head, in the allocations of one of `spares` when complete.
    fn parse_reusing(bytes: &[u8], spares: &mut Vec<Self>) -> HeadParse<Self> {
        // Uninitialised header slots: initialising a hundred of them per request would
        // cost more than parsing the head.
        let mut headers =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let len = match request.parse_with_uninit_headers(bytes, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return HeadParse::Partial,
            Err(error) => return HeadParse::Invalid(ParseErrorKind::of_request(error, bytes)),
        };
        let raw = &bytes[..len];
        let Ok(text) = std::str::from_utf8(raw) else {
            // Rare (obs-text in a header value): parse the repaired text instead, so that
            // every field reads without checks.
            let repaired = String::from_utf8_lossy(raw).into_owned();
            return match Self::parse_reusing(repaired.as_bytes(), spares) {
                HeadParse::Complete(head, _) => HeadParse::Complete(head, len),
                HeadParse::Partial => HeadParse::Invalid(ParseErrorKind::InvalidHead),
                other => other,
            };
        };
        let fields = match HeaderFields::scan(request.headers) {
            Ok(fields) => fields,
            Err(kind) => return HeadParse::BadFraming(kind),
        };
        let span = |part: &[u8]| Span::of(raw, part);
        let fields = Head {
            raw: String::new(),
            method: span(request.method.unwrap_or_default().as_bytes()),
            target: span(request.path.unwrap_or_default().as_bytes()),
            host: fields.host.map(span),
            user_agent: fields.user_agent.map(span),
            header_count: u16::try_from(request.headers.len()).unwrap_or(u16::MAX),
            version: request.version.unwrap_or(1),
            content_length: fields.content_length,
            chunked: fields.chunked,
            framing: fields.framing,
        };
        let head = match spares.pop() {
            Some(Self(mut spare)) => {
                let mut raw = std::mem::take(&mut spare.raw);
                raw.clear();
                raw.push_str(text);
                *spare = Head { raw, ..fields };
                Self(spare)
            }
            None => Self(Box::new(Head {
                raw: text.to_owned(),
                ..fields
            })),
        };
        HeadParse::Complete(head, len)
    }

    fn text(&self, span: Span) -> &str {
        // Spans end at ASCII delimiters, so they are character boundaries.
        self.0
            .raw
            .get(span.start as usize..span.end as usize)
            .unwrap_or_default()
    }

    pub fn method(&self) -> &str {
        self.text(self.0.method)
    }

    /// Path and query as sent (origin form), or the absolute URI.
    pub fn target(&self) -> &str {
        self.text(self.0.target)
    }

    pub fn host(&self) -> Option<&str> {
        self.0.host.map(|span| self.text(span))
    }

    pub fn user_agent(&self) -> Option<&str> {
        self.0.user_agent.map(|span| self.text(span))
    }

    /// Every header as (name, value), in order, as httparse read them: the text was
    /// accepted by httparse, so its lines are exactly the empty lines it skips, the
    /// request line, then `name:value` lines (no folding), each ending in LF or CRLF,
    /// with the value's surrounding spaces and tabs not part of it.
    pub fn headers(&self) -> Vec<(&str, &str)> {
        let raw = &*self.0.raw;
        let bytes = raw.as_bytes();
        let mut headers = Vec::with_capacity(self.header_count());
        // Header lines start after the request line, which starts with the method.
        let request_line = self.0.method.start as usize;
        let Some(first) = memchr::memchr(b'\n', &bytes[request_line.min(bytes.len())..]) else {
            return headers;
        };
        let lines_start = request_line + first + 1;
        let mut start = lines_start;
        // Byte positions of ASCII delimiters: always character boundaries.
        for newline in memchr::memchr_iter(b'\n', &bytes[lines_start.min(bytes.len())..]) {
            let end = lines_start + newline;
            let line = raw.get(start..end).unwrap_or_default();
            start = end + 1;
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() {
                break;
            }
            // Names are short: a byte loop finds the colon sooner than a SIMD search.
            if let Some(colon) = line.bytes().position(|b| b == b':') {
                let name = line.get(..colon).unwrap_or_default();
                let value = line.get(colon + 1..).unwrap_or_default();
                headers.push((name, value.trim_matches(|c| c == ' ' || c == '\t')));
            }
        }
        headers
    }

    pub fn header_count(&self) -> usize {
        usize::from(self.0.header_count)
    }

    /// The minor version: HTTP/1.0 or HTTP/1.1.
    pub fn version(&self) -> u8 {
        self.0.version
    }

    pub fn content_length(&self) -> Option<u64> {
        self.0.content_length
    }

    /// The body is chunked (the last Transfer-Encoding says so).
    pub fn chunked(&self) -> bool {
        self.0.chunked
    }

    /// Framing signs detections read (request smuggling and friends).
    pub fn framing(&self) -> Framing {
        self.0.framing
    }

    /// The head as received (invalid UTF-8 replaced).
    pub fn raw(&self) -> &[u8] {
        self.0.raw.as_bytes()
    }
}

/// A request head from text (tests build exchanges with it).
#[cfg(test)]
pub fn request_head(text: &str) -> RequestHead {
    match RequestHead::parse(text.as_bytes()) {
        HeadParse::Complete(head, _) => head,
        other => panic!("not a complete head: {other:?}"),
    }
}

/// The headers apimon reads, found in one pass.
#[derive(Default)]
struct HeaderFields<'h> {
    host: Option<&'h [u8]>,
    user_agent: Option<&'h [u8]>,
    content_length: Option<u64>,
    chunked: bool,
    framing: Framing,
    encodings: u8,
}

impl<'h> HeaderFields<'h> {
    /// Duplicate, conflicting or unparsable Content-Length is an error (a smuggling
    /// sign; guessing would desynchronise the stream).
    fn scan(headers: &[httparse::Header<'h>]) -> Result<Self, ParseErrorKind> {
        let mut fields = Self::default();
        for header in headers {
            let name = header.name.as_bytes();
            // Dispatch on length first: most headers are none of these.
            match name.len() {
                4 if name.eq_ignore_ascii_case(b"host") => {
                    fields.host.get_or_insert(header.value);
                }
                10 if name.eq_ignore_ascii_case(b"user-agent") => {
                    fields.user_agent.get_or_insert(header.value);
                }
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    let parsed = decimal(header.value.trim_ascii())
                        .ok_or(ParseErrorKind::InvalidContentLength)?;
                    match fields.content_length {
                        Some(l) if l != parsed => return Err(ParseErrorKind::InvalidContentLength),
                        Some(_) => fields.framing.repeated_length = true,
                        None => {}
                    }
                    fields.content_length = Some(parsed);
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    // The last coding decides (`gzip, chunked` is chunked).
                    let last = header
                        .value
                        .rsplit(|b| *b == b',')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    fields.chunked = last.eq_ignore_ascii_case(b"chunked");
                    fields.encodings = fields.encodings.saturating_add(1);
                }
                _ => {}
            }
        }
        fields.framing.length_and_encoding =
            fields.encodings > 0 && fields.content_length.is_some();
        fields.framing.odd_encoding =
            fields.encodings > 1 || (fields.encodings == 1 && !fields.chunked);
        Ok(fields)
    }
}

/// A decimal number of digits only (Rust's parser takes `+5`, which servers read
/// apart); None when empty or over u64.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |number, &byte| {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        number.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub version: u8,
    pub content_length: Option<u64>,
    pub chunked: bool,
}

impl ResponseHead {
    /// An interim response (100 Continue, 103 Early Hints...): no body, and it answers
    /// nothing yet. 101 Switching Protocols is final.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }

    /// Parses a response head at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> HeadParse<Self> {
        let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() };
            MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            bytes,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return HeadParse::Partial,
            Err(_) => return HeadParse::Invalid(ParseErrorKind::InvalidHead),
        };
        match HeaderFields::scan(response.headers) {
            Ok(fields) => HeadParse::Complete(
                ResponseHead {
                    status: response.code.unwrap_or(0),
                    version: response.version.unwrap_or(1),
                    content_length: fields.content_length,
                    chunked: fields.chunked,
                },
                len,
            ),
            Err(kind) => HeadParse::BadFraming(kind),
        }
    }
}

/// Why bytes could not be parsed (a metric label: a small fixed set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParseErrorKind {
    InvalidHead,
    /// A version other than HTTP/1.0 or HTTP/1.1.
    InvalidVersion,
    /// A header line folded onto the next (obsolete line folding, RFC 9112 5.2).
    ObsFold,
    HeadTooLarge,
    InvalidContentLength,
    InvalidChunk,
    /// Bytes were lost mid-message; the stream waits for the next message start.
    Gap,
}

impl ParseErrorKind {
    pub const fn name(self) -> &'static str {
        match self {
            ParseErrorKind::InvalidHead => "invalid_head",
            ParseErrorKind::InvalidVersion => "invalid_version",
            ParseErrorKind::ObsFold => "obs_fold",
            ParseErrorKind::HeadTooLarge => "head_too_large",
            ParseErrorKind::InvalidContentLength => "invalid_content_length",
            ParseErrorKind::InvalidChunk => "invalid_chunk",
            ParseErrorKind::Gap => "gap",
        }
    }

    /// Why httparse refused a request head, as precisely as apimon reports it.
    fn of_request(error: httparse::Error, head: &[u8]) -> Self {
        // Within the head only: a body may hold anything.
        let head = &head[..find_head_end(head).unwrap_or(head.len())];
        let folded = || {
            memchr::memmem::find_iter(head, b"\n")
                .any(|at| matches!(head.get(at + 1), Some(b' ' | b'\t')))
        };
        match error {
            httparse::Error::Version => ParseErrorKind::InvalidVersion,
            httparse::Error::HeaderName | httparse::Error::HeaderValue if folded() => {
                ParseErrorKind::ObsFold
            }
            _ => ParseErrorKind::InvalidHead,
        }
    }
}

/// What a monitored port carries when it is not HTTP/1.x.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OtherProtocol {
    Tls,
    Http2,
    Binary,
    Text,
}

impl OtherProtocol {
    /// The `apimon_parse_errors_total` kind of a stream of this protocol.
    pub const fn metric_label(self) -> &'static str {
        match self {
            OtherProtocol::Tls => "not_http_tls",
            OtherProtocol::Http2 => "not_http_http2",
            OtherProtocol::Binary => "not_http_binary",
            OtherProtocol::Text => "not_http_text",
        }
    }

    /// What these first bytes of a stream recognisably are, if anything but text.
    pub fn recognise(bytes: &[u8]) -> Option<Self> {
        if bytes.len() >= 3 && bytes[0] == 0x16 && bytes[1] == 0x03 {
            Some(OtherProtocol::Tls)
        } else if bytes.starts_with(b"PRI * HTTP/2") {
            Some(OtherProtocol::Http2)
        } else if bytes
            .iter()
            .take(64)
            .any(|b| *b < 0x09 || (*b > 0x0d && *b < 0x20) || *b == 0x7f)
        {
            Some(OtherProtocol::Binary)
        } else {
            None
        }
    }

    fn sniff(bytes: &[u8]) -> Self {
        Self::recognise(bytes).unwrap_or(OtherProtocol::Text)
    }
}

/// Spare heads kept at most, and the largest text one may keep: a bound on what
/// recycling holds (about 256 KiB).
const MAX_SPARE_HEADS: usize = 64;
const MAX_SPARE_TEXT: usize = 4096;

/// What parsing produced, in stream order, and the heads of finished requests, whose
/// allocations the next heads reuse (no allocation per request once warm).
#[derive(Debug, Default)]
pub struct Parsed {
    items: Vec<Item>,
    spare_heads: Vec<RequestHead>,
}

impl Parsed {
    fn push(&mut self, item: Item) {
        self.items.push(item);
    }

    /// The items so far, in order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// Takes the items out, leaving the spare heads.
    pub fn take_items(&mut self) -> Vec<Item> {
        std::mem::take(&mut self.items)
    }

    /// Gives back the (emptied) list `take_items` returned, to reuse its allocation.
    pub fn return_items(&mut self, items: Vec<Item>) {
        debug_assert!(items.is_empty());
        self.items = items;
    }

    /// A head whose request is reported: its allocations serve a later head.
    pub fn recycle(&mut self, head: RequestHead) {
        if self.spare_heads.len() < MAX_SPARE_HEADS && head.0.raw.capacity() <= MAX_SPARE_TEXT {
            self.spare_heads.push(head);
        }
    }
}

/// What parsing produced, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    Request {
        head: RequestHead,
        started_ns: u64,
    },
    Response {
        head: ResponseHead,
        started_ns: u64,
    },
    /// The current message ended; its body had this many bytes (captured or not).
    End {
        body_bytes: u64,
    },
    Error(ParseErrorKind),
    /// The current message's body stopped short (the connection ended, or its framing
    /// broke) after this many bytes; no `End` follows.
    Cut {
        body_bytes: u64,
    },
    /// The request body as far as it is kept for inspection (chunking removed); comes
    /// before the request's `End` (or `Cut`), only when the body is not empty.
    Body(Vec<u8>),
    /// The stream is not HTTP/1.x; nothing more is parsed on it.
    NotHttp(OtherProtocol),
    /// A request, or a final response, whose head could not be read (it broke, or,
    /// for a response, part of it went missing in a gap): it still counts as one
    /// message, so that responses keep pairing with their own requests. Comes after
    /// its `Error`. `head_request`: a request whose method reads HEAD (its answer has
    /// no body).
    UnreadableHead {
        head_request: bool,
    },
}

#[derive(Debug)]
enum ChunkState {
    /// Reading a chunk-size line.
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines until an empty one.
    Trailers,
}

#[derive(Debug)]
enum State {
    Head,
    Body {
        remaining: u64,
        seen: u64,
    },
    Chunked {
        state: ChunkState,
        seen: u64,
    },
    /// A response framed by the connection's end.
    UntilClose {
        seen: u64,
    },
    /// Lost our place: waiting for a segment that starts a message.
    Resync,
    NotHttp,
}

#[derive(Debug)]
pub struct MessageParser {
    side: Side,
    state: State,
    buf: Vec<u8>,
    head_started_ns: u64,
    messages: u64,
    /// For responses: whether each pending request was a HEAD (no response body).
    head_requests: std::collections::VecDeque<bool>,
    /// Body bytes kept per message for inspection (0: none, as for responses).
    keep_body: usize,
    body: Vec<u8>,
    /// Bytes of the current body went missing: what follows is not kept.
    body_cut: bool,
}

/// True when `bytes` begin an HTTP/1.x message of this side.
pub fn starts_message(side: Side, bytes: &[u8]) -> bool {
    match side {
        Side::Request => {
            bytes.len() >= 4
                && monitor_common::capture::starts_request([bytes[0], bytes[1], bytes[2], bytes[3]])
        }
        Side::Response => bytes.starts_with(b"HTTP/"),
    }
}

impl MessageParser {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            state: State::Head,
            buf: Vec::new(),
            head_started_ns: 0,
            messages: 0,
            head_requests: std::collections::VecDeque::new(),
            keep_body: 0,
            body: Vec::new(),
            body_cut: false,
        }
    }

    /// Keeps up to `bytes` of each message's body (reported as `Item::Body`).
    pub fn keeping_body(mut self, bytes: usize) -> Self {
        self.keep_body = bytes;
        self
    }

    /// Keeps what fits of a body fragment.
    fn keep(&mut self, fragment: &[u8]) {
        let room = self.keep_body.saturating_sub(self.body.len());
        if room > 0 && !self.body_cut {
            self.body
                .extend_from_slice(&fragment[..room.min(fragment.len())]);
        }
    }

    /// Bytes buffered (for the flow table's memory bound).
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.body.len()
    }

    /// For a response parser: the next request awaiting a response was (not) a HEAD.
    pub fn expect_response(&mut self, to_head: bool) {
        self.head_requests.push_back(to_head);
    }

    /// Whether a gap of `missing` bytes falls inside the current body, which the
    /// kernel may simply not have captured.
    pub fn absorbs_gap(&self, missing: u64) -> bool {
        match self.state {
            State::Body { remaining, .. } => missing <= remaining,
            State::UntilClose { .. } | State::Resync | State::NotHttp => true,
            _ => false,
        }
    }

    /// Bytes went missing before what comes next.
    pub fn gap(&mut self, missing: u64, out: &mut Parsed) {
        match &mut self.state {
            State::Body { remaining, seen } if missing <= *remaining => {
                *remaining -= missing;
                *seen += missing;
                self.body_cut = true;
                if *remaining == 0 {
                    let body_bytes = *seen;
                    self.finish(body_bytes, out);
                }
            }
            State::UntilClose { seen } => *seen += missing,
            State::Resync | State::NotHttp => {}
            // Part of a head went missing: it counts as a message. A gap between two
            // messages may hold any number of them: none is guessed.
            State::Head if !self.buf.is_empty() => {
                let head = std::mem::take(&mut self.buf);
                self.fail_head(&head, ParseErrorKind::Gap, out);
            }
            _ => self.fail(ParseErrorKind::Gap, out),
        }
    }

    /// The message stops inside its body (the connection ended, or the framing broke):
    /// what was kept of the body comes out, and where it stopped.
    pub fn cut(&mut self, out: &mut Parsed) {
        if !self.body.is_empty() {
            out.push(Item::Body(std::mem::take(&mut self.body)));
        }
        if let Some(body_bytes) = self.body_seen() {
            out.push(Item::Cut { body_bytes });
        }
    }

    /// Body bytes of the current message so far, while inside a framed body.
    fn body_seen(&self) -> Option<u64> {
        match self.state {
            State::Body { seen, .. } | State::Chunked { seen, .. } => Some(seen),
            _ => None,
        }
    }

    /// The connection ended.
    pub fn close(&mut self, out: &mut Parsed) {
        if let State::UntilClose { seen } = self.state {
            self.finish(seen, out);
        }
    }

    fn finish(&mut self, body_bytes: u64, out: &mut Parsed) {
        if !self.body.is_empty() {
            out.push(Item::Body(std::mem::take(&mut self.body)));
        }
        self.body_cut = false;
        out.push(Item::End { body_bytes });
        self.state = State::Head;
    }

    /// Feeds in-order bytes that arrived at `now_ns`.
    pub fn feed(&mut self, mut data: &[u8], now_ns: u64, out: &mut Parsed) {
        if let State::Resync = self.state {
            if !starts_message(self.side, data) {
                return;
            }
            self.state = State::Head;
        }
        while !data.is_empty() {
            match &mut self.state {
                State::NotHttp | State::Resync => return,
                State::Head => {
                    if self.buf.is_empty() {
                        self.head_started_ns = now_ns;
                        // The common case: a whole head in one delivery, parsed in place.
                        if let Some(taken) = self.parse_head(data, out) {
                            data = &data[taken..];
                            continue;
                        }
                    }
                    let searched_from = self.buf.len().saturating_sub(3);
                    self.buf.extend_from_slice(data);
                    let Some(end) =
                        find_head_end(&self.buf[searched_from..]).map(|e| e + searched_from)
                    else {
                        if self.buf.len() > MAX_HEAD_BYTES {
                            let head = std::mem::take(&mut self.buf);
                            self.fail_head(&head, ParseErrorKind::HeadTooLarge, out);
                        } else if self.messages == 0 && self.looks_foreign() {
                            self.not_http(out);
                        }
                        return;
                    };
                    let rest = self.buf.split_off(end);
                    let head = std::mem::take(&mut self.buf);
                    if self.parse_head(&head, out).is_none() {
                        // A blank line ends every head: httparse cannot want more.
                        self.invalid_head(&head, ParseErrorKind::InvalidHead, out);
                    }
                    // What follows the head: a body, or the next message (pipelining).
                    if !rest.is_empty() {
                        self.feed(&rest, now_ns, out);
                    }
                    return;
                }
                State::Body { remaining, seen } => {
                    let take = (*remaining).min(data.len() as u64) as usize;
                    *remaining -= take as u64;
                    *seen += take as u64;
                    let done = (*remaining == 0).then_some(*seen);
                    self.keep(&data[..take]);
                    data = &data[take..];
                    if let Some(body_bytes) = done {
                        self.finish(body_bytes, out);
                    }
                }
                State::UntilClose { seen } => {
                    *seen += data.len() as u64;
                    return;
                }
                State::Chunked { .. } => {
                    data = self.feed_chunked(data, out);
                }
            }
        }
    }

    /// A head still incomplete: is this the start of something that is not HTTP/1.x?
    fn looks_foreign(&self) -> bool {
        self.buf.len() >= 4 && !starts_message(self.side, &self.buf)
    }

    fn not_http(&mut self, out: &mut Parsed) {
        out.push(Item::NotHttp(OtherProtocol::sniff(&self.buf)));
        self.buf.clear();
        self.state = State::NotHttp;
    }

    fn fail(&mut self, kind: ParseErrorKind, out: &mut Parsed) {
        // What was kept of a body whose framing broke is still inspected: breaking the
        // chunking after the payload must not hide the payload.
        self.cut(out);
        out.push(Item::Error(kind));
        self.buf.clear();
        self.body_cut = false;
        self.state = State::Resync;
    }

    /// A head httparse refused: on a fresh stream that means another protocol.
    fn invalid_head(&mut self, head: &[u8], kind: ParseErrorKind, out: &mut Parsed) {
        // Something that starts like HTTP stays HTTP (a broken request must not switch
        // its connection's later requests out of sight).
        if self.messages == 0 && !starts_message(self.side, head) {
            out.push(Item::NotHttp(OtherProtocol::sniff(head)));
            self.buf.clear();
            self.state = State::NotHttp;
        } else {
            self.fail_head(head, kind, out);
        }
    }

    /// A head that cannot be read: an error, and, if it started a request or a final
    /// response, one message all the same (a response's answers a request: the
    /// parser's queue of HEAD requests moves on with it).
    fn fail_head(&mut self, head: &[u8], kind: ParseErrorKind, out: &mut Parsed) {
        self.fail(kind, out);
        let start = after_blank_lines(head);
        let counts = match self.side {
            // A request head cut by a gap shows only when a later segment arrives,
            // after its response may have come and gone: counting it then would shift
            // the pairing instead of keeping it.
            Side::Request => kind != ParseErrorKind::Gap && starts_message(Side::Request, start),
            Side::Response => starts_final_response(head),
        };
        if counts {
            if self.side == Side::Response {
                self.head_requests.pop_front();
            }
            out.push(Item::UnreadableHead {
                head_request: self.side == Side::Request && start.starts_with(b"HEAD "),
            });
        }
    }

    /// Parses a head at the start of `bytes`: Some(length taken) when complete (or
    /// refused, with the state changed accordingly), None while incomplete.
    fn parse_head(&mut self, bytes: &[u8], out: &mut Parsed) -> Option<usize> {
        match self.side {
            Side::Request => {
                let parsed = RequestHead::parse_reusing(bytes, &mut out.spare_heads);
                self.take_head(parsed, bytes, out, Self::request_head)
            }
            Side::Response => {
                self.take_head(ResponseHead::parse(bytes), bytes, out, Self::response_head)
            }
        }
    }

    /// What a head parse means for the stream, on either side.
    fn take_head<T>(
        &mut self,
        parsed: HeadParse<T>,
        bytes: &[u8],
        out: &mut Parsed,
        accept: fn(&mut Self, T, &mut Parsed),
    ) -> Option<usize> {
        match parsed {
            HeadParse::Complete(head, len) => {
                accept(self, head, out);
                Some(len)
            }
            HeadParse::Partial => None,
            // A refused head takes the rest of the delivery: where it ends is not known
            // for sure (httparse may refuse it early), nor, with bad framing, where its
            // body ends. The stream resyncs at a later delivery that starts a message.
            HeadParse::Invalid(kind) => {
                self.invalid_head(bytes, kind, out);
                Some(bytes.len())
            }
            HeadParse::BadFraming(kind) => {
                self.fail_head(bytes, kind, out);
                Some(bytes.len())
            }
        }
    }

    fn request_head(&mut self, head: RequestHead, out: &mut Parsed) {
        self.messages += 1;
        self.state = if head.chunked() {
            State::Chunked {
                state: ChunkState::Size,
                seen: 0,
            }
        } else {
            match head.content_length() {
                Some(n) if n > 0 => State::Body {
                    remaining: n,
                    seen: 0,
                },
                _ => State::Head,
            }
        };
        let bodyless = matches!(self.state, State::Head);
        out.push(Item::Request {
            head,
            started_ns: self.head_started_ns,
        });
        if bodyless {
            out.push(Item::End { body_bytes: 0 });
        }
    }

    fn response_head(&mut self, head: ResponseHead, out: &mut Parsed) {
        let status = head.status;
        let interim = head.is_interim();
        let (content_length, chunked) = (head.content_length, head.chunked);
        self.messages += 1;
        out.push(Item::Response {
            head,
            started_ns: self.head_started_ns,
        });
        if interim {
            out.push(Item::End { body_bytes: 0 });
            self.state = State::Head;
            return;
        }
        let to_head = self.head_requests.pop_front().unwrap_or(false);
        self.state = if to_head || status == 204 || status == 304 || status == 101 {
            out.push(Item::End { body_bytes: 0 });
            if status == 101 {
                State::NotHttp
            } else {
                State::Head
            }
        } else if chunked {
            State::Chunked {
                state: ChunkState::Size,
                seen: 0,
            }
        } else {
            match content_length {
                Some(0) => {
                    out.push(Item::End { body_bytes: 0 });
                    State::Head
                }
                Some(n) => State::Body {
                    remaining: n,
                    seen: 0,
                },
                None => State::UntilClose { seen: 0 },
            }
        };
    }

    /// Chunked body bytes; returns what follows the body.
    fn feed_chunked<'d>(&mut self, mut data: &'d [u8], out: &mut Parsed) -> &'d [u8] {
        loop {
            let State::Chunked { state, seen } = &mut self.state else {
                return data;
            };
            match state {
                ChunkState::Data(left) => {
                    let take = (*left).min(data.len() as u64) as usize;
                    *left -= take as u64;
                    *seen += take as u64;
                    if *left == 0 {
                        *state = ChunkState::DataEnd;
                    }
                    self.keep(&data[..take]);
                    data = &data[take..];
                }
                ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailers => {
                    // Line-oriented states: gather a line in `buf`.
                    let Some(newline) = data.iter().position(|b| *b == b'\n') else {
                        self.buf.extend_from_slice(data);
                        if self.buf.len() > 4096 {
                            self.fail(ParseErrorKind::InvalidChunk, out);
                        }
                        return &[];
                    };
                    self.buf.extend_from_slice(&data[..=newline]);
                    data = &data[newline + 1..];
                    let line = std::mem::take(&mut self.buf);
                    let line = line.strip_suffix(b"\n").unwrap_or(&line);
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    let State::Chunked { state, seen } = &mut self.state else {
                        return data;
                    };
                    match state {
                        ChunkState::Size => {
                            let size = line.split(|b| *b == b';').next().unwrap_or_default();
                            // Hex digits only (`+5` and inner spaces are smuggling tricks);
                            // whitespace before an extension is tolerated.
                            let size = size.trim_ascii();
                            let size = (!size.is_empty() && size.iter().all(u8::is_ascii_hexdigit))
                                .then(|| std::str::from_utf8(size).ok())
                                .flatten()
                                .and_then(|s| u64::from_str_radix(s, 16).ok());
                            match size {
                                Some(0) => *state = ChunkState::Trailers,
                                Some(n) => *state = ChunkState::Data(n),
                                None => {
                                    self.fail(ParseErrorKind::InvalidChunk, out);
                                    return &[];
                                }
                            }
                        }
                        ChunkState::DataEnd => {
                            if !line.is_empty() {
                                self.fail(ParseErrorKind::InvalidChunk, out);
                                return &[];
                            }
                            *state = ChunkState::Size;
                        }
                        ChunkState::Trailers => {
                            if line.is_empty() {
                                let body_bytes = *seen;
                                self.finish(body_bytes, out);
                                return data;
                            }
                        }
                        ChunkState::Data(_) => {}
                    }
                }
            }
            if data.is_empty() {
                return data;
            }
        }
    }
}

/// The blank line that ends a head, searched with SIMD (a byte loop here was the
/// pipeline's largest cost).
static HEAD_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));

/// `bytes` after the blank lines httparse skips before a head.
fn after_blank_lines(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// Whether `head` starts a final response (not 1xx, but 101 is final), after the
/// blank lines httparse skips; a start too short to tell counts as one.
fn starts_final_response(head: &[u8]) -> bool {
    let head = after_blank_lines(head);
    let prefix = &head[..head.len().min(5)];
    if head.is_empty() || !b"HTTP/".starts_with(prefix) {
        return false;
    }
    // "HTTP/1.1 1xx": the status starts at byte 9.
    match (head.get(9), head.get(10..12)) {
        (Some(b'1'), Some(rest)) => rest == b"01",
        _ => true,
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    HEAD_END.find(bytes).map(|p| p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_heads_start_a_final_response() {
        for (head, final_response) in [
            (&b"HTTP/1.1 200 OK"[..], true),
            (b"\r\n\r\nHTTP/1.1 404", true),
            (b"HTTP/1.1 101 Switching", true),
            (b"HTTP/1.1 100 Continue", false),
            (b"HTTP/1.0 103", false),
            (b"HTT", true),
            (b"HTTP/1.1 1", true),
            (b"xyz HTTP/1.1 200", false),
            (b"\r\n", false),
            (b"", false),
        ] {
            assert_eq!(
                starts_final_response(head),
                final_response,
                "{}",
                String::from_utf8_lossy(head)
            );
        }
    }

    /// `headers()` reads the accepted text again: it must agree with httparse on
    /// every head httparse accepts (line endings, blank lines before the request
    /// line, spaces and tabs around values, colons inside values, empty values).
    #[test]
    fn headers_read_from_the_text_agree_with_httparse() {
        let mut heads: Vec<Vec<u8>> = [
            &b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"\r\n\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\nHost: h\nX-A:  spaced \t \n\n",
            b"POST /x HTTP/1.0\r\nX-Empty:\r\nX-Blank: \t\r\nX-Url: http://a:80/b?c=d\r\nX-In:a  b\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ]
        .iter()
        .map(|head| head.to_vec())
        .collect();
        // Random heads: names of token characters, values of visible characters,
        // spaces and tabs, either line ending, blank lines before the request line.
        let mut seed = 7u64;
        let mut next = |below: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % below
        };
        let token = b"abcXYZ019-_.!#$%&'*+^`|~";
        let value = b"abc XYZ\t019:;,/\"()<>@[]{}=?";
        for _ in 0..500 {
            let mut head = Vec::new();
            let eol = |next: &mut dyn FnMut(usize) -> usize| -> &'static [u8] {
                if next(2) == 0 { b"\r\n" } else { b"\n" }
            };
            for _ in 0..next(3) {
                head.extend_from_slice(eol(&mut next));
            }
            head.extend_from_slice(b"GET /p?q=1 HTTP/1.1");
            head.extend_from_slice(eol(&mut next));
            for _ in 0..next(12) {
                head.extend((0..1 + next(10)).map(|_| token[next(token.len())]));
                head.push(b':');
                head.extend((0..next(16)).map(|_| value[next(value.len())]));
                head.extend_from_slice(eol(&mut next));
            }
            head.extend_from_slice(eol(&mut next));
            heads.push(head);
        }
        for head in heads {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut expected = httparse::Request::new(&mut slots);
            let Ok(httparse::Status::Complete(_)) = expected.parse(&head) else {
                panic!("httparse refused {:?}", String::from_utf8_lossy(&head));
            };
            let expected: Vec<(&str, &str)> = expected
                .headers
                .iter()
                .map(|h| (h.name, std::str::from_utf8(h.value).unwrap_or("?")))
                .collect();
            let HeadParse::Complete(parsed, _) = RequestHead::parse(&head) else {
                panic!("refused {:?}", String::from_utf8_lossy(&head));
            };
            assert_eq!(
                parsed.headers(),
                expected,
                "{:?}",
                String::from_utf8_lossy(&head)
            );
            assert_eq!(parsed.header_count(), expected.len());
        }
    }

    #[test]
    fn invalid_utf8_in_a_header_is_replaced_not_fatal() {
        let head = b"GET /caf HTTP/1.1\r\nHost: h\r\nUser-Agent: caf\xe9 \xff\r\n\r\nrest";
        let HeadParse::Complete(parsed, len) = RequestHead::parse(head) else {
            panic!("a head with obs-text is a head");
        };
        assert_eq!(len, head.len() - 4, "the length is the original bytes'");
        assert_eq!(parsed.user_agent(), Some("caf\u{fffd} \u{fffd}"));
        assert_eq!((parsed.method(), parsed.target()), ("GET", "/caf"));
        assert_eq!(parsed.host(), Some("h"));
        assert_eq!(
            parsed.headers(),
            [("Host", "h"), ("User-Agent", "caf\u{fffd} \u{fffd}")]
        );
    }

    #[test]
    fn request_bodies_are_kept_for_inspection_up_to_the_limit() {
        let mut parser = MessageParser::new(Side::Request).keeping_body(8);
        let mut out = Parsed::default();
        parser.feed(
            b"POST /a HTTP/1.1\r\nContent-Length: 12\r\n\r\nhello ",
            0,
            &mut out,
        );
        parser.feed(b"world!", 1, &mut out);
        parser.feed(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", 2, &mut out);
        let bodies: Vec<&[u8]> = out
            .items()
            .iter()
            .filter_map(|i| match i {
                Item::Body(body) => Some(body.as_slice()),
                _ => None,
            })
            .collect();
        assert_eq!(
            bodies,
            [&b"hello wo"[..], b"abcde"],
            "cut at the limit; chunking removed"
        );
        assert!(
            out.items().contains(&Item::End { body_bytes: 12 }),
            "sizes stay whole"
        );
        let mut responses = MessageParser::new(Side::Response);
        let mut out = Parsed::default();
        responses.feed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            0,
            &mut out,
        );
        assert!(
            !out.items().iter().any(|i| matches!(i, Item::Body(_))),
            "responses keep none"
        );
    }

    #[test]
    fn refused_heads_say_why() {
        let kind = |head: &[u8]| match RequestHead::parse(head) {
            HeadParse::Invalid(kind) => kind,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            kind(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded\r\n\r\n"),
            ParseErrorKind::ObsFold
        );
        assert_eq!(
            kind(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
            ParseErrorKind::InvalidVersion
        );
        assert_eq!(
            kind(b"GET / HTTP/1.1\r\nBad Header: 1\r\n\r\n"),
            ParseErrorKind::InvalidHead
        );
        let HeadParse::Complete(head, _) = RequestHead::parse(
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: gzip\r\n\r\n",
        ) else {
            panic!("framing signs do not refuse a head");
        };
        assert!(head.framing().length_and_encoding && head.framing().odd_encoding);
        let HeadParse::Complete(head, _) = RequestHead::parse(
            b"POST / HTTP/1.1\r\nContent-Length:  0018446744073709551615 \r\n\r\n",
        ) else {
            panic!("the largest length is a length");
        };
        assert_eq!(head.content_length(), Some(u64::MAX));
        for length in ["+5", "5 5", "0x5", "", "-1", "18446744073709551616"] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {length}\r\n\r\n");
            assert!(
                matches!(
                    RequestHead::parse(head.as_bytes()),
                    HeadParse::BadFraming(ParseErrorKind::InvalidContentLength)
                ),
                "{length:?}"
            );
        }
        let mut parser = MessageParser::new(Side::Request);
        let mut out = Parsed::default();
        parser.feed(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
            0,
            &mut out,
        );
        assert!(
            out.items()
                .contains(&Item::Error(ParseErrorKind::InvalidChunk)),
            "{out:?}"
        );
        // A body kept before the chunking broke still comes out, before the error.
        let mut parser = MessageParser::new(Side::Request).keeping_body(64);
        let mut out = Parsed::default();
        parser.feed(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n' OR 1\r\nZZ\r\n",
            0,
            &mut out,
        );
        let after_head: Vec<&Item> = out.items().iter().skip(1).collect();
        assert_eq!(
            after_head,
            [
                &Item::Body(b"' OR 1".to_vec()),
                &Item::Cut { body_bytes: 6 },
                &Item::Error(ParseErrorKind::InvalidChunk)
            ]
        );
    }

    fn parse_all(side: Side, chunks: &[&[u8]]) -> Vec<Item> {
        let mut parser = MessageParser::new(side);
        let mut out = Parsed::default();
        for (i, chunk) in chunks.iter().enumerate() {
            parser.feed(chunk, i as u64, &mut out);
        }
        parser.close(&mut out);
        out.take_items()
    }

    fn request_targets(items: &[Item]) -> Vec<String> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Request { head, .. } => Some(format!("{} {}", head.method(), head.target())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn keep_alive_and_pipelined_requests() {
        let items = parse_all(
            Side::Request,
            &[b"GET /a?x=1 HTTP/1.1\r\nHost: api\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\n\r\n"],
        );
        assert_eq!(request_targets(&items), ["GET /a?x=1", "POST /b", "GET /c"]);
        assert_eq!(
            items
                .iter()
                .filter(|i| matches!(i, Item::End { .. }))
                .count(),
            3
        );
        assert!(items.contains(&Item::End { body_bytes: 3 }));
        let Item::Request { head, .. } = &items[0] else {
            panic!()
        };
        assert_eq!(head.host(), Some("api"));
    }

    #[test]
    fn a_head_over_many_segments_and_a_body_over_many() {
        let head = b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n";
        let mut chunks: Vec<&[u8]> = head.chunks(5).collect();
        chunks.extend([&b"{\"a\":"[..], &b"12345}"[..]]);
        let items = parse_all(Side::Request, &chunks);
        assert_eq!(request_targets(&items), ["POST /items"]);
        assert!(items.contains(&Item::End { body_bytes: 11 }));
        let Item::Request { started_ns, .. } = &items[0] else {
            panic!()
        };
        assert_eq!(
            *started_ns, 0,
            "a message starts when its first byte arrives"
        );
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers() {
        let items = parse_all(
            Side::Request,
            &[
                b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhel",
                b"lo\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nGET /next HTTP/1.1\r\n\r\n",
            ],
        );
        assert_eq!(request_targets(&items), ["POST /up", "GET /next"]);
        assert!(items.contains(&Item::End { body_bytes: 11 }));
    }

    #[test]
    fn responses_interim_head_and_close_framing() {
        let mut parser = MessageParser::new(Side::Response);
        let mut out = Parsed::default();
        parser.expect_response(false);
        parser.expect_response(true);
        parser.expect_response(false);
        parser.feed(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
            1,
            &mut out,
        );
        parser.feed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n",
            2,
            &mut out,
        );
        parser.feed(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", 3, &mut out);
        parser.close(&mut out);
        let statuses: Vec<u16> = out
            .items()
            .iter()
            .filter_map(|i| match i {
                Item::Response { head, .. } => Some(head.status),
                _ => None,
            })
            .collect();
        assert_eq!(statuses, [100, 201, 200, 200]);
        let ends: Vec<u64> = out
            .items()
            .iter()
            .filter_map(|i| match i {
                Item::End { body_bytes } => Some(*body_bytes),
                _ => None,
            })
            .collect();
        // 100: none; 201: 2; HEAD's 200: none though it says 99; close-framed: 13.
        assert_eq!(ends, [0, 2, 0, 13]);
    }

    #[test]
    fn uncaptured_body_bytes_are_a_gap_the_body_absorbs() {
        let mut parser = MessageParser::new(Side::Response);
        let mut out = Parsed::default();
        parser.expect_response(false);
        parser.feed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n",
            1,
            &mut out,
        );
        parser.feed(&[b'x'; 16000], 1, &mut out);
        assert!(parser.absorbs_gap(4_984_000));
        parser.gap(4_984_000, &mut out);
        assert_eq!(
            out.items().last(),
            Some(&Item::End {
                body_bytes: 5_000_000
            })
        );
    }

    #[test]
    fn a_gap_in_a_head_resyncs_at_the_next_request() {
        let mut parser = MessageParser::new(Side::Request);
        let mut out = Parsed::default();
        parser.feed(b"GET /first HTTP/1.1\r\n\r\nGET /sec", 1, &mut out);
        assert!(!parser.absorbs_gap(10));
        parser.gap(10, &mut out);
        parser.feed(b"ond-half-lost HTTP/1.1\r\n\r\n", 2, &mut out);
        parser.feed(b"GET /third HTTP/1.1\r\n\r\n", 3, &mut out);
        assert_eq!(request_targets(out.items()), ["GET /first", "GET /third"]);
        assert!(out.items().contains(&Item::Error(ParseErrorKind::Gap)));
    }

    #[test]
    fn other_protocols_are_recognised_not_parsed() {
        let tls = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
        assert_eq!(
            parse_all(Side::Request, &[&tls]),
            [Item::NotHttp(OtherProtocol::Tls)]
        );
        assert_eq!(
            parse_all(Side::Request, &[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]),
            [Item::NotHttp(OtherProtocol::Http2)]
        );
        assert_eq!(
            parse_all(Side::Request, &[&[0, 1, 2, 3, 4, 5]]),
            [Item::NotHttp(OtherProtocol::Binary)]
        );
        assert_eq!(
            parse_all(Side::Request, &[b"hello there\r\n"]),
            [Item::NotHttp(OtherProtocol::Text)]
        );
    }

    #[test]
    fn garbage_after_valid_requests_is_an_error_then_resync() {
        let items = parse_all(
            Side::Request,
            &[
                b"GET /ok HTTP/1.1\r\n\r\nGET \x01\x02 nonsense\r\n\r\n",
                b"GET /again HTTP/1.1\r\n\r\n",
            ],
        );
        assert_eq!(request_targets(&items), ["GET /ok", "GET /again"]);
        assert!(items.contains(&Item::Error(ParseErrorKind::InvalidHead)));
    }

    #[test]
    fn conflicting_lengths_are_refused() {
        let items = parse_all(
            Side::Request,
            &[b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"],
        );
        assert!(items.contains(&Item::Error(ParseErrorKind::InvalidContentLength)));
    }

    #[test]
    fn oversize_heads_are_refused() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        let items = parse_all(Side::Request, &[b"GET / HTTP/1.1\r\n\r\n", &big]);
        assert!(items.contains(&Item::Error(ParseErrorKind::HeadTooLarge)));
    }
}
