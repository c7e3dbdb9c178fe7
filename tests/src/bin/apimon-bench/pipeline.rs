//! The daemon's HTTP pipeline (reassembly, parsing, pairing) on one core, against a
//! plain httparse loop over the same messages, measured in the same run.

use std::{fmt::Write as _, net::SocketAddr, time::Instant};

use anyhow::Result;
use monitor::{
    capture::{Direction, Segment},
    http::{Event, Limits, Pipeline},
};

const FLOWS: u32 = 2_000;
const REQUESTS_PER_FLOW: u32 = 20;
const ROUNDS: usize = 5;
/// Payload bytes per segment, as on an Ethernet MTU.
const MSS: usize = 1448;

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
}

fn segments() -> Vec<Segment> {
    let mut out = Vec::new();
    let response: Vec<u8> = [RESPONSE_HEAD, &[b'{'; 512][..]].concat();
    for flow in 0..FLOWS {
        let client: SocketAddr =
            SocketAddr::new([10, 1, (flow >> 8) as u8, flow as u8].into(), 40000);
        let server: SocketAddr = "10.0.0.1:8080".parse().unwrap_or(client);
        let (mut request_seq, mut response_seq) = (1000u32, 5000u32);
        for i in 0..REQUESTS_PER_FLOW {
            let t = u64::from(flow * REQUESTS_PER_FLOW + i) * 1000;
            for (direction, bytes, seq) in [
                (Direction::Request, REQUEST, &mut request_seq),
                (Direction::Response, response.as_slice(), &mut response_seq),
            ] {
                for chunk in bytes.chunks(MSS) {
                    out.push(Segment {
                        timestamp_ns: t,
                        ifindex: 1,
                        direction,
                        client,
                        server,
                        seq: *seq,
                        segment_len: chunk.len() as u32,
                        flags: 0,
                        data: chunk.to_vec(),
                    });
                    *seq = seq.wrapping_add(chunk.len() as u32);
                }
            }
        }
    }
    out
}

/// Best of `ROUNDS` timings of `f`, in seconds.
fn fastest(mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut best = f64::INFINITY;
    let mut result = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        result = std::hint::black_box(f());
        best = best.min(start.elapsed().as_secs_f64());
    }
    (best, result)
}

pub fn run() -> Result<PipelineResult> {
    let segments = segments();
    let requests = (FLOWS * REQUESTS_PER_FLOW) as usize;
    let (pipeline_s, exchanges) = fastest(|| {
        let mut pipeline = Pipeline::new(Limits {
            max_flows: 65_536,
            max_memory: 256 << 20,
            idle_timeout: std::time::Duration::from_secs(3600),
        });
        let mut events = Vec::new();
        let mut exchanges = 0;
        for segment in &segments {
            pipeline.ingest(segment, &mut events);
            exchanges += events
                .iter()
                .filter(|e| matches!(e, Event::Exchange(_)))
                .count();
            events.clear();
        }
        exchanges
    });
    anyhow::ensure!(
        exchanges == requests,
        "the pipeline paired {exchanges} of {requests} requests"
    );
    let response: Vec<u8> = [RESPONSE_HEAD, &[b'{'; 512][..]].concat();
    let (httparse_s, parsed) = fastest(|| {
        let mut parsed = 0;
        for _ in 0..requests {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            if matches!(
                request.parse(std::hint::black_box(REQUEST)),
                Ok(httparse::Status::Complete(_))
            ) {
                parsed += 1;
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if matches!(
                resp.parse(std::hint::black_box(&response)),
                Ok(httparse::Status::Complete(_))
            ) {
                parsed += 1;
            }
        }
        parsed
    });
    anyhow::ensure!(parsed == 2 * requests, "httparse parsed {parsed} messages");
    Ok(PipelineResult {
        segments: segments.len(),
        pipeline_rps: requests as f64 / pipeline_s,
        pipeline_segments_per_s: segments.len() as f64 / pipeline_s,
        httparse_rps: requests as f64 / httparse_s,
    })
}

pub fn report(out: &mut String, result: &PipelineResult) -> std::fmt::Result {
    writeln!(out, "## HTTP pipeline: one core, in process")?;
    writeln!(out)?;
    writeln!(
        out,
        "{} keep-alive connections x {} request/response pairs ({} segments of at most {MSS} bytes), \
         fed through the daemon's reassembly, parsing and pairing; against a loop that only calls \
         httparse on the same request and response heads. Fastest of {ROUNDS} rounds.",
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
        result.pipeline_rps,
        result.pipeline_segments_per_s,
        result.pipeline_rps / result.httparse_rps
    )?;
    writeln!(out)?;
    writeln!(out, "Target (issue 3): at least 0.5x the plain loop.")?;
    writeln!(out)
}
