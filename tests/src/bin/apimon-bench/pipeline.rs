//! The daemon's HTTP pipeline (reassembly, parsing, pairing) on one core, against a
//! plain httparse loop over the same messages, measured in the same run.

use std::{fmt::Write as _, net::SocketAddr, time::Instant};

use anyhow::Result;
use apimon_tests::segments::{MSS, Stream};
use monitor::{
    capture::{Direction, Segment},
    detect::State,
    http::{Event, Limits, Pipeline},
    policy::Policy,
};

const FLOWS: u32 = 2_000;
const REQUESTS_PER_FLOW: u32 = 20;
const ROUNDS: usize = 9;

const REQUEST: &[u8] = b"GET /api/v1/users/12345/orders?page=2&limit=50 HTTP/1.1\r\n\
Host: api.example.com\r\nUser-Agent: bench/1.0\r\nAccept: application/json\r\n\
Accept-Encoding: gzip, deflate\r\nAuthorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\n\
Connection: keep-alive\r\n\r\n";
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
Content-Length: 512\r\nDate: Fri, 27 Nov 2026 22:00:00 GMT\r\nServer: nginx\r\n\r\n";

pub struct PipelineResult {
    pub segments: usize,
    pub pipeline_rps: f64,
    pub pipeline_segments_per_s: f64,
    pub httparse_rps: f64,
    /// Median over rounds of pipeline speed / httparse speed.
    pub ratio: f64,
    /// The pipeline with the default policy's detections on every exchange.
    pub detecting_rps: f64,
    /// Detections' share of that: µs per exchange (fastest rounds compared).
    pub detection_us: f64,
}

/// Each segment's payload in its own allocation, as ring records are apart in memory.
fn payloads() -> Vec<Vec<u8>> {
    let response: Vec<u8> = [RESPONSE_HEAD, &[b'{'; 512][..]].concat();
    let mut out = Vec::new();
    for _ in 0..FLOWS * REQUESTS_PER_FLOW {
        for bytes in [REQUEST, response.as_slice()] {
            out.extend(bytes.chunks(MSS).map(<[u8]>::to_vec));
        }
    }
    out
}

/// The segments over `payloads`, in the order `payloads` made them.
fn segments(payloads: &[Vec<u8>]) -> Vec<Segment<'_>> {
    let mut payloads = payloads.iter();
    let mut out = Vec::new();
    let response: Vec<u8> = [RESPONSE_HEAD, &[b'{'; 512][..]].concat();
    for flow in 0..FLOWS {
        let client: SocketAddr =
            SocketAddr::new([10, 1, (flow >> 8) as u8, flow as u8].into(), 40000);
        let server: SocketAddr = "10.0.0.1:8080".parse().unwrap_or(client);
        let mut requests = Stream::new(Direction::Request, client, server, 1000);
        let mut responses = Stream::new(Direction::Response, client, server, 5000);
        for i in 0..REQUESTS_PER_FLOW {
            let t = u64::from(flow * REQUESTS_PER_FLOW + i) * 1000;
            for (stream, bytes) in [
                (&mut requests, REQUEST),
                (&mut responses, response.as_slice()),
            ] {
                // The same cut as `payloads` made, each piece from its own allocation.
                for _ in bytes.chunks(MSS) {
                    let Some(data) = payloads.next() else {
                        return out;
                    };
                    out.push(stream.next(data, t));
                }
            }
        }
    }
    out
}

/// Seconds one call of `f` took, and its result.
fn timed(f: &mut impl FnMut() -> usize) -> (f64, usize) {
    let start = Instant::now();
    let result = std::hint::black_box(f());
    (start.elapsed().as_secs_f64(), result)
}

/// A pipeline as the daemon runs it: one for the whole run.
fn pipeline() -> Pipeline {
    Pipeline::new(
        Limits {
            max_flows: 65_536,
            max_memory: 256 << 20,
            idle_timeout: std::time::Duration::from_secs(3600),
            body_inspect_bytes: 16 * 1024,
        },
        monitor::http::route::Routes::default(),
    )
}

/// Every segment through `pipeline`, as new connections (client port `round`), with
/// detections on each exchange when given a policy; returns the exchanges completed.
/// The pipeline lives across rounds, as in the daemon: its table and allocations are
/// warm, and the connections of earlier rounds stay in it, idle.
fn through_pipeline(
    pipeline: &mut Pipeline,
    segments: &[Segment],
    round: u16,
    detect: Option<(&Policy, &mut State)>,
) -> usize {
    let now = std::time::SystemTime::now();
    let mut exchanges = 0;
    let (policy, mut state) = detect.unzip();
    let mut observe = |event: Event<'_>| {
        if let Event::Exchange(exchange) = event {
            exchanges += 1;
            if let (Some(policy), Some(state)) = (policy, state.as_deref_mut()) {
                std::hint::black_box(policy.detections.inspect(exchange, state, now));
            }
        }
    };
    for segment in segments {
        let mut client = segment.client;
        client.set_port(round);
        pipeline.ingest(&Segment { client, ..*segment }, &mut observe);
    }
    exchanges
}

/// The baseline: httparse called on the same segments (the same bytes in the same
/// memory) wherever a head starts; returns the heads it parsed.
fn through_httparse(segments: &[Segment]) -> usize {
    let mut parsed = 0;
    for segment in segments {
        let data = std::hint::black_box(segment.data);
        let complete = match segment.direction {
            Direction::Request if data.starts_with(b"GET ") => {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut request = httparse::Request::new(&mut headers);
                matches!(request.parse(data), Ok(httparse::Status::Complete(_)))
            }
            Direction::Response if data.starts_with(b"HTTP/") => {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut response = httparse::Response::new(&mut headers);
                matches!(response.parse(data), Ok(httparse::Status::Complete(_)))
            }
            _ => false,
        };
        parsed += usize::from(complete);
    }
    parsed
}

pub fn run() -> Result<PipelineResult> {
    let payloads = payloads();
    let segments = segments(&payloads);
    let requests = (FLOWS * REQUESTS_PER_FLOW) as usize;
    // Rounds alternate between the two, so both see the same machine; the ratio is
    // the median of the per-round ratios.
    let policy = Policy::builtin();
    let mut state = State::default();
    let (mut plain, mut detecting) = (pipeline(), pipeline());
    let (mut pipeline_best, mut httparse_best) = (f64::INFINITY, f64::INFINITY);
    let mut detecting_best = f64::INFINITY;
    let mut ratios = Vec::new();
    for round in 0..ROUNDS as u16 {
        let port = 40_000 + round;
        let (detecting_s, _) = timed(&mut || {
            through_pipeline(&mut detecting, &segments, port, Some((&policy, &mut state)))
        });
        detecting_best = detecting_best.min(detecting_s);
        let (pipeline_s, exchanges) =
            timed(&mut || through_pipeline(&mut plain, &segments, port, None));
        anyhow::ensure!(
            exchanges == requests,
            "the pipeline paired {exchanges} of {requests} requests"
        );
        let (httparse_s, parsed) = timed(&mut || through_httparse(&segments));
        anyhow::ensure!(parsed == 2 * requests, "httparse parsed {parsed} heads");
        pipeline_best = pipeline_best.min(pipeline_s);
        httparse_best = httparse_best.min(httparse_s);
        ratios.push(httparse_s / pipeline_s);
    }
    ratios.sort_by(f64::total_cmp);
    Ok(PipelineResult {
        segments: segments.len(),
        pipeline_rps: requests as f64 / pipeline_best,
        pipeline_segments_per_s: segments.len() as f64 / pipeline_best,
        httparse_rps: requests as f64 / httparse_best,
        ratio: ratios[ratios.len() / 2],
        detecting_rps: requests as f64 / detecting_best,
        detection_us: (detecting_best - pipeline_best) * 1e6 / requests as f64,
    })
}

pub fn report(out: &mut String, result: &PipelineResult) -> std::fmt::Result {
    writeln!(out, "## HTTP pipeline: one core, in process")?;
    writeln!(out)?;
    writeln!(
        out,
        "{} keep-alive connections x {} request/response pairs ({} segments of at most {MSS} bytes), \
         fed through the daemon's reassembly, parsing, pairing and route templating; against a loop that only calls \
         httparse on the same segments wherever a head starts. Rounds alternate between the two; \
         rates are the fastest of {ROUNDS} rounds, the ratio is the median of the per-round ratios. \
         As in the daemon, one pipeline serves every round (each round's connections are new ones; \
         those of earlier rounds stay in its table, idle).",
        FLOWS, REQUESTS_PER_FLOW, result.segments
    )?;
    writeln!(out)?;
    writeln!(out, "| | exchanges/s | segments/s | vs plain httparse |")?;
    writeln!(out, "|---|---:|---:|---:|")?;
    writeln!(
        out,
        "| plain httparse loop | {:.0} | - | 1.00x |",
        result.httparse_rps
    )?;
    writeln!(
        out,
        "| apimon pipeline | {:.0} | {:.0} | {:.2}x |",
        result.pipeline_rps, result.pipeline_segments_per_s, result.ratio
    )?;
    writeln!(
        out,
        "| apimon pipeline + detections (default policy) | {:.0} | - | {:.2}x of the plain loop; detections {:.2} µs per exchange |",
        result.detecting_rps,
        result.detecting_rps / result.httparse_rps,
        result.detection_us
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "Target (issue 3): at least 0.5x the plain loop: {} in this run.",
        crate::verdict(result.ratio >= 0.5)
    )?;
    writeln!(out)
}
