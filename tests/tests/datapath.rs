//! The XDP program on crafted frames through BPF_PROG_TEST_RUN: exact verdicts and
//! exact map effects, without a network.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly, with their location"
)]

use std::net::IpAddr;

use apimon_tests::{
    frames::{self, ETH_P_8021AD, ETH_P_8021Q, Ext, Frame, L4},
    testrun::{self, TestDatapath, XDP_DROP, XDP_PASS, run_ingress},
};
use ipnet::IpNet;
use monitor::{
    capture::{CaptureMaps, Direction, Positions as _, RecordRing as _, SampleRings, decode},
    clock,
    config::CaptureSettings,
    loader,
    maps::ListKind,
};
use monitor_common::{
    capture::sample_ring_bytes,
    datapath::{Action, ListEntry, RateConfig},
};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

fn net(text: &str) -> IpNet {
    monitor::cidr::parse(text).unwrap()
}

fn entry(expires_at_ns: u64) -> ListEntry {
    ListEntry {
        expires_at_ns,
        hits: 0,
        reason: 1,
        rate_pps: 0,
    }
}

fn block(dp: &mut TestDatapath, cidr: &str) {
    dp.maps
        .put(ListKind::Block, &net(cidr), entry(ListEntry::NEVER))
        .unwrap();
}

fn hits(dp: &TestDatapath, list: ListKind, cidr: &str) -> u64 {
    dp.maps
        .get(list, &net(cidr))
        .unwrap()
        .expect("entry present")
        .hits
}

fn source_stats(dp: &TestDatapath, ip: &str) -> monitor_common::datapath::IpStats {
    let ip: IpAddr = ip.parse().unwrap();
    dp.traffic
        .sources()
        .unwrap()
        .into_iter()
        .find(|(addr, _)| *addr == ip)
        .map(|(_, stats)| stats)
        .unwrap_or_else(|| panic!("no stats for {ip}"))
}

#[test]
fn ipv4_tcp_passes_and_is_counted_per_source() {
    let dp = TestDatapath::load();
    let frame = Frame::v4([198, 51, 100, 7]).with_payload(100).build();
    assert_eq!(dp.run(&frame), XDP_PASS);
    assert_eq!(dp.run(&frame), XDP_PASS);
    let pass = dp.counter(Action::Pass);
    assert_eq!(pass.packets, 2);
    assert_eq!(pass.bytes, 2 * frame.len() as u64);
    let stats = source_stats(&dp, "198.51.100.7");
    assert_eq!(
        (stats.packets, stats.bytes, stats.drops),
        (2, 2 * frame.len() as u64, 0)
    );
    assert!(stats.first_seen_ns > 0 && stats.last_seen_ns >= stats.first_seen_ns);
    assert_eq!(dp.counter(Action::Malformed).packets, 0);
}

#[test]
fn blocked_ipv4_host_is_dropped_and_hit_counted() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "198.51.100.7");
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 7]).build()), XDP_DROP);
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 8]).build()), XDP_PASS);
    assert_eq!(hits(&dp, ListKind::Block, "198.51.100.7"), 1);
    assert_eq!(dp.counter(Action::DropBlocklist).packets, 1);
    assert_eq!(dp.counter(Action::Pass).packets, 1);
    assert_eq!(source_stats(&dp, "198.51.100.7").drops, 1);
}

#[test]
fn blocked_ipv4_prefix_covers_its_addresses_only() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "203.0.113.0/24");
    for last in [0, 1, 128, 255] {
        assert_eq!(dp.run(&Frame::v4([203, 0, 113, last]).build()), XDP_DROP);
    }
    assert_eq!(dp.run(&Frame::v4([203, 0, 114, 1]).build()), XDP_PASS);
    assert_eq!(hits(&dp, ListKind::Block, "203.0.113.0/24"), 4);
}

#[test]
fn ipv6_prefix_and_host_blocks() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "2001:db8:bad::/64");
    block(&mut dp, "2001:db8:1::99");
    assert_eq!(dp.run(&Frame::v6("2001:db8:bad::1234").build()), XDP_DROP);
    assert_eq!(
        dp.run(&Frame::v6("2001:db8:bad:0:ffff::1").build()),
        XDP_DROP
    );
    assert_eq!(dp.run(&Frame::v6("2001:db8:bad:1::1").build()), XDP_PASS);
    assert_eq!(dp.run(&Frame::v6("2001:db8:1::99").build()), XDP_DROP);
    assert_eq!(dp.run(&Frame::v6("2001:db8:1::98").build()), XDP_PASS);
    assert_eq!(hits(&dp, ListKind::Block, "2001:db8:bad::/64"), 2);
    assert_eq!(source_stats(&dp, "2001:db8:1::99").drops, 1);
}

#[test]
fn expired_entries_no_longer_drop() {
    let mut dp = TestDatapath::load();
    // Deadline 1 ns after boot: long past. A live deadline an hour ahead still drops.
    dp.maps
        .put(ListKind::Block, &net("198.51.100.1"), entry(1))
        .unwrap();
    dp.maps
        .put(ListKind::Block, &net("198.51.100.0/24"), entry(1))
        .unwrap();
    let hour_ahead = clock::monotonic_ns() + 3_600_000_000_000;
    dp.maps
        .put(ListKind::Block, &net("198.51.100.2"), entry(hour_ahead))
        .unwrap();
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 1]).build()), XDP_PASS);
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 3]).build()), XDP_PASS);
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 2]).build()), XDP_DROP);
    assert_eq!(hits(&dp, ListKind::Block, "198.51.100.1"), 0);
}

#[test]
fn an_expired_host_falls_through_to_a_live_prefix() {
    let mut dp = TestDatapath::load();
    dp.maps
        .put(ListKind::Block, &net("198.51.100.1"), entry(1))
        .unwrap();
    block(&mut dp, "198.51.100.0/24");
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 1]).build()), XDP_DROP);
    assert_eq!(hits(&dp, ListKind::Block, "198.51.100.0/24"), 1);
}

#[test]
fn the_allowlist_beats_the_blocklist() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "10.0.0.0/8");
    block(&mut dp, "10.1.1.1");
    dp.maps
        .put(
            ListKind::Allow,
            &net("10.1.1.0/24"),
            entry(ListEntry::NEVER),
        )
        .unwrap();
    dp.maps
        .put(
            ListKind::Allow,
            &net("2001:db8::/32"),
            entry(ListEntry::NEVER),
        )
        .unwrap();
    block(&mut dp, "2001:db8::5");
    assert_eq!(dp.run(&Frame::v4([10, 1, 1, 1]).build()), XDP_PASS);
    assert_eq!(dp.run(&Frame::v4([10, 1, 1, 2]).build()), XDP_PASS);
    assert_eq!(dp.run(&Frame::v4([10, 1, 2, 1]).build()), XDP_DROP);
    assert_eq!(dp.run(&Frame::v6("2001:db8::5").build()), XDP_PASS);
    assert_eq!(hits(&dp, ListKind::Allow, "10.1.1.0/24"), 2);
    assert_eq!(hits(&dp, ListKind::Block, "10.1.1.1"), 0);
}

#[test]
fn vlan_tagged_frames_are_parsed() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "198.51.100.7");
    block(&mut dp, "2001:db8::7");
    let single = Frame::v4([198, 51, 100, 7]).with_vlans(&[(ETH_P_8021Q, 10)]);
    let double = Frame::v4([198, 51, 100, 7]).with_vlans(&[(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)]);
    let v6 = Frame::v6("2001:db8::7").with_vlans(&[(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)]);
    assert_eq!(dp.run(&single.build()), XDP_DROP);
    assert_eq!(dp.run(&double.build()), XDP_DROP);
    assert_eq!(dp.run(&v6.build()), XDP_DROP);
    // A third tag is beyond what we unwrap: passed, not judged, not malformed.
    let triple = Frame::v4([198, 51, 100, 7]).with_vlans(&[
        (ETH_P_8021AD, 1),
        (ETH_P_8021Q, 2),
        (ETH_P_8021Q, 3),
    ]);
    assert_eq!(dp.run(&triple.build()), XDP_PASS);
    assert_eq!(dp.counter(Action::Malformed).packets, 0);
}

#[test]
fn ipv4_options_and_fragments() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "198.51.100.7");
    assert_eq!(
        dp.run(&Frame::v4([198, 51, 100, 7]).with_ipv4_options(40).build()),
        XDP_DROP
    );
    assert_eq!(
        dp.run(&Frame::v4([198, 51, 100, 8]).with_ipv4_options(12).build()),
        XDP_PASS
    );
    // A non-first fragment has no transport header: judged by source, not malformed.
    let fragment = Frame::v4([198, 51, 100, 7])
        .with_l4(L4::None)
        .with_ipv4_fragment_offset(185);
    assert_eq!(dp.run(&fragment.build()), XDP_DROP);
    assert_eq!(dp.counter(Action::Malformed).packets, 0);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "2001:db8::7");
    let chain = [
        Ext::HopByHop,
        Ext::Routing,
        Ext::DestOpts,
        Ext::Fragment { offset: 0 },
    ];
    assert_eq!(
        dp.run(&Frame::v6("2001:db8::7").with_ext(&chain).build()),
        XDP_DROP
    );
    assert_eq!(
        dp.run(
            &Frame::v6("2001:db8::8")
                .with_ext(&chain)
                .with_l4(L4::Udp { dport: 53 })
                .build()
        ),
        XDP_PASS
    );
    let later_fragment = Frame::v6("2001:db8::7")
        .with_ext(&[Ext::Fragment { offset: 100 }])
        .with_l4(L4::None);
    assert_eq!(dp.run(&later_fragment.build()), XDP_DROP);
    assert_eq!(dp.counter(Action::Malformed).packets, 0);
}

#[test]
fn icmp_udp_and_non_ip_frames() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "198.51.100.7");
    assert_eq!(
        dp.run(&Frame::v4([198, 51, 100, 7]).with_l4(L4::Icmp).build()),
        XDP_DROP
    );
    assert_eq!(
        dp.run(
            &Frame::v4([198, 51, 100, 7])
                .with_l4(L4::Udp { dport: 53 })
                .build()
        ),
        XDP_DROP
    );
    assert_eq!(
        dp.run(&Frame::v6("2001:db8::1").with_l4(L4::Icmp).build()),
        XDP_PASS
    );
    assert_eq!(dp.run(&frames::arp()), XDP_PASS);
    assert_eq!(dp.counter(Action::Pass).packets, 2);
    assert_eq!(dp.counter(Action::Malformed).packets, 0);
}

/// Where the source address is trusted: the end of the fixed IP header.
fn source_known_at(frame: &Frame) -> usize {
    let ip_fixed = if frame.src.is_ipv4() { 20 } else { 40 };
    14 + 4 * frame.vlans.len() + ip_fixed
}

/// Every cut inside the headers is counted as malformed and passed, except that a
/// blocked source is dropped as soon as its address could be read: a broken later
/// header is no way around the blocklist.
#[test]
fn truncation_at_every_header_is_malformed_and_passed() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "198.51.100.7");
    block(&mut dp, "2001:db8::7");
    let blocked = [
        Frame::v4([198, 51, 100, 7])
            .with_vlans(&[(ETH_P_8021AD, 1), (ETH_P_8021Q, 2)])
            .with_ipv4_options(8),
        Frame::v4([198, 51, 100, 7]).with_l4(L4::Udp { dport: 53 }),
        Frame::v4([198, 51, 100, 7]).with_l4(L4::Icmp),
        Frame::v6("2001:db8::7").with_ext(&[Ext::HopByHop, Ext::Ah, Ext::Fragment { offset: 0 }]),
        Frame::v6("2001:db8::7")
            .with_l4(L4::Icmp)
            .with_vlans(&[(ETH_P_8021Q, 5)]),
    ];
    let (mut malformed, mut dropped) = (0, 0);
    for frame in &blocked {
        let unblocked = Frame {
            src: match frame.src {
                IpAddr::V4(_) => "198.51.100.8".parse().unwrap(),
                IpAddr::V6(_) => "2001:db8::8".parse().unwrap(),
            },
            ..frame.clone()
        };
        // BPF_PROG_TEST_RUN needs at least an Ethernet header.
        for cut in 14..frame.headers_len() {
            assert_eq!(
                dp.run(&unblocked.build()[..cut]),
                XDP_PASS,
                "cut at {cut} of {unblocked:?}"
            );
            malformed += 1;
            let verdict = dp.run(&frame.build()[..cut]);
            if cut >= source_known_at(frame) {
                assert_eq!(verdict, XDP_DROP, "cut at {cut} of blocked {frame:?}");
                dropped += 1;
            } else {
                assert_eq!(verdict, XDP_PASS, "cut at {cut} of blocked {frame:?}");
                malformed += 1;
            }
            assert_eq!(
                dp.counter(Action::Malformed).packets,
                malformed,
                "cut at {cut} of {frame:?}"
            );
        }
        assert_eq!(dp.run(&frame.build()), XDP_DROP, "whole frame {frame:?}");
        assert_eq!(
            dp.run(&unblocked.build()),
            XDP_PASS,
            "whole frame {unblocked:?}"
        );
        dropped += 1;
    }
    assert_eq!(dp.counter(Action::DropBlocklist).packets, dropped);
    assert_eq!(dp.counter(Action::Pass).packets, blocked.len() as u64);
}

#[test]
fn inconsistent_headers_are_malformed_but_still_judged() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "198.51.100.7");
    let with = |mutate: fn(&mut Vec<u8>), src: [u8; 4]| {
        let mut frame = Frame::v4(src).build();
        mutate(&mut frame);
        frame
    };
    let bad_ihl: fn(&mut Vec<u8>) = |f| f[14] = 0x44; // IHL 4 words < 20 bytes
    let bad_total: fn(&mut Vec<u8>) = |f| f[16..18].copy_from_slice(&10u16.to_be_bytes());
    let bad_doff: fn(&mut Vec<u8>) = |f| f[14 + 20 + 12] = 4 << 4;
    let bad_version: fn(&mut Vec<u8>) = |f| f[14] = 0x65;
    for mutate in [bad_ihl, bad_total, bad_doff] {
        assert_eq!(dp.run(&with(mutate, [198, 51, 100, 8])), XDP_PASS);
        assert_eq!(
            dp.run(&with(mutate, [198, 51, 100, 7])),
            XDP_DROP,
            "the source was readable"
        );
    }
    // A wrong version: nothing in the header can be trusted, not even the source.
    assert_eq!(dp.run(&with(bad_version, [198, 51, 100, 7])), XDP_PASS);
    let mut bad_v6_version = Frame::v6("2001:db8::7").build();
    bad_v6_version[14] = 0x40;
    assert_eq!(dp.run(&bad_v6_version), XDP_PASS);
    assert_eq!(dp.counter(Action::Malformed).packets, 5);
    assert_eq!(dp.counter(Action::DropBlocklist).packets, 3);
}

#[test]
fn ipv4_mapped_ipv6_sources_are_judged_as_ipv4() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "198.51.100.7");
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 7]).build()), XDP_DROP);
    assert_eq!(dp.run(&Frame::v6("::ffff:198.51.100.7").build()), XDP_DROP);
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 7]).build()), XDP_DROP);
    // An unblocked mapped source passes, counted under its IPv4 address.
    assert_eq!(dp.run(&Frame::v6("::ffff:198.51.100.9").build()), XDP_PASS);
    assert_eq!(source_stats(&dp, "198.51.100.9").packets, 1);
    assert_eq!(source_stats(&dp, "198.51.100.7").drops, 3);
}

#[test]
fn long_ipv6_header_chains_are_legal() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "2001:db8::7");
    // More extension headers than we walk, and one longer than we inspect: both are
    // legal, passed or dropped by source, never malformed.
    let many = [Ext::DestOpts; 8];
    let long = [Ext::HopByHop, Ext::LongDestOpts { units: 70 }];
    for chain in [&many[..], &long[..]] {
        assert_eq!(
            dp.run(&Frame::v6("2001:db8::8").with_ext(chain).build()),
            XDP_PASS
        );
        assert_eq!(
            dp.run(&Frame::v6("2001:db8::7").with_ext(chain).build()),
            XDP_DROP
        );
    }
    assert_eq!(dp.counter(Action::Malformed).packets, 0);
}

/// Sources that passed are not looked up again until a list changes; every change
/// (add, remove) must be seen by the very next packet.
#[test]
fn cached_pass_verdicts_end_with_any_list_change() {
    let mut dp = TestDatapath::load();
    let frame = Frame::v4([198, 51, 100, 7]).build();
    for _ in 0..3 {
        assert_eq!(dp.run(&frame), XDP_PASS);
    }
    block(&mut dp, "198.51.100.0/24");
    assert_eq!(
        dp.run(&frame),
        XDP_DROP,
        "a new block must not be hidden by a cached pass"
    );
    assert_eq!(dp.run(&frame), XDP_DROP);
    assert_eq!(
        hits(&dp, ListKind::Block, "198.51.100.0/24"),
        2,
        "every drop counts a hit"
    );
    dp.maps
        .remove(ListKind::Block, &net("198.51.100.0/24"))
        .unwrap();
    assert_eq!(dp.run(&frame), XDP_PASS);

    // An unrelated change invalidates too (the epoch is global): still a pass.
    block(&mut dp, "203.0.113.1");
    assert_eq!(dp.run(&frame), XDP_PASS);
    // And the host hash is consulted again after the next change.
    block(&mut dp, "198.51.100.7");
    assert_eq!(dp.run(&frame), XDP_DROP);
    let stats = source_stats(&dp, "198.51.100.7");
    assert_eq!((stats.packets, stats.drops), (8, 3));
}

#[test]
fn allowlisted_sources_count_a_hit_per_packet() {
    let mut dp = TestDatapath::load();
    dp.maps
        .put(
            ListKind::Allow,
            &net("198.51.100.0/24"),
            entry(ListEntry::NEVER),
        )
        .unwrap();
    let frame = Frame::v4([198, 51, 100, 7]).build();
    for _ in 0..4 {
        assert_eq!(dp.run(&frame), XDP_PASS);
    }
    assert_eq!(hits(&dp, ListKind::Allow, "198.51.100.0/24"), 4);
}

/// A trie lookup is a longest-prefix match; the daemon's view of "is this prefix
/// stored" must still be exact, or nested prefixes confuse counts and hits.
#[test]
fn nested_prefixes_are_distinct_entries() {
    let mut dp = TestDatapath::load();
    block(&mut dp, "198.51.100.0/24");
    assert!(
        dp.maps
            .get(ListKind::Block, &net("198.51.100.0/25"))
            .unwrap()
            .is_none()
    );
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 7]).build()), XDP_DROP);
    block(&mut dp, "198.51.100.0/25");
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 7]).build()), XDP_DROP);
    assert_eq!(hits(&dp, ListKind::Block, "198.51.100.0/24"), 1);
    assert_eq!(hits(&dp, ListKind::Block, "198.51.100.0/25"), 1);
    // Removing the inner prefix leaves the outer one in force.
    dp.maps
        .remove(ListKind::Block, &net("198.51.100.0/25"))
        .unwrap();
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 7]).build()), XDP_DROP);
    dp.maps
        .remove(ListKind::Block, &net("198.51.100.0/24"))
        .unwrap();
    assert_eq!(dp.run(&Frame::v4([198, 51, 100, 7]).build()), XDP_PASS);
}

/// Runs `frame` `times` times; returns how many passed.
fn passes(dp: &TestDatapath, frame: &[u8], times: usize) -> usize {
    (0..times).filter(|_| dp.run(frame) == XDP_PASS).count()
}

#[test]
fn default_packet_rate_limit_drops_over_the_burst_per_source() {
    let mut dp = TestDatapath::load();
    dp.maps
        .set_rate_limits(RateConfig {
            pps: 5,
            pps_burst: 5,
            ..RateConfig::default()
        })
        .unwrap();
    let frame = Frame::v4([198, 51, 100, 9]).established().build();
    // The burst passes; a refill of 5/s adds at most one more in this short run.
    let passed = passes(&dp, &frame, 20);
    assert!((5..=6).contains(&passed), "{passed} passed");
    let dropped = dp.counter(Action::DropRatelimit).packets;
    assert_eq!(dropped as usize, 20 - passed);
    assert_eq!(source_stats(&dp, "198.51.100.9").drops, dropped);
    // Another source has its own bucket.
    let other = Frame::v4([198, 51, 100, 10]).established().build();
    assert!(passes(&dp, &other, 5) == 5);
    // Allowlisted sources are never limited.
    dp.maps
        .put(
            ListKind::Allow,
            &net("198.51.100.9"),
            entry(ListEntry::NEVER),
        )
        .unwrap();
    assert_eq!(passes(&dp, &frame, 10), 10);
}

#[test]
fn syn_rate_limit_counts_only_new_connections() {
    let mut dp = TestDatapath::load();
    dp.maps
        .set_rate_limits(RateConfig {
            syn_ps: 3,
            syn_burst: 3,
            ..RateConfig::default()
        })
        .unwrap();
    let syn = Frame::v4([198, 51, 100, 11]).build();
    let ack = Frame::v4([198, 51, 100, 11]).established().build();
    let passed = passes(&dp, &syn, 10);
    assert!((3..=4).contains(&passed), "{passed} SYNs passed");
    assert_eq!(
        passes(&dp, &ack, 10),
        10,
        "established traffic is not a SYN"
    );
}

#[test]
fn a_throttle_entry_limits_its_source_until_it_expires() {
    let mut dp = TestDatapath::load();
    let throttle = |pps: u32, expires_at_ns: u64| ListEntry {
        rate_pps: pps,
        ..entry(expires_at_ns)
    };
    dp.maps
        .put(
            ListKind::Throttle,
            &net("2001:db8:7::/64"),
            throttle(2, ListEntry::NEVER),
        )
        .unwrap();
    let inside = Frame::v6("2001:db8:7::42").established().build();
    let outside = Frame::v6("2001:db8:8::42").established().build();
    let passed = passes(&dp, &inside, 10);
    assert!((2..=3).contains(&passed), "{passed} passed");
    assert!(hits(&dp, ListKind::Throttle, "2001:db8:7::/64") >= 10);
    assert_eq!(passes(&dp, &outside, 10), 10, "no default limit");
    // An expired throttle is ignored by the kernel.
    dp.maps
        .put(ListKind::Throttle, &net("2001:db8:7::/64"), throttle(2, 1))
        .unwrap();
    assert_eq!(passes(&dp, &inside, 10), 10);
}

#[test]
fn a_change_that_cannot_be_saved_changes_nothing() {
    use monitor::enforce::{Enforcer, state::StateFile};
    let dp = TestDatapath::load();
    let TestDatapath { ebpf, maps, .. } = dp;
    let verdict = |source: [u8; 4]| run_ingress(&ebpf, &Frame::v4(source).build());
    let dir = tempfile::tempdir().unwrap();
    let mut enforcer = Enforcer::open(maps, StateFile::new(dir.path())).unwrap();
    let kept = net("198.51.100.0/24");
    enforcer
        .add(ListKind::Block, &[kept], None, "kept", "cli")
        .unwrap();
    // The state file's place taken by a non-empty directory: the save must fail.
    let state = dir.path().join("lists.json");
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir_all(state.join("blocker")).unwrap();
    let renewed = enforcer.add(
        ListKind::Block,
        &[kept, net("203.0.113.9")],
        Some(std::time::Duration::from_secs(60)),
        "new",
        "cli",
    );
    assert!(renewed.is_err(), "the save failed, so must the change");
    let entries = enforcer.entries(ListKind::Block).unwrap();
    assert_eq!(entries.len(), 1, "the new entry was undone");
    assert_eq!(entries[0].entry.cidr, kept);
    assert_eq!(
        entries[0].entry.reason, "kept",
        "the renewed entry was restored"
    );
    assert_eq!(entries[0].entry.expires_at, None);
    // The kernel agrees: the new network passes, the kept one is still dropped.
    assert_eq!(verdict([203, 0, 113, 9]), XDP_PASS);
    assert_eq!(verdict([198, 51, 100, 7]), XDP_DROP);
    // A removal that cannot be saved is undone too.
    assert!(enforcer.remove(ListKind::Block, &[kept]).is_err());
    assert_eq!(enforcer.entries(ListKind::Block).unwrap().len(), 1);
    assert_eq!(verdict([198, 51, 100, 7]), XDP_DROP);
}

/// A datapath capturing with the default settings, and its sample rings.
fn capturing() -> (TestDatapath, SampleRings) {
    let mut dp = TestDatapath::load();
    dp.maps.set_capture_enabled(true).unwrap();
    CaptureMaps::new(&mut dp.ebpf)
        .unwrap()
        .configure(&CaptureSettings {
            ring_bytes: testrun::RING_BYTES,
            ..CaptureSettings::default()
        })
        .unwrap();
    let rings = SampleRings::take(&mut dp.ebpf).unwrap();
    (dp, rings)
}

/// The wake-ups the kernel sent through the sample rings, watched edge-triggered as the
/// daemon's reactor does: one event per wake-up, tagged with its ring.
struct WakeUps(Epoll);

const REQUESTS: u64 = 1;
const RESPONSES: u64 = 2;

impl WakeUps {
    fn watch(rings: &SampleRings) -> Self {
        let epoll = Epoll::new(EpollCreateFlags::empty()).unwrap();
        for (ring, tag) in [(&rings.requests, REQUESTS), (&rings.responses, RESPONSES)] {
            let interest = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, tag);
            epoll.add(ring, interest).unwrap();
        }
        Self(epoll)
    }

    /// The rings that woke the reader since the last call.
    fn take(&self) -> Vec<u64> {
        let mut events = [EpollEvent::empty(); 4];
        let woken = self.0.wait(&mut events, EpollTimeout::ZERO).unwrap();
        events[..woken].iter().map(EpollEvent::data).collect()
    }
}

#[test]
fn a_parked_reader_is_woken_by_the_next_sample_and_only_then() {
    let (dp, mut rings) = capturing();
    let watch = WakeUps::watch(&rings);
    let wake_ups = || watch.take();
    let (requests, responses) = (REQUESTS, RESPONSES);
    let client = Frame::v4([198, 51, 100, 9]);
    let syn = client.clone().build();
    let segment = client.clone().established().with_payload(10).build();

    rings.reader.set_parked(true).unwrap();
    // A SYN opens the connection's capture budget but yields no sample: no wake-up.
    assert_eq!(dp.run(&syn), XDP_PASS);
    assert!(rings.requests.next_record().is_none());
    assert_eq!(wake_ups(), [0u64; 0]);
    assert!(rings.reader.parked().unwrap());
    // Its first payload is a sample: the kernel wakes the reader and says so.
    assert_eq!(dp.run(&segment), XDP_PASS);
    assert_eq!(wake_ups(), [requests]);
    assert!(!rings.reader.parked().unwrap());
    let record = rings.requests.next_record().expect("a sample");
    assert_eq!(decode(&record).unwrap().data.len(), 10);
    drop(record);
    // A polling reader is not woken: it drains on its own timer.
    assert_eq!(dp.run(&segment), XDP_PASS);
    assert_eq!(wake_ups(), [0u64; 0]);
    assert!(rings.requests.next_record().is_some());

    // The reply leaves through the egress program, into the response ring: a parked
    // reader is woken through that ring.
    rings.reader.set_parked(true).unwrap();
    let reply = client.reply().established().with_payload(7).build();
    // TC_ACT_OK: capture never changes a packet's fate.
    assert_eq!(dp.run_tc(loader::EGRESS_PROGRAM, &reply, 1).0, 0);
    assert_eq!(wake_ups(), [responses]);
    assert!(!rings.reader.parked().unwrap());
    assert!(rings.requests.next_record().is_none());
    let record = rings.responses.next_record().expect("a response sample");
    let sample = decode(&record).unwrap();
    assert_eq!(
        (sample.direction, sample.data.len(), sample.client.port()),
        (Direction::Response, 7, 40000)
    );
}

/// Opens a connection from `client` and gives a payload of `len` bytes that starts a
/// request (so that each copy is captured whole), with a function that runs the
/// ingress program on that many segments carrying it.
fn request_segments(
    dp: &TestDatapath,
    client: [u8; 4],
    len: usize,
) -> (Vec<u8>, impl Fn(u32) -> u32 + '_) {
    let client = Frame::v4(client);
    assert_eq!(dp.run(&client.clone().build()), XDP_PASS);
    let mut payload = b"GET /".to_vec();
    payload.resize(len, b'a');
    let segment = client.established().build_with_payload(&payload);
    let run = move |times| dp.run_program(loader::INGRESS_PROGRAM, &segment, times).0;
    (payload, run)
}

#[test]
fn a_polling_reader_is_woken_by_the_sample_that_fills_a_quarter_of_its_ring() {
    let (dp, mut rings) = capturing();
    let wake_ups = WakeUps::watch(&rings);
    // At this size the record before the crossing one ends 16 bytes short of the
    // quarter: a record's size counted even 16 bytes too large would wake the reader
    // one record early.
    let (payload, run) = request_segments(&dp, [198, 51, 100, 11], 1985);
    let record = sample_ring_bytes(payload.len()) as usize;
    let quarter = testrun::RING_BYTES as usize / 4;
    // Records are as long as their data: the n-th crosses the quarter.
    let crossing = quarter.div_ceil(record) as u32;
    assert_eq!(quarter - (crossing as usize - 1) * record, 16);
    assert_eq!(run(crossing - 1), XDP_PASS);
    assert_eq!(wake_ups.take(), [0u64; 0], "below a quarter of the ring");
    assert_eq!(run(1), XDP_PASS);
    assert_eq!(wake_ups.take(), [REQUESTS], "the record that crossed it");
    assert_eq!(run(1), XDP_PASS);
    assert_eq!(wake_ups.take(), [0u64; 0], "already past it");
    let mut samples = 0;
    while let Some(record) = rings.requests.next_record() {
        assert_eq!(decode(&record).unwrap().data, &payload[..]);
        samples += 1;
    }
    assert_eq!(samples, crossing + 1);
}

#[test]
fn a_wake_up_lost_with_its_sample_to_a_full_ring_comes_with_the_next_one() {
    let (dp, mut rings) = capturing();
    let wake_ups = WakeUps::watch(&rings);
    let (payload, run) = request_segments(&dp, [198, 51, 100, 12], 2000);
    let fits = testrun::RING_BYTES / sample_ring_bytes(payload.len());
    assert_eq!(run(fits + 1), XDP_PASS);
    wake_ups.take();
    // The reader parks on a full ring (as if it had stalled): the next sample is lost,
    // and so would be its wake-up; the flag keeps asking for one.
    rings.reader.set_parked(true).unwrap();
    assert_eq!(run(1), XDP_PASS);
    assert_eq!(wake_ups.take(), [0u64; 0]);
    assert!(
        rings.reader.parked().unwrap(),
        "still waiting for a wake-up"
    );
    let mut samples = 0;
    while rings.requests.next_record().is_some() {
        samples += 1;
    }
    assert_eq!(samples, fits);
    assert_eq!(run(1), XDP_PASS);
    assert_eq!(
        wake_ups.take(),
        [REQUESTS],
        "the next sample that fits wakes it"
    );
    assert!(!rings.reader.parked().unwrap());
}

#[test]
fn a_ring_says_how_far_it_was_reserved_and_consumed() {
    let (dp, mut rings) = capturing();
    // What the merge asks when a read finds nothing: was everything reserved up to a
    // mark consumed? Read from the ring's own position pages, not from aya's reader.
    let positions = rings.requests.positions();
    let start = positions.reserved();
    assert!(positions.consumed(start));
    let client = Frame::v4([198, 51, 100, 10]);
    assert_eq!(dp.run(&client.clone().build()), XDP_PASS);
    assert_eq!(
        dp.run(&client.established().with_payload(10).build()),
        XDP_PASS
    );
    let after_sample = positions.reserved();
    assert_eq!(
        after_sample - start,
        sample_ring_bytes(10) as usize,
        "the kernel reserved a record as long as its data"
    );
    assert!(!positions.consumed(after_sample));
    assert!(
        positions.consumed(start),
        "what was reserved before it was consumed"
    );
    let responses = rings.responses.positions();
    assert!(responses.consumed(responses.reserved()));
    drop(rings.requests.next_record().expect("a sample"));
    assert!(
        positions.consumed(after_sample),
        "consumed, as aya published it"
    );
}
