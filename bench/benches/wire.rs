#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
//! Host↔DPU framing of a large `Apply` batch.
//!
//! `cargo bench -p bench --bench wire`
//!
//! The message: `Message::Apply` with 10k `Change::UpsertRoute` of Internet-like IPv4 underlay
//! prefixes (`internet_v4`), each with one underlay next hop out of 8 gateways on 2 uplinks,
//! through `FrameCodec::default()` (postcard payload, CRC-32C, 12-byte header).

use core::net::{IpAddr, Ipv4Addr};
use std::hint::black_box;

use bench::tables::internet_v4;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flow_offload::model::{
    Change, MacAddr, Nexthop, PortId, Prefix, Route, RouteKey, UNDERLAY_TABLE,
};
use flow_offload::wire::frame::FrameCodec;
use flow_offload::wire::{Apply, Message};

const ROUTES: usize = 10_000;
const GATEWAYS: usize = 8;

fn apply_message() -> Message {
    let changes = internet_v4(ROUTES, 0x5eed)
        .into_iter()
        .enumerate()
        .map(|(i, (a, l))| {
            let g = i % GATEWAYS;
            Change::UpsertRoute(Route {
                key: RouteKey {
                    table: UNDERLAY_TABLE,
                    prefix: Prefix::v4(Ipv4Addr::from(a), l).unwrap(),
                },
                nexthops: vec![Nexthop::Underlay {
                    gateway: IpAddr::V4(Ipv4Addr::new(100, 64, 0, g as u8 + 1)),
                    port: PortId((g % 2) as u16),
                    mac: MacAddr([0x02, 0, 0, 0, 0x01, g as u8 + 1]),
                }],
            })
        })
        .collect::<Vec<_>>();
    assert_eq!(changes.len(), ROUTES);
    Message::Apply(Apply {
        epoch: 42,
        full: false,
        changes,
    })
}

fn benches(c: &mut Criterion) {
    let codec = FrameCodec::default();
    let msg = apply_message();
    let mut frame = Vec::new();
    codec.encode(&msg, &mut frame).unwrap();
    let (back, used) = codec.decode::<Message>(&frame).unwrap().unwrap();
    assert_eq!(used, frame.len(), "decode should consume the whole frame");
    assert!(back == msg, "decoded message differs from the encoded one");
    eprintln!(
        "wire: Apply with {ROUTES} UpsertRoute = {} bytes framed ({:.1} bytes/route)",
        frame.len(),
        frame.len() as f64 / ROUTES as f64
    );

    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(ROUTES as u64));
    let mut out = Vec::with_capacity(frame.len());
    g.bench_function("encode_apply_10k", |b| {
        b.iter(|| {
            out.clear();
            codec.encode(black_box(&msg), &mut out).unwrap();
            black_box(&out);
        })
    });
    // Decoding allocates the changes; freeing them is left out of the timing.
    g.bench_function("decode_apply_10k", |b| {
        b.iter_with_large_drop(|| codec.decode::<Message>(black_box(&frame)).unwrap())
    });
    g.finish();
}

criterion_group!(wire_benches, benches);
criterion_main!(wire_benches);
