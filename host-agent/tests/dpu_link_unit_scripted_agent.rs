//! Unit tests of the host side of the DPU link against a *scripted* agent (an in-process TCP
//! peer that says exactly what each test needs, including what a real agent never says): an
//! agent of another link protocol is refused and dropped, a batch the agent never answers is
//! resent in full and then ends the connection, and a message the host cannot decode is
//! refused back to the agent and reported, never skipped. The real agent is covered by
//! `dpu_link.rs` and the dpu-agent crate's `link_protocol.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use flow_offload::model::{
    Change, MacAddr, Model, Nexthop, Node, PortId, Prefix, Route, RouteKey, UNDERLAY_TABLE,
};
use flow_offload::wire::frame::{FrameCodec, FrameReader};
use flow_offload::wire::{Ack, Features, Hello, Message, Refusal, PROTOCOL_VERSION};
use host_agent::dpu_link::{run, DpuEvent, LinkConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

const LONG: Duration = Duration::from_secs(10);

fn model(prefixes: &[&str]) -> Arc<Model> {
    let node = Change::SetNode(Node {
        vtep: Ipv4Addr::new(192, 0, 2, 1),
        router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        uplinks: [PortId(0)].into_iter().collect(),
    });
    let changes: Vec<Change> = std::iter::once(node)
        .chain(prefixes.iter().map(|p| {
            Change::UpsertRoute(Route {
                key: RouteKey {
                    table: UNDERLAY_TABLE,
                    prefix: p.parse::<Prefix>().unwrap(),
                },
                nexthops: vec![Nexthop::Underlay {
                    gateway: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
                    port: PortId(0),
                    mac: MacAddr([2, 0, 0, 0, 0, 2]),
                }],
            })
        }))
        .collect();
    let mut m = Model::new();
    m.apply(&changes).unwrap();
    Arc::new(m)
}

fn hello(protocol: u16) -> Message {
    Message::Hello(Hello {
        dpu_id: "scripted".to_owned(),
        agent_version: "test".to_owned(),
        boot_id: 7,
        last_epoch: None,
        ports: Vec::new(),
        protocol,
        features: Features::empty(),
    })
}

/// The scripted agent's end of one connection.
struct Peer {
    stream: TcpStream,
    reader: FrameReader,
}

impl Peer {
    async fn accept(listener: &TcpListener) -> Peer {
        let (stream, _) = timeout(LONG, listener.accept()).await.unwrap().unwrap();
        Peer {
            stream,
            reader: FrameReader::new(FrameCodec::default()),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, m: &Message) {
        let mut out = Vec::new();
        FrameCodec::default().encode(m, &mut out).unwrap();
        self.send_raw(&out).await;
    }

    /// The next message other than a heartbeat; `None` when the host closed the connection.
    async fn next(&mut self) -> Option<Message> {
        let mut buf = vec![0u8; 65536];
        loop {
            while let Some(m) = self.reader.next::<Message>().unwrap() {
                if !matches!(m, Message::Heartbeat { .. }) {
                    return Some(m);
                }
            }
            let n = timeout(LONG, self.stream.read(&mut buf))
                .await
                .expect("host said nothing")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.reader.push(&buf[..n]);
        }
    }

    /// Keeps the host's liveness timeout at bay while ignoring what it sends, for `d`; returns
    /// the non-heartbeat messages seen.
    async fn ignore_for(&mut self, d: Duration) -> Vec<Message> {
        let mut seen = Vec::new();
        let end = tokio::time::Instant::now() + d;
        let mut buf = vec![0u8; 65536];
        let mut seq = 0;
        while tokio::time::Instant::now() < end {
            seq += 1;
            self.send(&Message::Heartbeat { seq }).await;
            if let Ok(Ok(n)) = timeout(Duration::from_millis(50), self.stream.read(&mut buf)).await
            {
                if n == 0 {
                    break;
                }
                self.reader.push(&buf[..n]);
            }
            while let Some(m) = self.reader.next::<Message>().unwrap() {
                if !matches!(m, Message::Heartbeat { .. }) {
                    seen.push(m);
                }
            }
        }
        seen
    }
}

struct Host {
    addr: SocketAddr,
    listener: TcpListener,
    desired: watch::Sender<Arc<Model>>,
    events: mpsc::Receiver<DpuEvent>,
    _stop: watch::Sender<bool>,
}

async fn host(first: Arc<Model>, batch_timeout: Duration) -> Host {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (desired, desired_rx) = watch::channel(first);
    let (ev_tx, events) = mpsc::channel(64);
    let (stop, stop_rx) = watch::channel(false);
    let cfg = LinkConfig {
        heartbeat: Duration::from_millis(100),
        timeout: Duration::from_secs(3),
        reconnect: Duration::from_millis(100),
        batch_timeout,
    };
    tokio::spawn(run(addr, cfg, desired_rx, ev_tx, stop_rx, None));
    Host {
        addr,
        listener,
        desired,
        events,
        _stop: stop,
    }
}

impl Host {
    /// The next event other than `Connected`/`Counters`.
    async fn event(&mut self) -> DpuEvent {
        loop {
            match timeout(LONG, self.events.recv()).await.unwrap().unwrap() {
                DpuEvent::Connected { .. } | DpuEvent::Counters { .. } => {}
                e => return e,
            }
        }
    }
}

#[tokio::test]
async fn unit_scripted_agent_of_another_protocol_is_refused_and_dropped() {
    let mut h = host(model(&["198.51.100.0/24"]), LONG).await;
    let mut peer = Peer::accept(&h.listener).await;
    peer.send(&hello(1)).await;
    assert_eq!(
        peer.next().await,
        Some(Message::Refused {
            epoch: None,
            reason: Refusal::Incompatible {
                ours: PROTOCOL_VERSION,
                theirs: 1
            }
        })
    );
    assert_eq!(peer.next().await, None, "the host must close the link");
    match h.event().await {
        DpuEvent::Disconnected { dpu, reason } => {
            assert_eq!(dpu.as_deref(), Some("scripted"));
            assert!(reason.contains("link protocol 1"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
    let _ = h.addr;
}

#[tokio::test]
async fn unit_scripted_agent_unanswered_batches_are_resent_in_full_then_the_link_restarts() {
    let mut h = host(model(&["198.51.100.0/24"]), Duration::from_millis(500)).await;
    let mut peer = Peer::accept(&h.listener).await;
    peer.send(&hello(PROTOCOL_VERSION)).await;
    assert!(
        matches!(peer.next().await, Some(Message::HostHello(hh)) if hh.protocol == PROTOCOL_VERSION)
    );
    let Some(Message::Apply(first)) = peer.next().await else {
        panic!("no first batch")
    };
    assert!(first.full);
    peer.send(&Message::Ack(Ack {
        epoch: first.epoch,
        status: Vec::new(),
    }))
    .await;
    assert!(matches!(h.event().await, DpuEvent::Acked { epoch, .. } if epoch == first.epoch));

    // An incremental batch the agent ignores: resent in full after the timeout.
    h.desired
        .send(model(&["198.51.100.0/24", "203.0.113.0/24"]))
        .unwrap();
    let Some(Message::Apply(inc)) = peer.next().await else {
        panic!("no incremental batch")
    };
    assert!(!inc.full);
    let seen = peer.ignore_for(Duration::from_millis(1500)).await;
    let full = seen
        .iter()
        .find_map(|m| match m {
            Message::Apply(a) if a.full => Some(a.clone()),
            _ => None,
        })
        .expect("the unanswered batch was not resent in full");
    assert!(full.epoch > inc.epoch);
    assert_eq!(full.changes.len(), 3, "the node and both routes");
    assert_eq!(
        h.event().await,
        DpuEvent::Unanswered {
            dpu: "scripted".to_owned(),
            epoch: inc.epoch,
            full: false
        }
    );
    // The full batch unanswered too: reported, and the connection ends (a reconnect starts
    // over with a hello).
    let _ = peer.ignore_for(Duration::from_millis(1200)).await;
    assert_eq!(
        h.event().await,
        DpuEvent::Unanswered {
            dpu: "scripted".to_owned(),
            epoch: full.epoch,
            full: true
        }
    );
    match h.event().await {
        DpuEvent::Disconnected { reason, .. } => {
            assert!(reason.contains("not answered"), "{reason}")
        }
        e => panic!("{e:?}"),
    }
    let mut again = Peer::accept(&h.listener).await;
    again.send(&hello(PROTOCOL_VERSION)).await;
    assert!(matches!(again.next().await, Some(Message::HostHello(_))));
    let Some(Message::Apply(resync)) = again.next().await else {
        panic!("no batch after reconnecting")
    };
    assert!(resync.full && resync.epoch > full.epoch);
}

#[tokio::test]
async fn unit_scripted_agent_message_the_host_cannot_decode_is_refused_back_and_reported() {
    let mut h = host(model(&["198.51.100.0/24"]), LONG).await;
    let mut peer = Peer::accept(&h.listener).await;
    peer.send(&hello(PROTOCOL_VERSION)).await;
    assert!(matches!(peer.next().await, Some(Message::HostHello(_))));
    assert!(matches!(peer.next().await, Some(Message::Apply(_))));
    // A kind the host does not know (variant index 200).
    let mut forged = Vec::new();
    FrameCodec::default()
        .encode(&(200u32, 1u8), &mut forged)
        .unwrap();
    peer.send_raw(&forged).await;
    assert!(matches!(
        peer.next().await,
        Some(Message::Refused {
            epoch: None,
            reason: Refusal::Undecodable {
                kind: Some(200),
                ..
            }
        })
    ));
    assert!(matches!(
        h.event().await,
        DpuEvent::RefusedFromDpu {
            reason: Refusal::Undecodable {
                kind: Some(200),
                ..
            },
            ..
        }
    ));
    // A message only a host sends.
    peer.send(&Message::HostHello(flow_offload::wire::HostHello {
        protocol: PROTOCOL_VERSION,
        features: Features::empty(),
    }))
    .await;
    assert!(matches!(
        peer.next().await,
        Some(Message::Refused {
            epoch: None,
            reason: Refusal::Unexpected(_)
        })
    ));
}
