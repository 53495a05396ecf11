#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! FPM ingest: zebra's byte stream → frames → netlink events → RIB → model changes, one core.
//!
//! `cargo bench -p bench --bench fpm_ingest`
//!
//! The stream is what zebra replays on connect with `fpm use-next-hop-groups` (the default):
//! 16 single nexthop objects (8 gateways on each of 2 interfaces) and 8 ECMP groups of 2, then
//! 100k routes, one netlink message per FPM frame: 90% Internet-like IPv4 prefixes and 10%
//! IPv6 /48s, each with `RTA_NH_ID` (3 in 4 a single nexthop, 1 in 4 a group), static protocol,
//! `NLM_F_REPLACE`, `RTA_PRIORITY`, `RTA_TABLE` 254, as 10.3 sends them.
//!
//! - `decode_only_frames`: framing and netlink decoding (frames/s);
//! - `to_model_changes_routes`: everything, into an empty RIB (agent start; routes/s);
//! - `replay_into_filled_rib_routes`: the same stream into the RIB it already fills (zebra
//!   reconnecting; routes/s).

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::hint::black_box;

use bench::tables::internet_v4;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use flow_offload::model::{MacAddr, PortId, Prefix, TableId};
use host_agent::fpm::build::{self, NlWriter, RouteSpec};
use host_agent::fpm::decode::{
    NexthopKind, PathSpec, RouteKind, RouteNexthops, NLM_F_REPLACE, NLM_F_REQUEST,
};
use host_agent::fpm::frame::encode_frame;
use host_agent::fpm::{
    decode_netlink, ChangeBatch, DecodeStats, FpmEvent, FrameDecoder, Rib, StaticAttribution,
};

const ROUTES: usize = 100_000;

fn stream() -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut frames = 0;
    let mut push = |w: NlWriter, out: &mut Vec<u8>| {
        encode_frame(&w.buf, out).unwrap();
        frames += 1;
    };
    for i in 0..16u32 {
        let mut w = NlWriter::new();
        let kind = NexthopKind::Single(PathSpec {
            gateway: Some(IpAddr::V4(Ipv4Addr::new(
                100,
                64,
                (i / 8) as u8,
                (i % 8) as u8 + 1,
            ))),
            ifindex: 2 + i / 8,
            vni: None,
            weight: 1,
        });
        build::nexthop(&mut w, i + 1, 11, Some(&kind));
        push(w, &mut out);
    }
    for g in 0..8u32 {
        let mut w = NlWriter::new();
        let kind = NexthopKind::Group(vec![(g + 1, 1), (g + 9, 1)]);
        build::nexthop(&mut w, 100 + g, 11, Some(&kind));
        push(w, &mut out);
    }
    let v4 = internet_v4(ROUTES * 9 / 10, 0x5eed);
    let mut routes = 0;
    for (i, (a, l)) in v4.into_iter().enumerate() {
        let nh = if i % 4 == 3 {
            RouteNexthops::Id(100 + (i as u32 % 8))
        } else {
            RouteNexthops::Id(1 + (i as u32 % 16))
        };
        let mut w = NlWriter::new();
        let spec = RouteSpec {
            table: 254,
            prefix: Prefix::v4(Ipv4Addr::from(a), l).unwrap(),
            protocol: 196,
            kind: RouteKind::Unicast,
            rtm_flags: 0,
            metric: Some(20),
            nexthops: Some(&nh),
        };
        build::route(&mut w, true, NLM_F_REQUEST | NLM_F_REPLACE, &spec);
        push(w, &mut out);
        routes += 1;
    }
    for i in 0..ROUTES / 10 {
        let a = Ipv6Addr::new(0x2001, 0xdb8 + (i >> 16) as u16, i as u16, 0, 0, 0, 0, 0);
        let nh = RouteNexthops::Id(1 + (i as u32 % 16));
        let mut w = NlWriter::new();
        let spec = RouteSpec {
            table: 254,
            prefix: Prefix::v6(a, 48).unwrap(),
            protocol: 196,
            kind: RouteKind::Unicast,
            rtm_flags: 0,
            metric: Some(20),
            nexthops: Some(&nh),
        };
        build::route(&mut w, true, NLM_F_REQUEST | NLM_F_REPLACE, &spec);
        push(w, &mut out);
        routes += 1;
    }
    assert_eq!(frames, routes + 24);
    (out, routes)
}

fn attribution() -> StaticAttribution {
    let mut a = StaticAttribution {
        default_mac: Some(MacAddr([2, 0, 0, 0, 0, 1])),
        ..Default::default()
    };
    a.tables.insert(254, TableId(254));
    a.ports.insert(2, PortId(0));
    a.ports.insert(3, PortId(1));
    a
}

/// Bytes in 64 KiB reads, as the server gets them.
fn ingest(bytes: &[u8], rib: &mut Rib, attr: &StaticAttribution) -> (usize, DecodeStats) {
    let mut d = FrameDecoder::new();
    let mut st = DecodeStats::default();
    let mut events: Vec<FpmEvent> = Vec::with_capacity(4096);
    let mut batch = ChangeBatch::new();
    let mut changes = 0;
    for chunk in bytes.chunks(64 * 1024) {
        d.extend(chunk);
        while let Some(f) = d.next_frame().unwrap() {
            decode_netlink(f, &mut events, &mut st);
        }
        rib.apply_all(&events, attr, &mut batch);
        events.clear();
        changes += batch.take().len();
    }
    (changes, st)
}

fn benches(c: &mut Criterion) {
    let (bytes, routes) = stream();
    let attr = attribution();
    let frames = (routes + 24) as u64;
    let (changes, st) = ingest(&bytes, &mut Rib::new(), &attr);
    assert_eq!(st.malformed, 0);
    assert_eq!(changes, routes, "every route becomes one model change");
    eprintln!(
        "fpm_ingest: {routes} routes, {frames} frames, {} bytes ({:.1} bytes/frame)",
        bytes.len(),
        bytes.len() as f64 / frames as f64
    );

    let mut g = c.benchmark_group("fpm_ingest");
    g.sample_size(20);
    g.throughput(Throughput::Elements(frames));
    g.bench_function("decode_only_frames", |b| {
        b.iter(|| {
            let mut d = FrameDecoder::new();
            let mut st = DecodeStats::default();
            let mut events = Vec::with_capacity(4096);
            for chunk in bytes.chunks(64 * 1024) {
                d.extend(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    decode_netlink(f, &mut events, &mut st);
                }
                black_box(&events);
                events.clear();
            }
            st
        })
    });
    g.throughput(Throughput::Elements(routes as u64));
    g.bench_function("to_model_changes_routes", |b| {
        b.iter_batched(
            Rib::new,
            |mut rib| {
                let r = ingest(&bytes, &mut rib, &attr);
                (rib, black_box(r))
            },
            BatchSize::LargeInput,
        )
    });
    // zebra reconnecting replays the same table into the RIB it already fills: in place.
    let mut warm = Rib::new();
    ingest(&bytes, &mut warm, &attr);
    g.bench_function("replay_into_filled_rib_routes", |b| {
        b.iter(|| black_box(ingest(&bytes, &mut warm, &attr)))
    });
    g.finish();
}

criterion_group!(fpm, benches);
criterion_main!(fpm);
