//! apimon kernel programs.
//!
//! `apimon_ingress` (XDP, or `apimon_ingress_tc` at TC ingress) parses each frame,
//! counts it per source address and per action, drops sources on the blocklist
//! (honouring each entry's expiry) unless the allowlist covers them, and samples HTTP
//! payload; `apimon_egress` (TC) samples responses. Each program is a thin entry
//! around a `try_` function.
#![no_std]
#![no_main]
// The bpf target has no `AtomicU64::fetch_add`; the intrinsic lowers to BPF's atomic add.
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "core_intrinsics for atomic adds on the bpf target"
)]

mod capture;
mod packet;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::bpf_ktime_get_coarse_ns,
    macros::{classifier, map, xdp},
    maps::{
        Array, HashMap, LruHashMap, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use monitor_common::{
    capture::{DIRECTION_REQUEST, DIRECTION_RESPONSE, TCP_ACK, TCP_SYN},
    datapath::{
        Action, ActionCounter, DatapathState, IpKey, IpStats, ListEntry, RateConfig, TokenBuckets,
    },
    maps::{
        COUNTER_IFACES, DEFAULT_ALLOWLIST_CAPACITY, DEFAULT_BLOCKLIST_CAPACITY,
        DEFAULT_IP_STATS_CAPACITY, DEFAULT_THROTTLE_CAPACITY, counter_index,
    },
};

use crate::{
    capture::{Payload, Segment},
    packet::{Packet, Parsed, Source},
};

// Map statics are named exactly as the constants in `monitor_common::maps`.
#[map]
static BLOCK_V4_HOSTS: HashMap<[u8; 4], ListEntry> =
    HashMap::with_max_entries(DEFAULT_BLOCKLIST_CAPACITY, BPF_F_NO_PREALLOC);
#[map]
static BLOCK_V6_HOSTS: HashMap<[u8; 16], ListEntry> =
    HashMap::with_max_entries(DEFAULT_BLOCKLIST_CAPACITY, BPF_F_NO_PREALLOC);
#[map]
static BLOCK_V4_NETS: LpmTrie<[u8; 4], ListEntry> =
    LpmTrie::with_max_entries(DEFAULT_BLOCKLIST_CAPACITY, 0);
#[map]
static BLOCK_V6_NETS: LpmTrie<[u8; 16], ListEntry> =
    LpmTrie::with_max_entries(DEFAULT_BLOCKLIST_CAPACITY, 0);
#[map]
static ALLOW_V4: LpmTrie<[u8; 4], ListEntry> =
    LpmTrie::with_max_entries(DEFAULT_ALLOWLIST_CAPACITY, 0);
#[map]
static ALLOW_V6: LpmTrie<[u8; 16], ListEntry> =
    LpmTrie::with_max_entries(DEFAULT_ALLOWLIST_CAPACITY, 0);
#[map]
static IP_STATS: LruHashMap<IpKey, IpStats> =
    LruHashMap::with_max_entries(DEFAULT_IP_STATS_CAPACITY, 0);
#[map]
static DATAPATH_STATE: Array<DatapathState> = Array::with_max_entries(1, 0);
#[map]
static THROTTLE_V4: LpmTrie<[u8; 4], ListEntry> =
    LpmTrie::with_max_entries(DEFAULT_THROTTLE_CAPACITY, 0);
#[map]
static THROTTLE_V6: LpmTrie<[u8; 16], ListEntry> =
    LpmTrie::with_max_entries(DEFAULT_THROTTLE_CAPACITY, 0);
#[map]
static RATE_CONFIG: Array<RateConfig> = Array::with_max_entries(1, 0);
#[map]
static RATE_STATE: LruHashMap<IpKey, TokenBuckets> =
    LruHashMap::with_max_entries(DEFAULT_IP_STATS_CAPACITY, 0);
#[map]
static IFACE_COUNTERS: PerCpuArray<ActionCounter> =
    PerCpuArray::with_max_entries(COUNTER_IFACES * Action::COUNT as u32, 0);

#[xdp]
pub fn apimon_ingress(ctx: XdpContext) -> u32 {
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    if try_apimon_ingress(&ctx, packet::parse(&pkt), pkt.len()).is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// The same ingress datapath at TC, where XDP does not fit (on veth, XDP costs more for
/// locally generated TCP than it saves).
#[classifier]
pub fn apimon_ingress_tc(ctx: TcContext) -> i32 {
    // Headers are read in the skb's linear part. Locally generated TCP keeps its
    // payload in page fragments, headers linear: pulling on every packet would copy
    // (and unclone) each one. So pull only when the headers did not fit.
    let mut parsed = packet::parse(&Packet::new(ctx.data(), ctx.data_end()));
    let cut_short = match parsed {
        Parsed::Malformed => true,
        Parsed::Ip { well_formed, .. } => !well_formed,
        Parsed::NotIp => false,
    };
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let wanted = ctx.len().min(TC_LINEAR_BYTES);
    if cut_short && linear < wanted && ctx.pull_data(wanted).is_ok() {
        parsed = packet::parse(&Packet::new(ctx.data(), ctx.data_end()));
    }
    if try_apimon_ingress(&ctx, parsed, u64::from(ctx.len())).is_drop() {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

/// Bytes of an skb's head the TC program needs linear: every header it parses.
const TC_LINEAR_BYTES: u32 = 256;

/// Egress: captures responses leaving the monitored server ports. Never drops.
#[classifier]
pub fn apimon_egress(ctx: TcContext) -> i32 {
    try_apimon_egress(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn try_apimon_egress(ctx: &TcContext) {
    let capture_enabled = DATAPATH_STATE
        .get(0)
        .is_some_and(|state| state.has(DatapathState::CAPTURE_ENABLED));
    if !capture_enabled {
        return;
    }
    let pkt = Packet::new(ctx.data(), ctx.data_end());
    if let Parsed::Ip {
        source,
        destination,
        well_formed: true,
        tcp: Some(tcp),
    } = packet::parse(&pkt)
    {
        capture::capture(
            ctx,
            &Segment {
                direction: DIRECTION_RESPONSE,
                client: destination,
                server: source.stats_key(),
                client_port: tcp.dest_port,
                server_port: tcp.source_port,
                tcp: &tcp,
            },
        );
    }
}

/// The benchmark's baseline: an XDP program that does nothing but pass.
#[xdp]
pub fn apimon_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Judges, counts and samples one received frame, as parsed; `bytes` is its full
/// length.
#[inline(always)]
fn try_apimon_ingress<C: EbpfContext + Payload>(ctx: &C, parsed: Parsed, bytes: u64) -> Action {
    let action = match parsed {
        Parsed::Ip {
            source,
            destination,
            well_formed,
            tcp,
        } => {
            // SAFETY: helper without preconditions.
            let now = unsafe { bpf_ktime_get_coarse_ns() };
            let state = DATAPATH_STATE.get(0).copied().unwrap_or_default();
            // The source as the maps key it (IPv4-mapped): statistics and capture.
            let key = source.stats_key();
            let syn = tcp
                .as_ref()
                .is_some_and(|t| t.flags & TCP_SYN != 0 && t.flags & TCP_ACK == 0);
            match judge_and_record(ctx, &source, key, bytes, now, &state) {
                Verdict::Blocked => Action::DropBlocklist,
                _ if !well_formed => Action::Malformed,
                // Allowlisted sources are never limited.
                Verdict::Unlisted
                    if state.has(DatapathState::RATE_CHECKS)
                        && over_rate(&source, key, syn, now, &state) =>
                {
                    Action::DropRatelimit
                }
                Verdict::Unlisted | Verdict::Allowed => {
                    if let Some(tcp) = &tcp
                        && state.has(DatapathState::CAPTURE_ENABLED)
                    {
                        capture::capture(
                            ctx,
                            &Segment {
                                direction: DIRECTION_REQUEST,
                                client: key,
                                server: destination,
                                client_port: tcp.source_port,
                                server_port: tcp.dest_port,
                                tcp,
                            },
                        );
                    }
                    Action::Pass
                }
            }
        }
        Parsed::NotIp => Action::Pass,
        Parsed::Malformed => Action::Malformed,
    };
    count(ctx.ifindex(), action, bytes);
    action
}

/// Judges a packet from `source` and counts it in the source's statistics. A source
/// that passed the lists since they last changed passes again without looking them up.
#[inline(always)]
fn judge_and_record<C: EbpfContext>(
    ctx: &C,
    source: &Source,
    key: IpKey,
    bytes: u64,
    now: u64,
    state: &DatapathState,
) -> Verdict {
    if let Some(stats) = IP_STATS.get_ptr_mut(key) {
        // SAFETY: `stats` points at a map value.
        let cached = state.epoch != 0 && unsafe { (*stats).pass_epoch } == state.epoch;
        let verdict = if cached {
            Verdict::Unlisted
        } else {
            verdict(source, now, state)
        };
        // SAFETY: as above.
        unsafe { add_to_source(stats, verdict, bytes, now, state.epoch) };
        return verdict;
    }
    let verdict = verdict(source, now, state);
    let drops = u64::from(verdict == Verdict::Blocked);
    let fresh = IpStats {
        packets: 1,
        bytes,
        drops,
        first_seen_ns: now,
        last_seen_ns: now,
        pass_epoch: if verdict == Verdict::Unlisted {
            state.epoch
        } else {
            0
        },
        _pad: 0,
    };
    if IP_STATS.insert(key, fresh, u64::from(BPF_NOEXIST)).is_err() {
        match IP_STATS.get_ptr_mut(key) {
            // Another CPU inserted the same source first: add to its entry instead.
            // SAFETY: `stats` points at a map value.
            Some(stats) => unsafe { add_to_source(stats, verdict, bytes, now, state.epoch) },
            // Rare by construction (an LRU map evicts rather than fails): off the fast path.
            None => warn!(ctx, "IP_STATS update failed"),
        }
    }
    verdict
}

/// The lists' judgement of a source.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// On no list: cacheable until the lists change.
    Unlisted,
    /// Allowlisted: passes, and counts a hit on its allow entry every time.
    Allowed,
    Blocked,
}

/// Allowlist first (it always wins), then the exact host hash, then the prefix trie;
/// maps the daemon marked empty are not looked up at all.
#[inline(always)]
fn verdict(source: &Source, now: u64, state: &DatapathState) -> Verdict {
    match source {
        Source::V4(addr) => judge(
            (state.has(DatapathState::PRESENT_ALLOW_V4), &ALLOW_V4),
            (
                state.has(DatapathState::PRESENT_BLOCK_V4_HOSTS),
                &BLOCK_V4_HOSTS,
            ),
            (
                state.has(DatapathState::PRESENT_BLOCK_V4_NETS),
                &BLOCK_V4_NETS,
            ),
            *addr,
            32,
            now,
        ),
        Source::V6(addr) => judge(
            (state.has(DatapathState::PRESENT_ALLOW_V6), &ALLOW_V6),
            (
                state.has(DatapathState::PRESENT_BLOCK_V6_HOSTS),
                &BLOCK_V6_HOSTS,
            ),
            (
                state.has(DatapathState::PRESENT_BLOCK_V6_NETS),
                &BLOCK_V6_NETS,
            ),
            *addr,
            128,
            now,
        ),
    }
}

/// One address family's lists; each map comes with "holds entries".
#[inline(always)]
fn judge<K>(
    (any_allowed, allow): (bool, &LpmTrie<K, ListEntry>),
    hosts: (bool, &HashMap<K, ListEntry>),
    nets: (bool, &LpmTrie<K, ListEntry>),
    addr: K,
    bits: u32,
    now: u64,
) -> Verdict
where
    K: Copy,
{
    if any_allowed && listed(allow, addr, bits, now) {
        Verdict::Allowed
    } else if blocked(hosts, nets, addr, bits, now) {
        Verdict::Blocked
    } else {
        Verdict::Unlisted
    }
}

/// The host hash keeps large lists of single addresses fast; prefixes live in the trie.
/// The daemon stores in each trie entry the latest deadline of all prefixes covering it,
/// so the longest match alone decides.
#[inline(always)]
fn blocked<K>(
    (any_hosts, hosts): (bool, &HashMap<K, ListEntry>),
    (any_nets, nets): (bool, &LpmTrie<K, ListEntry>),
    addr: K,
    bits: u32,
    now: u64,
) -> bool {
    if any_hosts
        && let Some(entry) = hosts.get_ptr_mut(&addr)
        && hit_if_live(entry, now)
    {
        return true;
    }
    any_nets && listed(nets, addr, bits, now)
}

#[inline(always)]
fn listed<K>(trie: &LpmTrie<K, ListEntry>, addr: K, bits: u32, now: u64) -> bool {
    live_entry(trie, addr, bits, now).is_some()
}

/// The live entry of `trie` covering `addr`, with a hit counted on it.
#[inline(always)]
fn live_entry<K>(
    trie: &LpmTrie<K, ListEntry>,
    addr: K,
    bits: u32,
    now: u64,
) -> Option<*mut ListEntry> {
    let entry = trie.get(Key::new(bits, addr))? as *const ListEntry as *mut ListEntry;
    hit_if_live(entry, now).then_some(entry)
}

/// Counts a hit on a live entry. Expired entries are ignored here; the daemon removes them.
#[inline(always)]
fn hit_if_live(entry: *mut ListEntry, now: u64) -> bool {
    // SAFETY: `entry` points at a map value, valid for the program's run.
    let live = unsafe { (*entry).is_live(now) };
    if live {
        // SAFETY: as above; the value is shared between CPUs, so the update is atomic.
        unsafe { atomic_add(&raw mut (*entry).hits, 1) };
    }
    live
}

/// Whether this packet exceeds its source's rate: a throttle entry's rate if one
/// covers the source, else the configured defaults (packets, and SYNs per second).
/// A dropped packet counts in the source's drops.
#[inline(always)]
fn over_rate(source: &Source, key: IpKey, syn: bool, now: u64, state: &DatapathState) -> bool {
    let defaults = RATE_CONFIG.get(0).copied().unwrap_or_default();
    let (pps, burst) = match throttled_rate(source, now, state) {
        Some(pps) => (pps, pps),
        None => (defaults.pps, defaults.pps_burst),
    };
    let limit_syn = syn && defaults.syn_ps != 0;
    if pps == 0 && !limit_syn {
        return false;
    }
    let buckets = match RATE_STATE.get_ptr_mut(key) {
        Some(buckets) => buckets,
        None => {
            // A new source starts with full buckets.
            let full = TokenBuckets {
                packets: u64::MAX >> 1,
                syns: u64::MAX >> 1,
                refilled_ns: now,
            };
            if RATE_STATE.insert(key, full, 0).is_err() {
                return false;
            }
            match RATE_STATE.get_ptr_mut(key) {
                Some(buckets) => buckets,
                None => return false,
            }
        }
    };
    // SAFETY: `buckets` points at a map value. CPUs racing on one source may each
    // refill once: the limit holds within a packet or two per CPU.
    let over = unsafe {
        let elapsed = now.saturating_sub((*buckets).refilled_ns);
        (*buckets).refilled_ns = now;
        // Both buckets refill on every packet that reaches them (the timestamp is
        // shared); only SYNs spend SYN tokens.
        let syn_ok = if limit_syn {
            TokenBuckets::take(
                &mut (*buckets).syns,
                elapsed,
                defaults.syn_ps,
                defaults.syn_burst,
            )
        } else {
            if defaults.syn_ps != 0 {
                TokenBuckets::refill(
                    &mut (*buckets).syns,
                    elapsed,
                    defaults.syn_ps,
                    defaults.syn_burst,
                );
            }
            true
        };
        let packet_ok =
            pps == 0 || TokenBuckets::take(&mut (*buckets).packets, elapsed, pps, burst);
        !(syn_ok && packet_ok)
    };
    if over && let Some(stats) = IP_STATS.get_ptr_mut(key) {
        // SAFETY: `stats` points at a map value shared between CPUs.
        unsafe { atomic_add(&raw mut (*stats).drops, 1) };
    }
    over
}

/// The rate of a live throttle entry covering `source`, counting a hit on it.
#[inline(always)]
fn throttled_rate(source: &Source, now: u64, state: &DatapathState) -> Option<u32> {
    let entry = match source {
        Source::V4(addr) if state.has(DatapathState::PRESENT_THROTTLE_V4) => {
            live_entry(&THROTTLE_V4, *addr, 32, now)
        }
        Source::V6(addr) if state.has(DatapathState::PRESENT_THROTTLE_V6) => {
            live_entry(&THROTTLE_V6, *addr, 128, now)
        }
        _ => None,
    }?;
    // SAFETY: `entry` points at a map value, valid for the program's run.
    Some(unsafe { (*entry).rate_pps })
}

/// Counts one packet in a source's statistics and caches an `Unlisted` verdict.
///
/// # Safety
/// `stats` must point at a live `IP_STATS` value.
#[inline(always)]
unsafe fn add_to_source(stats: *mut IpStats, verdict: Verdict, bytes: u64, now: u64, epoch: u32) {
    // SAFETY: the caller guarantees `stats`; it is shared between CPUs, so counters are atomic.
    unsafe {
        atomic_add(&raw mut (*stats).packets, 1);
        atomic_add(&raw mut (*stats).bytes, bytes);
        match verdict {
            Verdict::Blocked => atomic_add(&raw mut (*stats).drops, 1),
            Verdict::Unlisted if (*stats).pass_epoch != epoch => (*stats).pass_epoch = epoch,
            Verdict::Unlisted | Verdict::Allowed => {}
        }
        (*stats).last_seen_ns = now;
    }
}

/// Adds to a counter shared between CPUs.
///
/// # Safety
/// `counter` must point at a live map value.
#[inline(always)]
unsafe fn atomic_add(counter: *mut u64, value: u64) {
    // SAFETY: the caller guarantees `counter` is valid; BPF_ATOMIC add on 8 aligned bytes.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, value) };
}

#[inline(always)]
fn count(ifindex: u32, action: Action, bytes: u64) {
    if let Some(counter) = IFACE_COUNTERS.get_ptr_mut(counter_index(ifindex, action as u32)) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
