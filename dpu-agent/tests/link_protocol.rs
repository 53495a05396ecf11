//! The link protocol against the real `dpu-agent` binary (reference NIC backend, `net_null`
//! ports; needs root for EAL): the hello names the protocol, a host of another protocol is
//! refused and disconnected, and nothing the agent cannot take is skipped in silence — a
//! forged message of an unknown kind, a batch it cannot decode, a message a host must not send
//! and a batch before the host's hello are each answered with `Refused`, and the link keeps
//! working afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{can_run, AgentProc, HostLink};
use flow_offload::model::{Change, MacAddr, Node, PortId};
use flow_offload::wire::frame::FrameCodec;
use flow_offload::wire::{Ack, Apply, Features, HostHello, Message, Refusal, PROTOCOL_VERSION};

fn node() -> Change {
    Change::SetNode(Node {
        vtep: Ipv4Addr::new(192, 0, 2, 1),
        router_mac: MacAddr([2, 0, 0, 0, 0, 1]),
        uplinks: [PortId(0)].into_iter().collect(),
    })
}

/// A frame whose payload is the postcard encoding of `value` (forged messages are tuples that
/// encode like a message's head).
fn frame<T: serde::Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    FrameCodec::default().encode(value, &mut out).unwrap();
    out
}

fn refusal(m: &Message) -> bool {
    matches!(m, Message::Refused { .. })
}

#[test]
fn nothing_the_agent_cannot_take_is_skipped_in_silence() {
    if !can_run() {
        return;
    }
    let mut agent = AgentProc::start_reference("linkproto");

    // 1. The hello names the protocol; a host of another protocol is refused and dropped.
    {
        let (mut stream, hello) = HostLink::connect_silent(agent.link);
        assert_eq!(hello.protocol, PROTOCOL_VERSION);
        let old = Message::HostHello(HostHello {
            protocol: 1,
            features: Features::empty(),
        });
        stream.write_all(&frame(&old)).unwrap();
        let mut reader = flow_offload::wire::frame::FrameReader::new(FrameCodec::default());
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut refused = None;
        let mut closed = false;
        while Instant::now() < deadline && !closed {
            match stream.read(&mut buf) {
                Ok(0) => closed = true,
                Ok(n) => reader.push(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => closed = true,
            }
            while let Some(m) = reader.next::<Message>().unwrap() {
                if refusal(&m) {
                    refused = Some(m);
                }
            }
        }
        assert_eq!(
            refused,
            Some(Message::Refused {
                epoch: None,
                reason: Refusal::Incompatible {
                    ours: PROTOCOL_VERSION,
                    theirs: 1
                }
            }),
            "{}",
            agent.log()
        );
        assert!(closed, "an incompatible host must be disconnected");
    }

    // 2. A batch before the host's hello is refused, and so not applied.
    {
        let (mut stream, _) = HostLink::connect_silent(agent.link);
        let early = Message::Apply(Apply {
            epoch: 5,
            full: true,
            changes: vec![node()],
        });
        stream.write_all(&frame(&early)).unwrap();
        let mut reader = flow_offload::wire::frame::FrameReader::new(FrameCodec::default());
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            assert!(Instant::now() < deadline, "no refusal:\n{}", agent.log());
            if let Ok(n) = stream.read(&mut buf) {
                assert!(n > 0, "agent closed the link");
                reader.push(&buf[..n]);
            }
            if let Some(m) = std::iter::from_fn(|| reader.next::<Message>().unwrap()).find(refusal)
            {
                break m;
            }
        };
        assert!(
            matches!(
                got,
                Message::Refused {
                    epoch: Some(5),
                    reason: Refusal::Unexpected(_)
                }
            ),
            "{got:?}"
        );
    }

    // 3. After a proper introduction: forged and unexpected messages are refused one by one.
    let mut host = HostLink::connect(agent.link);
    assert_eq!(
        host.hello.last_epoch, None,
        "the early batch must not have been applied"
    );
    let long = Duration::from_secs(10);

    // A kind this agent does not know (variant index 200).
    host.send_raw(&frame(&(200u32, 7u8)));
    let got = host.recv(long, refusal);
    assert!(
        matches!(
            &got,
            Message::Refused {
                epoch: None,
                reason: Refusal::Undecodable {
                    kind: Some(200),
                    ..
                }
            }
        ),
        "{got:?}"
    );

    // A batch whose head is readable (kind 1 = Apply, epoch 42) but whose first change is of an
    // unknown kind: refused with its epoch, so the host knows which batch failed.
    host.send_raw(&frame(&(1u32, 42u64, true, 1u32, 250u32)));
    let got = host.recv(long, refusal);
    assert!(
        matches!(
            &got,
            Message::Refused {
                epoch: Some(42),
                reason: Refusal::Undecodable { kind: Some(1), .. }
            }
        ),
        "{got:?}"
    );

    // A message only an agent sends.
    host.send(&Message::Ack(Ack {
        epoch: 1,
        status: Vec::new(),
    }));
    let got = host.recv(long, refusal);
    assert!(
        matches!(
            &got,
            Message::Refused {
                epoch: None,
                reason: Refusal::Unexpected(_)
            }
        ),
        "{got:?}"
    );

    // The link still works: a real batch is applied.
    match host.apply(43, true, vec![node()]) {
        Message::Ack(a) => assert_eq!(a.epoch, 43),
        other => panic!("{other:?}\n{}", agent.log()),
    }
    drop(host);
    let host = HostLink::connect(agent.link);
    assert_eq!(host.hello.last_epoch, Some(43));
    drop(host);

    let log = agent.log();
    assert!(log.contains("message from the host refused"), "{log}");
    assert!(agent.stop().success(), "{}", agent.log());
}
