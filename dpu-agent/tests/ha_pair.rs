//! The pair runtime (`dpu_agent::ha`), **in one process**: two `HaRuntime`s, each with its own
//! software pipeline, talking over real loopback TCP, roles set through `HaHandle::set_role`
//! as the host link does. These are unit tests of the runtime, not of two `dpu-agent`
//! processes (those, with roles from a real host agent and etcd, are in
//! `tests/tests/pair_e2e.rs`, without traffic). Packets go through each member's pipeline
//! directly (no DPDK, no root), so NAT sessions can be created, looked at and answered.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dpu_agent::agent::SharedPipeline;
use dpu_agent::config::Member;
use dpu_agent::ha::{
    HaRuntime, HaStatus, PairSettings, Switchover, SwitchoverAbort, SwitchoverPhase,
};
use flow_offload::ha::role::{Role, RoleConfig};
use flow_offload::ha::sync::SyncConfig;
use flow_offload::model::*;
use flow_offload::packet::{self, EthernetFrame, Ipv4Packet, TcpPacket, UdpPacket};
use flow_offload::soft::nat::{NatSessionRecord, Proto, TcpState, TCP_ACK, TCP_SYN};
use flow_offload::soft::{DropReason, Pipeline, PipelineLimits, Verdict};

const UPLINK: PortId = PortId(0);
const VPC_PORT: PortId = PortId(1);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const POOL: (Ipv4Addr, Ipv4Addr) = (Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 4));

fn mac(x: u8) -> MacAddr {
    MacAddr([2, 0, 0, 0, 0, x])
}

fn n(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn route(table: u32, prefix: &str, nexthops: Vec<Nexthop>) -> Change {
    Change::UpsertRoute(Route {
        key: RouteKey {
            table: TableId(table),
            prefix: prefix.parse().unwrap(),
        },
        nexthops,
    })
}

/// A VPC with a NAPT44 rule breaking out to the underlay (the same on both members).
fn model() -> Model {
    let mut m = Model::new();
    m.apply(&[
        Change::SetNode(Node {
            vtep: Ipv4Addr::new(192, 0, 2, 1),
            router_mac: mac(1),
            uplinks: BTreeSet::from([UPLINK]),
        }),
        Change::UpsertVpc(Vpc {
            name: n("blue"),
            vni: Vni::new(100).unwrap(),
            table: TableId(10),
            ports: BTreeSet::from([VPC_PORT]),
        }),
        route(
            254,
            "0.0.0.0/0",
            vec![Nexthop::Underlay {
                gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
                port: UPLINK,
                mac: mac(254),
            }],
        ),
        route(
            10,
            "10.0.0.0/8",
            vec![Nexthop::Underlay {
                gateway: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                port: VPC_PORT,
                mac: mac(0x10),
            }],
        ),
        route(
            10,
            "0.0.0.0/0",
            vec![Nexthop::Vrf {
                table: UNDERLAY_TABLE,
            }],
        ),
        Change::UpsertNat(NatRule {
            name: n("out"),
            vpc: n("blue"),
            kind: NatKind::Napt44 {
                pool: Ipv4Range {
                    first: POOL.0,
                    last: POOL.1,
                },
                ports: (1024, 65535),
            },
        }),
    ])
    .unwrap();
    m
}

fn frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), tcp: Option<u8>) -> Vec<u8> {
    let l4_len = if tcp.is_some() { 20 } else { 12 };
    let mut f = vec![0u8; 14 + 20 + l4_len];
    packet::EthernetRepr {
        src: mac(0x10).0,
        dst: mac(1).0,
        ethertype: packet::ethertype::IPV4,
    }
    .emit(&mut EthernetFrame::new_unchecked(&mut f[..]));
    {
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        packet::Ipv4Repr {
            src: src.0,
            dst: dst.0,
            protocol: if tcp.is_some() { 6 } else { 17 },
            ttl: 64,
            dscp_ecn: 0,
            ident: 1,
            dont_frag: true,
            payload_len: l4_len,
        }
        .emit(&mut ip);
        ip.fill_checksum();
    }
    let l4 = &mut f[34..];
    match tcp {
        Some(flags) => {
            let mut t = TcpPacket::new_unchecked(&mut l4[..]);
            packet::TcpRepr {
                src_port: src.1,
                dst_port: dst.1,
                seq: 1,
                ack: 0,
                flags,
                window: 1024,
            }
            .emit(&mut t);
            t.fill_checksum(src.0, dst.0);
        }
        None => {
            let len = l4.len();
            let mut u = UdpPacket::new_unchecked(&mut l4[..]);
            packet::UdpRepr {
                src_port: src.1,
                dst_port: dst.1,
            }
            .emit(&mut u);
            u.set_len(len as u16);
            u.fill_checksum(src.0, dst.0);
        }
    }
    f
}

/// (src, sport, dst, dport) of an IPv4 UDP/TCP frame.
fn fields(f: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let ip = Ipv4Packet::new_checked(&f[14..]).unwrap();
    let (s, d) = (ip.src_addr(), ip.dst_addr());
    let (sp, dp) = match ip.protocol() {
        6 => {
            let t = TcpPacket::new_checked(ip.payload()).unwrap();
            (t.src_port(), t.dst_port())
        }
        _ => {
            let u = UdpPacket::new_checked(ip.payload()).unwrap();
            (u.src_port(), u.dst_port())
        }
    };
    ((s, sp), (d, dp))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn limits() -> PipelineLimits {
    PipelineLimits {
        nat_sessions: 1 << 16,
        ..PipelineLimits::default()
    }
}

/// Every NAT session of a member: (protocol, inside endpoint) → (outside endpoint, TCP state).
type Sessions = BTreeMap<(Proto, (Ipv4Addr, u16)), ((Ipv4Addr, u16), Option<TcpState>)>;

/// One member: its pipeline (on its own clock) and its runtime.
struct MemberUnderTest {
    pipe: SharedPipeline,
    clock: Instant,
    rt: Option<HaRuntime>,
}

impl MemberUnderTest {
    fn start(member: Member, listen: u16, peer: u16) -> MemberUnderTest {
        Self::start_with(member, listen, peer, 1 << 16, Duration::from_secs(20))
    }

    fn start_with(
        member: Member,
        listen: u16,
        peer: u16,
        change_log: usize,
        keepalive: Duration,
    ) -> MemberUnderTest {
        Self::start_on(member, listen, peer, change_log, keepalive, &model())
    }

    fn start_on(
        member: Member,
        listen: u16,
        peer: u16,
        change_log: usize,
        keepalive: Duration,
        m: &Model,
    ) -> MemberUnderTest {
        Self::start_full(
            member,
            listen,
            peer,
            change_log,
            keepalive,
            m,
            role_config(),
        )
    }

    fn start_full(
        member: Member,
        listen: u16,
        peer: u16,
        change_log: usize,
        keepalive: Duration,
        m: &Model,
        role: RoleConfig,
    ) -> MemberUnderTest {
        let pipe = Arc::new(Mutex::new(Pipeline::new(m, limits(), 7).unwrap()));
        let clock = Instant::now();
        let settings = PairSettings {
            member,
            sync_listen: SocketAddr::from(([127, 0, 0, 1], listen)),
            peer: SocketAddr::from(([127, 0, 0, 1], peer)),
            change_log,
            keepalive,
            sync: SyncConfig::default(),
            role,
        };
        let rt = HaRuntime::start(settings, pipe.clone(), clock).unwrap();
        MemberUnderTest {
            pipe,
            clock,
            rt: Some(rt),
        }
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    fn status(&self) -> HaStatus {
        self.rt.as_ref().unwrap().handle().status()
    }

    fn set_role(&self, epoch: u64, active: bool) {
        self.set_role_until(epoch, active, Instant::now() + Duration::from_secs(60));
    }

    fn request_switchover(&self, epoch: u64) {
        self.rt.as_ref().unwrap().handle().request_switchover(epoch);
    }

    fn set_role_until(&self, epoch: u64, active: bool, until: Instant) {
        self.rt
            .as_ref()
            .unwrap()
            .handle()
            .set_role(epoch, active, until);
    }

    /// An outbound flow from `inside`; the verdict and the translated source.
    fn out(&self, inside: (Ipv4Addr, u16), tcp: Option<u8>) -> (Verdict, (Ipv4Addr, u16)) {
        let mut f = frame(inside, (SERVER, 53), tcp);
        let now = self.now();
        let v = self
            .pipe
            .lock()
            .unwrap()
            .process(&mut f, VPC_PORT, None, now);
        (v, fields(&f).0)
    }

    /// A reply from the server to `outside`; the verdict and the translated destination.
    fn reply(&self, outside: (Ipv4Addr, u16), tcp: Option<u8>) -> (Verdict, (Ipv4Addr, u16)) {
        let mut f = frame((SERVER, 53), outside, tcp);
        let now = self.now();
        let v = self.pipe.lock().unwrap().process(&mut f, UPLINK, None, now);
        (v, fields(&f).1)
    }

    /// Every NAT session: inside endpoint → (outside endpoint, TCP state).
    fn sessions(&self) -> Sessions {
        let p = self.pipe.lock().unwrap();
        let mut cursor = p.nat_replica_cursor();
        let mut recs = Vec::new();
        while !p.export_nat_replicas(&mut cursor, 4096, self.now(), &mut recs) {}
        recs.into_iter()
            .map(|r| match r.session {
                NatSessionRecord::Napt44(s) => ((s.proto, s.inside), (s.outside, s.tcp_state)),
                NatSessionRecord::Nat64(_) => panic!("no NAT64 rule here"),
            })
            .collect()
    }
}

/// The role timing of the tests: a long lease, a short stand-down.
fn role_config() -> RoleConfig {
    RoleConfig {
        lease_ttl_ns: 60_000_000_000,
        stand_down_ns: 200_000_000,
        ..RoleConfig::default()
    }
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn host(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | (i / 200 + 2) << 8 | (i % 200 + 2))
}

fn block_a(port: u16) -> bool {
    (1024..=33279).contains(&port)
}

/// A active (epoch 5), B standby, connected and B Ready.
fn pair() -> (MemberUnderTest, MemberUnderTest, u16, u16) {
    pair_with(role_config())
}

/// [`pair`] with this role timing on both members.
fn pair_with(role: RoleConfig) -> (MemberUnderTest, MemberUnderTest, u16, u16) {
    let (pa, pb) = (free_port(), free_port());
    let start = |member, listen, peer| {
        MemberUnderTest::start_full(
            member,
            listen,
            peer,
            1 << 16,
            Duration::from_secs(20),
            &model(),
            role.clone(),
        )
    };
    let a = start(Member::A, pa, pb);
    let b = start(Member::B, pb, pa);
    assert_eq!(a.status().role, Role::Standby, "standby until told");
    assert!(!a.status().allocating);
    assert_eq!(
        a.out((host(0), 1), None).0,
        Verdict::Drop(DropReason::NatNotActive),
        "a member never allocates before set_role"
    );
    a.set_role(5, true);
    b.set_role(5, false);
    wait_for("A active and allocating", Duration::from_secs(5), || {
        let s = a.status();
        s.role == Role::Active { epoch: 5 } && s.allocating
    });
    wait_for("B connected and Ready", Duration::from_secs(10), || {
        let s = b.status();
        s.connected && s.ready
    });
    (a, b, pa, pb)
}

#[test]
fn unit_pair_replicates_creations_state_changes_and_deletions_with_the_same_bindings() {
    let (a, b, _, _) = pair();
    // 300 UDP flows and 20 TCP flows opened and answered on A.
    let mut flows = Vec::new();
    for i in 0..300 {
        let (v, o) = a.out((host(i), 4000), None);
        assert_eq!(v, Verdict::Tx(UPLINK));
        assert!(block_a(o.1), "member a allocates from its half: {o:?}");
        flows.push(((host(i), 4000), o, None));
    }
    for i in 0..20 {
        let inside = (host(i), 5000);
        let (v, o) = a.out(inside, Some(TCP_SYN));
        assert_eq!(v, Verdict::Tx(UPLINK));
        assert_eq!(a.reply(o, Some(TCP_SYN | TCP_ACK)).0, Verdict::Tx(VPC_PORT));
        flows.push((inside, o, Some(TCP_ACK)));
    }
    wait_for(
        "B holds every session, A's lag drained",
        Duration::from_secs(10),
        || b.status().sessions == 320 && a.status().lag_events == 0,
    );
    let on_a = a.sessions();
    let on_b = b.sessions();
    assert_eq!(
        on_a, on_b,
        "same sessions, outside endpoints and TCP states"
    );
    assert!(on_b
        .values()
        .any(|(_, st)| *st == Some(TcpState::Established)));
    // B translates every flow both ways with A's bindings, without allocating.
    for (inside, outside, tcp) in &flows {
        let (v, to) = b.reply(*outside, *tcp);
        assert_eq!((v, to), (Verdict::Tx(VPC_PORT), *inside));
        let (v, from) = b.out(*inside, *tcp);
        assert_eq!((v, from), (Verdict::Tx(UPLINK), *outside));
    }
    // The standby never allocates: a new flow is dropped with the reason.
    assert_eq!(
        b.out((host(999), 1), None).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
    assert!(!b.status().allocating);
    assert_eq!(b.pipe.lock().unwrap().nat_totals(), (320, 1));
    // Deletions propagate.
    for (inside, _, _) in flows.iter().take(100) {
        a.pipe
            .lock()
            .unwrap()
            .napt_remove_session(&n("out"), Proto::Udp, *inside, (SERVER, 53))
            .unwrap();
    }
    wait_for(
        "B drops the deleted sessions",
        Duration::from_secs(10),
        || b.status().sessions == 220,
    );
    for (_, outside, tcp) in flows.iter().take(100) {
        assert_eq!(
            b.reply(*outside, *tcp).0,
            Verdict::Drop(DropReason::NoSession)
        );
    }
    assert_eq!(a.sessions(), b.sessions());
    assert_eq!(b.status().counters.import_errors, 0);
    // Status is published every few milliseconds: A's counters catch up.
    wait_for(
        "A's view: peer Ready, every change sent",
        Duration::from_secs(5),
        || {
            let sa = a.status();
            sa.ready && sa.connected && sa.counters.events_sent >= 300 + 2 * 20 + 100
        },
    );
}

#[test]
fn unit_restarted_standby_catches_up_by_snapshot_and_only_then_reports_ready() {
    let (a, b, _, pb) = pair();
    const N: u32 = 20_000;
    for i in 0..N {
        assert_eq!(a.out((host(i), 7000), None).0, Verdict::Tx(UPLINK));
    }
    wait_for(
        "B holds the first sessions",
        Duration::from_secs(20),
        || b.status().sessions == N as usize,
    );
    let served = a.status().counters.snapshots_served;
    // "Kill" the standby: its runtime and its tables are gone.
    drop(b);
    wait_for("A notices", Duration::from_secs(5), || {
        !a.status().connected
    });
    // Changes while it is away: new sessions and deletions.
    for i in N..N + 1000 {
        assert_eq!(a.out((host(i), 7000), None).0, Verdict::Tx(UPLINK));
    }
    for i in 0..500 {
        a.pipe
            .lock()
            .unwrap()
            .napt_remove_session(&n("out"), Proto::Udp, (host(i), 7000), (SERVER, 53))
            .unwrap();
    }
    let before_restart = a.sessions();
    // A fresh standby on the same address, with empty tables.
    let b2 = MemberUnderTest::start(Member::B, pb, 0);
    b2.set_role(5, false);
    // Traffic on A goes on while B2 catches up: the snapshot runs under the live stream.
    let mut extra = N + 1000;
    let mut first_ready: Option<(usize, HaStatus)> = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while first_ready.is_none() {
        assert!(
            Instant::now() < deadline,
            "B2 never Ready: {:?}",
            b2.status()
        );
        if extra < N + 3000 {
            assert_eq!(a.out((host(extra), 7000), None).0, Verdict::Tx(UPLINK));
            extra += 1;
        }
        let s = b2.status();
        if s.ready {
            let held = b2.sessions();
            first_ready = Some((held.len(), s));
            // Ready means complete: everything A held before the restart is here, with the
            // same outside endpoint.
            for (k, v) in &before_restart {
                assert_eq!(held.get(k), Some(v), "missing at Ready: {k:?}");
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let (held, s) = first_ready.unwrap();
    assert!(
        held >= before_restart.len(),
        "{held} < {}",
        before_restart.len()
    );
    assert!(s.counters.snapshots_requested >= 1, "{s:?}");
    wait_for(
        "A's count of snapshots served",
        Duration::from_secs(5),
        || a.status().counters.snapshots_served > served,
    );
    // And then it follows the stream exactly.
    wait_for("B2 equals A", Duration::from_secs(10), || {
        a.status().lag_events == 0 && a.sessions() == b2.sessions()
    });
    assert_eq!(b2.status().counters.import_errors, 0);
    assert!(!b2.status().allocating);
}

#[test]
fn unit_roles_swap_and_the_new_active_allocates_from_its_own_block() {
    let (a, b, _, _) = pair();
    let (_, o_a) = a.out((host(1), 9000), None);
    assert!(block_a(o_a.1));
    wait_for("B has A's session", Duration::from_secs(10), || {
        b.status().sessions == 1
    });
    // Failover: A loses the key, B takes it with a newer epoch.
    a.set_role(6, false);
    b.set_role(6, true);
    wait_for("B active", Duration::from_secs(5), || b.status().allocating);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = a.status();
        if s.role == Role::Standby && s.connected && s.ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never followed B: {s:?}\n{:?}",
            b.status()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!a.status().allocating);
    // The established flow keeps its binding on B; new flows use B's half.
    assert_eq!(b.out((host(1), 9000), None), (Verdict::Tx(UPLINK), o_a));
    let (v, o_b) = b.out((host(2), 9000), None);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert!(
        !block_a(o_b.1),
        "member b allocates from the other half: {o_b:?}"
    );
    wait_for("A has B's new session", Duration::from_secs(10), || {
        a.sessions() == b.sessions() && a.status().sessions == 2
    });
    assert_eq!(
        a.out((host(3), 9000), None).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
}

#[test]
fn unit_a_peer_with_the_same_member_letter_is_refused() {
    let (pa, pb) = (free_port(), free_port());
    let a = MemberUnderTest::start(Member::A, pa, pb);
    let also_a = MemberUnderTest::start(Member::A, pb, pa);
    a.set_role(3, true);
    also_a.set_role(3, false);
    wait_for("the refusal", Duration::from_secs(5), || {
        also_a.status().counters.peers_refused > 0
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(!also_a.status().connected);
    assert!(!a.status().connected);
    assert_eq!(also_a.status().counters.connects, 0);
}

#[test]
fn unit_an_active_whose_lease_runs_out_fences_itself_and_a_renewal_unfences_it() {
    let (pa, pb) = (free_port(), free_port());
    let a = MemberUnderTest::start(Member::A, pa, pb);
    let b = MemberUnderTest::start(Member::B, pb, pa);
    // A lease valid for 2 s: the margin (500 ms) leaves 1.5 s of allocation.
    a.set_role_until(5, true, Instant::now() + Duration::from_secs(2));
    b.set_role(5, false);
    wait_for("A active", Duration::from_secs(1), || a.status().allocating);
    let (v, o) = a.out((host(1), 9100), None);
    assert_eq!(v, Verdict::Tx(UPLINK));
    wait_for("A fenced", Duration::from_secs(5), || {
        let s = a.status();
        s.role == Role::Fenced { epoch: 5 } && !s.allocating
    });
    assert_eq!(
        a.out((host(2), 9100), None).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
    assert_eq!(a.out((host(1), 9100), None), (Verdict::Tx(UPLINK), o));
    assert_eq!(a.reply(o, None), (Verdict::Tx(VPC_PORT), (host(1), 9100)));
    // A renewal of the same epoch unfences it.
    a.set_role(5, true);
    wait_for("A active again", Duration::from_secs(5), || {
        a.status().allocating
    });
    assert_eq!(a.out((host(2), 9100), None).0, Verdict::Tx(UPLINK));
    wait_for("B has both", Duration::from_secs(5), || {
        b.status().sessions == 2
    });
}

#[test]
fn unit_a_change_log_overflow_forces_a_snapshot_and_loses_nothing() {
    let (pa, pb) = (free_port(), free_port());
    let a = MemberUnderTest::start_with(Member::A, pa, pb, 64, Duration::from_secs(20));
    let b = MemberUnderTest::start(Member::B, pb, pa);
    a.set_role(5, true);
    b.set_role(5, false);
    wait_for("B Ready", Duration::from_secs(10), || b.status().ready);
    let requested = b.status().counters.snapshots_requested;
    // 2000 new flows under one lock: far more changes than the log holds between drains.
    {
        let mut p = a.pipe.lock().unwrap();
        for i in 0..2000 {
            let mut f = frame((host(i), 9200), (SERVER, 53), None);
            assert_eq!(
                p.process(&mut f, VPC_PORT, None, a.now()),
                Verdict::Tx(UPLINK)
            );
        }
    }
    wait_for("B holds all 2000 again", Duration::from_secs(20), || {
        b.status().sessions == 2000 && b.status().ready
    });
    wait_for("A's count of overflows", Duration::from_secs(5), || {
        a.status().counters.change_log_overflows >= 1
    });
    assert!(
        b.status().counters.snapshots_requested > requested,
        "{:?}",
        b.status()
    );
    assert_eq!(a.sessions(), b.sessions());
}

#[test]
fn unit_keepalive_refreshes_the_standby_copies_of_sessions_with_traffic_only() {
    let (pa, pb) = (free_port(), free_port());
    let period = Duration::from_millis(300);
    let a = MemberUnderTest::start_with(Member::A, pa, pb, 1 << 16, period);
    let b = MemberUnderTest::start(Member::B, pb, pa);
    a.set_role(5, true);
    b.set_role(5, false);
    wait_for("B Ready", Duration::from_secs(10), || b.status().ready);
    for i in 0..10 {
        assert_eq!(a.out((host(i), 9300), None).0, Verdict::Tx(UPLINK));
    }
    wait_for("B holds them", Duration::from_secs(5), || {
        b.status().sessions == 10
    });
    // Packets that only refresh five of them, on A only, for 1.5 s: no change is recorded.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        for i in 0..5 {
            assert_eq!(a.out((host(i), 9300), None).0, Verdict::Tx(UPLINK));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.status().counters.keepalive_records > 0);
    // On B, the refreshed sessions look recently used, the others as idle as they are on A.
    let p = b.pipe.lock().unwrap();
    let mut cursor = p.nat_replica_cursor();
    let mut recs = Vec::new();
    while !p.export_nat_replicas(&mut cursor, 4096, b.now(), &mut recs) {}
    assert_eq!(recs.len(), 10);
    for r in recs {
        let NatSessionRecord::Napt44(s) = r.session else {
            panic!("NAPT44 only")
        };
        let refreshed = (0..5).any(|i| s.inside == (host(i), 9300));
        if refreshed {
            assert!(s.idle_ns < 900_000_000, "refreshed: {s:?}");
        } else {
            assert!(s.idle_ns > 1_200_000_000, "idle: {s:?}");
        }
    }
}

#[test]
fn unit_a_standby_without_the_nat_rule_is_not_ready_until_it_has_it_and_a_new_snapshot() {
    let (pa, pb) = (free_port(), free_port());
    let a = MemberUnderTest::start(Member::A, pa, pb);
    // B has not received the NAT rule from its host yet.
    let mut without = model();
    without.apply(&[Change::DeleteNat(n("out"))]).unwrap();
    let b = MemberUnderTest::start_on(
        Member::B,
        pb,
        pa,
        1 << 16,
        Duration::from_secs(20),
        &without,
    );
    a.set_role(5, true);
    b.set_role(5, false);
    wait_for("A active", Duration::from_secs(5), || a.status().allocating);
    for i in 0..50 {
        assert_eq!(a.out((host(i), 9400), None).0, Verdict::Tx(UPLINK));
    }
    wait_for("B refuses the records", Duration::from_secs(5), || {
        b.status().counters.import_errors >= 50
    });
    std::thread::sleep(Duration::from_millis(200));
    let s = b.status();
    assert!(s.connected && !s.ready, "refused records: not Ready: {s:?}");
    // The host's batch arrives: the agent rebuilds its pipeline, carrying the pair settings.
    {
        let mut p = b.pipe.lock().unwrap();
        let mut fresh = Pipeline::new(&model(), limits(), 8).unwrap();
        fresh.carry_nat_from(&mut p);
        *p = fresh;
    }
    assert!(!b.pipe.lock().unwrap().nat_allocation_allowed(), "carried");
    wait_for("B asks again and is Ready", Duration::from_secs(10), || {
        b.status().ready
    });
    assert_eq!(b.status().sessions, 50);
    assert_eq!(a.sessions(), b.sessions());
}

fn phase(m: &MemberUnderTest) -> Option<SwitchoverPhase> {
    m.status().switchover.map(|s| s.phase)
}

/// Watches `m` for `limit`: its lease release is never asked for.
fn never_released(m: &MemberUnderTest, limit: Duration) {
    let t = Instant::now();
    while t.elapsed() < limit {
        let s = m.status();
        assert!(!s.release_lease, "released: {s:?}");
        std::thread::sleep(Duration::from_millis(3));
    }
}

/// B's pipeline rebuilt without the NAT rule (as after a batch that lacks it), pair settings
/// carried; the guard is handed back so that B stays stopped until the caller lets go.
fn drop_the_nat_rule(b: &MemberUnderTest) -> std::sync::MutexGuard<'_, Pipeline> {
    let mut without = model();
    without.apply(&[Change::DeleteNat(n("out"))]).unwrap();
    let mut p = b.pipe.lock().unwrap();
    let mut fresh = Pipeline::new(&without, limits(), 9).unwrap();
    fresh.carry_nat_from(&mut p);
    *p = fresh;
    p
}

#[test]
fn unit_planned_switchover_drains_to_the_standby_then_releases_and_the_roles_swap() {
    let (a, b, _, _) = pair();
    // Requests in the wrong epoch, or to the standby, are ignored.
    a.request_switchover(4);
    b.request_switchover(5);
    wait_for("both requests ignored", Duration::from_secs(5), || {
        a.status().counters.switchovers_ignored == 1 && b.status().counters.switchovers_ignored == 1
    });
    assert!(a.status().allocating);
    assert_eq!(a.status().switchover, None);
    // Established flows: UDP, and TCP answered.
    let mut flows = Vec::new();
    for i in 0..200 {
        let (v, o) = a.out((host(i), 9500), None);
        assert_eq!(v, Verdict::Tx(UPLINK));
        flows.push(((host(i), 9500), o, None));
    }
    for i in 0..10 {
        let inside = (host(i), 9501);
        let (v, o) = a.out(inside, Some(TCP_SYN));
        assert_eq!(v, Verdict::Tx(UPLINK));
        assert_eq!(a.reply(o, Some(TCP_SYN | TCP_ACK)).0, Verdict::Tx(VPC_PORT));
        flows.push((inside, o, Some(TCP_ACK)));
    }
    // B stops (its thread blocks on its pipeline) while A creates 3000 more sessions and is
    // asked to hand over: none of those can be acknowledged until B runs again.
    let stopped = b.pipe.lock().unwrap();
    for i in 0..3000 {
        assert_eq!(a.out((host(i), 9502), None).0, Verdict::Tx(UPLINK));
    }
    a.request_switchover(5);
    wait_for("A draining", Duration::from_secs(5), || {
        a.status().switchover
            == Some(Switchover {
                epoch: 5,
                phase: SwitchoverPhase::Draining,
            })
    });
    let s = a.status();
    assert!(
        !s.allocating && s.role == Role::Active { epoch: 5 },
        "{s:?}"
    );
    // No new binding once draining; established sessions keep forwarding, both ways.
    assert_eq!(
        a.out((host(3999), 9503), None).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
    for (inside, outside, tcp) in flows.iter().step_by(7) {
        assert_eq!(a.out(*inside, *tcp), (Verdict::Tx(UPLINK), *outside));
        assert_eq!(a.reply(*outside, *tcp), (Verdict::Tx(VPC_PORT), *inside));
    }
    let before = a.sessions();
    assert_eq!(before.len(), 3210);
    // Nothing is released while B cannot acknowledge.
    never_released(&a, Duration::from_millis(400));
    assert!(a.status().lag_events > 0, "{:?}", a.status());
    drop(stopped);
    // Released only once B holds every session created before the request.
    let deadline = Instant::now() + Duration::from_secs(20);
    let at_release = loop {
        let s = a.status();
        if s.release_lease {
            break s;
        }
        assert!(Instant::now() < deadline, "never released: {s:?}");
        std::thread::sleep(Duration::from_micros(500));
    };
    let on_b = b.sessions();
    for (k, v) in &before {
        assert_eq!(on_b.get(k), Some(v), "not on the standby at release: {k:?}");
    }
    assert_eq!(at_release.lag_events, 0, "{at_release:?}");
    assert_eq!(at_release.role, Role::Fenced { epoch: 5 });
    assert!(!at_release.allocating);
    assert_eq!(
        at_release.switchover,
        Some(Switchover {
            epoch: 5,
            phase: SwitchoverPhase::Released
        })
    );
    assert_eq!(at_release.counters.switchovers_released, 1);
    assert_eq!(
        a.sessions(),
        on_b,
        "nothing was allocated after the request"
    );
    // Fenced: still forwarding what arrives.
    let (inside, outside, tcp) = flows[3];
    assert_eq!(a.out(inside, tcp), (Verdict::Tx(UPLINK), outside));
    // The host revokes A's lease; B acquires the key with a newer epoch.
    b.set_role(6, true);
    a.set_role(6, false);
    wait_for(
        "A no longer asks for the release",
        Duration::from_secs(5),
        || !a.status().release_lease,
    );
    wait_for("B active and allocating", Duration::from_secs(5), || {
        let s = b.status();
        s.role == Role::Active { epoch: 6 } && s.allocating
    });
    let requested = a.status().counters.snapshots_requested;
    // The established flows keep their bindings on B; new flows use B's block.
    for (inside, outside, tcp) in flows.iter().step_by(5) {
        assert_eq!(b.out(*inside, *tcp), (Verdict::Tx(UPLINK), *outside));
    }
    let (v, o_b) = b.out((host(4000), 9504), None);
    assert_eq!(v, Verdict::Tx(UPLINK));
    assert!(!block_a(o_b.1), "member b allocates from its half: {o_b:?}");
    // A stands down and follows B: a snapshot, then Ready with B's sessions.
    wait_for("A standby, Ready behind B", Duration::from_secs(15), || {
        let s = a.status();
        s.role == Role::Standby && s.connected && s.ready
    });
    assert!(a.status().counters.snapshots_requested > requested);
    wait_for("A equals B", Duration::from_secs(10), || {
        b.status().lag_events == 0 && a.sessions() == b.sessions()
    });
    assert_eq!(a.status().sessions, 3211);
    let s = a.status();
    assert!(!s.allocating && !s.release_lease, "{s:?}");
    assert_eq!(
        a.out((host(4001), 9504), None).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
}

#[test]
fn unit_switchover_waits_for_a_ready_peer_and_allocation_continues_meanwhile() {
    let (pa, pb) = (free_port(), free_port());
    let a = MemberUnderTest::start(Member::A, pa, pb);
    // B has not received the NAT rule yet: it refuses A's records and is not Ready.
    let mut without = model();
    without.apply(&[Change::DeleteNat(n("out"))]).unwrap();
    let b = MemberUnderTest::start_on(
        Member::B,
        pb,
        pa,
        1 << 16,
        Duration::from_secs(20),
        &without,
    );
    a.set_role(5, true);
    b.set_role(5, false);
    wait_for("A active", Duration::from_secs(5), || a.status().allocating);
    for i in 0..50 {
        assert_eq!(a.out((host(i), 9600), None).0, Verdict::Tx(UPLINK));
    }
    wait_for("B refuses the records", Duration::from_secs(5), || {
        b.status().counters.import_errors >= 50
    });
    // B acknowledged them, but says it is not Ready: A believes it.
    wait_for("A sees B not Ready", Duration::from_secs(5), || {
        let s = a.status();
        s.connected && !s.ready && s.lag_events == 0
    });
    a.request_switchover(5);
    let deadline = Instant::now() + Duration::from_secs(5);
    while phase(&a) != Some(SwitchoverPhase::WaitingForPeer) {
        assert!(
            Instant::now() < deadline,
            "A not waiting for B: {:?}\n{:?}",
            a.status(),
            b.status()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // Allocation continues while waiting; nothing is released.
    for i in 50..60 {
        assert_eq!(a.out((host(i), 9600), None).0, Verdict::Tx(UPLINK));
    }
    never_released(&a, Duration::from_millis(500));
    let s = a.status();
    assert!(s.allocating && s.role == Role::Active { epoch: 5 }, "{s:?}");
    assert_eq!(phase(&a), Some(SwitchoverPhase::WaitingForPeer));
    // The rule arrives on B: it asks for another snapshot, is Ready, and A hands over.
    {
        let mut p = b.pipe.lock().unwrap();
        let mut fresh = Pipeline::new(&model(), limits(), 8).unwrap();
        fresh.carry_nat_from(&mut p);
        *p = fresh;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let at_release = loop {
        let s = a.status();
        if s.release_lease {
            break s;
        }
        assert!(Instant::now() < deadline, "never released: {s:?}");
        std::thread::sleep(Duration::from_micros(500));
    };
    let on_b = b.sessions();
    assert_eq!(on_b.len(), 60, "B holds every session at release");
    assert_eq!(a.sessions(), on_b);
    assert_eq!(at_release.lag_events, 0);
    assert_eq!(at_release.role, Role::Fenced { epoch: 5 });
    assert_eq!(phase(&a), Some(SwitchoverPhase::Released));
}

#[test]
fn unit_a_switchover_that_times_out_is_abandoned_and_allocation_resumes() {
    let (a, b, _, _) = pair_with(RoleConfig {
        switchover_timeout_ns: 1_000_000_000,
        ..role_config()
    });
    let (_, o) = a.out((host(1), 9700), None);
    wait_for("B has it", Duration::from_secs(5), || {
        b.status().sessions == 1
    });
    // B stops: the drain cannot finish.
    let stopped = b.pipe.lock().unwrap();
    for i in 2..102 {
        assert_eq!(a.out((host(i), 9700), None).0, Verdict::Tx(UPLINK));
    }
    a.request_switchover(5);
    wait_for("A draining", Duration::from_secs(5), || {
        phase(&a) == Some(SwitchoverPhase::Draining) && !a.status().allocating
    });
    assert_eq!(
        a.out((host(200), 9700), None).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
    assert_eq!(a.out((host(1), 9700), None), (Verdict::Tx(UPLINK), o));
    let deadline = Instant::now() + Duration::from_secs(5);
    while phase(&a) == Some(SwitchoverPhase::Draining) {
        assert!(!a.status().release_lease);
        assert!(
            Instant::now() < deadline,
            "never abandoned: {:?}",
            a.status()
        );
        std::thread::sleep(Duration::from_millis(3));
    }
    assert_eq!(
        phase(&a),
        Some(SwitchoverPhase::Aborted(SwitchoverAbort::Timeout))
    );
    wait_for("A allocating again", Duration::from_secs(5), || {
        a.status().allocating
    });
    assert_eq!(a.out((host(200), 9700), None).0, Verdict::Tx(UPLINK));
    drop(stopped);
    wait_for("B catches up", Duration::from_secs(10), || {
        a.status().lag_events == 0 && a.sessions() == b.sessions()
    });
    never_released(&a, Duration::from_millis(300));
    let s = a.status();
    assert_eq!(s.role, Role::Active { epoch: 5 });
    assert_eq!(
        (
            s.counters.switchovers_started,
            s.counters.switchovers_aborted,
            s.counters.switchovers_released
        ),
        (1, 1, 0)
    );
    // A new request is taken again.
    a.request_switchover(5);
    wait_for(
        "released at the second try",
        Duration::from_secs(10),
        || a.status().release_lease,
    );
}

#[test]
fn unit_a_peer_dropping_out_of_ready_while_draining_aborts_the_switchover() {
    let (a, b, _, _) = pair();
    for i in 0..20 {
        assert_eq!(a.out((host(i), 9800), None).0, Verdict::Tx(UPLINK));
    }
    wait_for("B has them", Duration::from_secs(5), || {
        b.status().sessions == 20
    });
    // B loses the NAT rule and stops; A creates sessions B will refuse, and drains.
    let stopped = drop_the_nat_rule(&b);
    for i in 20..40 {
        assert_eq!(a.out((host(i), 9800), None).0, Verdict::Tx(UPLINK));
    }
    a.request_switchover(5);
    wait_for("A draining", Duration::from_secs(5), || {
        phase(&a) == Some(SwitchoverPhase::Draining) && !a.status().allocating
    });
    assert_eq!(
        a.out((host(100), 9800), None).0,
        Verdict::Drop(DropReason::NatNotActive)
    );
    // B runs again: it acknowledges the records it refused, and reports it is not Ready
    // before that acknowledgement. A must not take the acknowledgement for a drain.
    drop(stopped);
    let deadline = Instant::now() + Duration::from_secs(5);
    while phase(&a) == Some(SwitchoverPhase::Draining) {
        assert!(!a.status().release_lease, "{:?}", a.status());
        assert!(
            Instant::now() < deadline,
            "never abandoned: {:?}",
            a.status()
        );
        std::thread::sleep(Duration::from_micros(500));
    }
    assert_eq!(
        phase(&a),
        Some(SwitchoverPhase::Aborted(SwitchoverAbort::PeerNotReady)),
        "{:?}",
        a.status()
    );
    wait_for(
        "B's count of refused records",
        Duration::from_secs(5),
        || b.status().counters.import_errors >= 20,
    );
    wait_for("A allocating again", Duration::from_secs(5), || {
        a.status().allocating
    });
    assert_eq!(a.out((host(100), 9800), None).0, Verdict::Tx(UPLINK));
    never_released(&a, Duration::from_millis(300));
    assert_eq!(a.status().role, Role::Active { epoch: 5 });
}

#[test]
fn unit_a_switchover_is_not_held_up_by_established_sessions_that_keep_changing() {
    let (a, b, _, _) = pair();
    const N: usize = 30_000;
    let mut outs = Vec::with_capacity(N);
    for i in 0..N as u32 {
        let (v, o) = a.out((host(i % 20_000), 9900 + (i / 20_000) as u16), None);
        assert_eq!(v, Verdict::Tx(UPLINK));
        outs.push(o);
    }
    wait_for("B holds them all", Duration::from_secs(30), || {
        b.status().sessions == N && a.status().lag_events == 0
    });
    let before = a.sessions();
    let sent = a.status().counters.events_sent;
    // Replies turn the sessions two-way, one change each, every few tens of microseconds, from
    // before the request to well after it (about a second): the stream keeps moving, and the
    // handover must not wait for it to stand still. (A liveness check: here the standby's
    // acknowledgements are quicker than the gaps, so a rule of "lag 0" would pass it too.)
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let blast = {
        let (pipe, clock, done) = (a.pipe.clone(), a.clock, done.clone());
        std::thread::spawn(move || {
            for o in outs {
                let mut f = frame((SERVER, 53), o, None);
                let now = clock.elapsed().as_nanos() as u64;
                let v = pipe.lock().unwrap().process(&mut f, UPLINK, None, now);
                assert_eq!(v, Verdict::Tx(VPC_PORT));
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(30) {
                    std::hint::spin_loop();
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    a.request_switchover(5);
    let deadline = Instant::now() + Duration::from_secs(30);
    let at_release = loop {
        let s = a.status();
        if s.release_lease {
            break s;
        }
        assert!(Instant::now() < deadline, "never released: {s:?}");
        std::thread::sleep(Duration::from_micros(200));
    };
    let blast_over = done.load(std::sync::atomic::Ordering::SeqCst);
    let on_b = b.sessions();
    for k in before.keys() {
        assert!(on_b.contains_key(k), "not on the standby at release: {k:?}");
    }
    blast.join().unwrap();
    assert!(
        !blast_over,
        "released only once the sessions stopped changing: {at_release:?}"
    );
    assert!(
        a.status().counters.events_sent > sent + 1000,
        "the changes were streamed: {:?}",
        a.status()
    );
}

/// Measurement, not a check of behaviour: `cargo test -p dpu-agent --test ha_pair -- --ignored
/// --nocapture`. Sessions created on the active in bursts of 1000 (one lock each) until the
/// standby holds them all, then a fresh standby's catch-up by snapshot.
#[test]
#[ignore]
fn measure_sync_rate_and_catch_up() {
    const N: u32 = 60_000;
    let (a, b, _, pb) = pair();
    let t0 = Instant::now();
    let mut i = 0;
    while i < N {
        let mut p = a.pipe.lock().unwrap();
        for _ in 0..1000 {
            let mut f = frame(
                (host(i % 20_000), 10_000 + (i / 20_000) as u16),
                (SERVER, 53),
                None,
            );
            assert_eq!(
                p.process(&mut f, VPC_PORT, None, a.now()),
                Verdict::Tx(UPLINK)
            );
            i += 1;
        }
    }
    let created = t0.elapsed();
    wait_for("B holds all", Duration::from_secs(60), || {
        b.status().sessions == N as usize
    });
    let synced = t0.elapsed();
    println!(
        "stream: {N} sessions created in {created:?}, all on the standby after {synced:?} ({:.0} sessions/s)",
        f64::from(N) / synced.as_secs_f64()
    );
    drop(b);
    wait_for("A notices", Duration::from_secs(5), || {
        !a.status().connected
    });
    let t1 = Instant::now();
    let b2 = MemberUnderTest::start(Member::B, pb, 0);
    b2.set_role(5, false);
    wait_for("B2 Ready", Duration::from_secs(60), || b2.status().ready);
    let ready = t1.elapsed();
    assert_eq!(b2.status().sessions, N as usize);
    println!("catch-up: a fresh standby Ready with {N} sessions after {ready:?}");
}
