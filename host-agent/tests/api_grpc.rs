//! The gRPC API served in-process on 127.0.0.1:0 over a real etcd, driven by the generated
//! clients and by the `dpuctl` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::Etcd;
use etcd_client::GetOptions;
use flow_offload::caps::{CapsSource, Profile};
use flow_offload::compile::SwReason;
use flow_offload::model::{Name, ObjectKey, PortId, RouteKey, TableId};
use flow_offload::status::OffloadStatus;
use host_agent::api::{bad_request, pb, serve_on};
use host_agent::store::{DpuRecord, PortCaps, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

use pb::dpu_service_client::DpuServiceClient;
use pb::meter_service_client::MeterServiceClient;
use pb::nat_service_client::NatServiceClient;
use pb::route_service_client::RouteServiceClient;
use pb::status_service_client::StatusServiceClient;
use pb::vpc_service_client::VpcServiceClient;

/// etcd + the API server; the server stops (graceful shutdown) and etcd is killed on drop.
struct Harness {
    etcd: Etcd,
    store: Store,
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Harness {
    async fn start() -> Harness {
        let etcd = Etcd::start().await;
        let store = etcd.store().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = oneshot::channel::<()>();
        let s = store.clone();
        let server = tokio::spawn(async move {
            serve_on(listener, s, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Harness {
            etcd,
            store,
            addr,
            stop: Some(stop),
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .unwrap()
    }

    async fn key_count(&self) -> i64 {
        let mut kv = self.store.client().kv_client();
        kv.get(
            "/dpucp/v1/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count()
    }

    /// Runs dpuctl against this server; returns (exit code, stdout, stderr).
    async fn dpuctl(&self, args: &[&str]) -> (i32, String, String) {
        dpuctl(&self.url(), args).await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.server.abort();
    }
}

async fn dpuctl(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_dpuctl"))
            .arg("--server")
            .arg(url)
            .args(args)
            .env_remove("DPUCTL_SERVER")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("dpuctl did not finish within 60 s")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn vpc(name: &str, vni: u32, table: u32, ports: &[u32]) -> pb::Vpc {
    pb::Vpc {
        name: name.into(),
        vni,
        table,
        ports: ports.to_vec(),
        revision: 0,
    }
}

fn blackhole(table: u32, prefix: &str) -> pb::Route {
    pb::Route {
        key: Some(pb::RouteKey {
            table,
            prefix: prefix.into(),
        }),
        nexthops: vec![pb::Nexthop {
            kind: Some(pb::nexthop::Kind::Blackhole(pb::BlackholeNexthop {})),
        }],
        revision: 0,
        source: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_vpc_create_get_list_delete() {
    let h = Harness::start().await;
    let mut c = VpcServiceClient::new(h.channel().await);
    let created = c
        .create_vpc(pb::CreateVpcRequest {
            vpc: Some(vpc("blue", 100, 10, &[1, 2])),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.revision > 0);
    let got = c
        .get_vpc(pb::GetVpcRequest {
            name: "blue".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);
    let list = c
        .list_vpcs(pb::ListVpcsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.vpcs, vec![created.clone()]);
    // The API wrote what the store reads.
    let (model, _) = h.store.load().await.unwrap();
    assert_eq!(model.vpcs().len(), 1);

    c.delete_vpc(pb::DeleteVpcRequest {
        name: "blue".into(),
        revision: created.revision,
    })
    .await
    .unwrap();
    let err = c
        .get_vpc(pb::GetVpcRequest {
            name: "blue".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(h.key_count().await, 1, "only the generation key remains");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_invalid_argument_names_the_field_and_stores_nothing() {
    let h = Harness::start().await;
    let ch = h.channel().await;
    let mut vpcs = VpcServiceClient::new(ch.clone());
    let mut routes = RouteServiceClient::new(ch.clone());
    vpcs.create_vpc(pb::CreateVpcRequest {
        vpc: Some(vpc("blue", 100, 10, &[1])),
    })
    .await
    .unwrap();
    let before = h.key_count().await;

    // Parsed by the API: a VNI of zero.
    let e = vpcs
        .create_vpc(pb::CreateVpcRequest {
            vpc: Some(vpc("red", 0, 11, &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("field `vni`"), "{}", e.message());
    let details = bad_request(&e).expect("BadRequest details");
    assert_eq!(details.field_violations[0].field, "vni");

    // Validated by the model: a VNI another VPC has.
    let e = vpcs
        .create_vpc(pb::CreateVpcRequest {
            vpc: Some(vpc("red", 100, 11, &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(bad_request(&e).unwrap().field_violations[0].field, "vni");
    assert_eq!(bad_request(&e).unwrap().object, "vpc red");

    // A malformed MAC deep in a next hop.
    let mut r = blackhole(10, "10.0.0.0/8");
    r.nexthops = vec![pb::Nexthop {
        kind: Some(pb::nexthop::Kind::Underlay(pb::UnderlayNexthop {
            gateway: "10.0.0.1".into(),
            port: 1,
            mac: "02:00:00:00:00".into(),
        })),
    }];
    let e = routes
        .create_route(pb::CreateRouteRequest { route: Some(r) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        bad_request(&e).unwrap().field_violations[0].field,
        "nexthops[0].underlay.mac"
    );

    // Host bits set in the prefix.
    let e = routes
        .create_route(pb::CreateRouteRequest {
            route: Some(blackhole(10, "10.0.0.1/8")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("did you mean 10.0.0.0/8"),
        "{}",
        e.message()
    );

    // A table no VPC owns.
    let e = routes
        .create_route(pb::CreateRouteRequest {
            route: Some(blackhole(77, "10.0.0.0/8")),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(bad_request(&e).unwrap().field_violations[0].field, "table");

    assert_eq!(h.key_count().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_conflicts_and_preconditions_map_to_status_codes() {
    let h = Harness::start().await;
    let ch = h.channel().await;
    let mut vpcs = VpcServiceClient::new(ch.clone());
    let mut routes = RouteServiceClient::new(ch.clone());
    let v = vpcs
        .create_vpc(pb::CreateVpcRequest {
            vpc: Some(vpc("blue", 100, 10, &[])),
        })
        .await
        .unwrap()
        .into_inner();
    let e = vpcs
        .create_vpc(pb::CreateVpcRequest {
            vpc: Some(vpc("blue", 100, 10, &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    routes
        .create_route(pb::CreateRouteRequest {
            route: Some(blackhole(10, "10.0.0.0/8")),
        })
        .await
        .unwrap();
    // Still used by the route.
    let e = vpcs
        .delete_vpc(pb::DeleteVpcRequest {
            name: "blue".into(),
            revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    // A delete from a stale read.
    let e = routes
        .delete_route(pb::DeleteRouteRequest {
            key: blackhole(10, "10.0.0.0/8").key,
            revision: v.revision, // older than the route's
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{}", e.message());
    // Deleting what does not exist.
    let e = routes
        .delete_route(pb::DeleteRouteRequest {
            key: blackhole(10, "10.9.0.0/16").key,
            revision: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_nat_meter_roundtrip_and_routes_by_vpc() {
    let h = Harness::start().await;
    let ch = h.channel().await;
    let mut vpcs = VpcServiceClient::new(ch.clone());
    let mut routes = RouteServiceClient::new(ch.clone());
    let mut nat = NatServiceClient::new(ch.clone());
    let mut meters = MeterServiceClient::new(ch.clone());
    vpcs.create_vpc(pb::CreateVpcRequest {
        vpc: Some(vpc("blue", 100, 10, &[1])),
    })
    .await
    .unwrap();
    vpcs.create_vpc(pb::CreateVpcRequest {
        vpc: Some(vpc("red", 200, 20, &[2])),
    })
    .await
    .unwrap();
    for (t, p) in [
        (10, "10.1.0.0/16"),
        (10, "10.2.0.0/16"),
        (20, "10.3.0.0/16"),
    ] {
        routes
            .create_route(pb::CreateRouteRequest {
                route: Some(blackhole(t, p)),
            })
            .await
            .unwrap();
    }
    let blue = routes
        .list_routes(pb::ListRoutesRequest {
            table: 0,
            vpc: "blue".into(),
            learned: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(blue.routes.len(), 2);
    assert!(blue
        .routes
        .iter()
        .all(|r| r.key.as_ref().unwrap().table == 10));

    let rule = pb::NatRule {
        name: "snat".into(),
        vpc: "blue".into(),
        kind: Some(pb::nat_rule::Kind::Napt44(pb::Napt44 {
            pool: Some(pb::Ipv4Range {
                first: "198.51.100.1".into(),
                last: "198.51.100.4".into(),
            }),
            ports: Some(pb::PortRange {
                first: 1024,
                last: 65535,
            }),
        })),
        revision: 0,
    };
    let created = nat
        .create_nat_rule(pb::CreateNatRuleRequest {
            rule: Some(rule.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        nat.get_nat_rule(pb::GetNatRuleRequest {
            name: "snat".into()
        })
        .await
        .unwrap()
        .into_inner(),
        created
    );
    let meter = pb::Meter {
        name: "m1".into(),
        profile: Some(pb::meter::Profile::Trtcm(pb::TrTcm {
            cir: 1_000_000,
            cbs: 10_000,
            pir: 2_000_000,
            pbs: 20_000,
        })),
        target: Some(pb::meter::Target::Route(pb::RouteKey {
            table: 20,
            prefix: "10.3.0.0/16".into(),
        })),
        revision: 0,
    };
    meters
        .create_meter(pb::CreateMeterRequest { meter: Some(meter) })
        .await
        .unwrap();
    let list = meters
        .list_meters(pb::ListMetersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.meters.len(), 1);
    // A meter with pir < cir names its field.
    let mut bad = list.meters[0].clone();
    bad.name = "m2".into();
    bad.target = Some(pb::meter::Target::Vpc("red".into()));
    if let Some(pb::meter::Profile::Trtcm(p)) = &mut bad.profile {
        p.pir = 10;
    }
    let e = meters
        .create_meter(pb::CreateMeterRequest { meter: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        bad_request(&e).unwrap().field_violations[0].field,
        "profile.pir"
    );

    nat.delete_nat_rule(pb::DeleteNatRuleRequest {
        name: "snat".into(),
        revision: created.revision,
    })
    .await
    .unwrap();
    assert!(nat
        .list_nat_rules(pb::ListNatRulesRequest {})
        .await
        .unwrap()
        .into_inner()
        .rules
        .is_empty());
}

async fn next_event(s: &mut tonic::Streaming<pb::StatusEvent>) -> pb::StatusEvent {
    tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("no status event within 30 s")
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_status_list_and_watch_stream() {
    let h = Harness::start().await;
    let d = Name::new("dpu0").unwrap();
    let route = ObjectKey::Route(RouteKey {
        table: TableId(10),
        prefix: "10.0.0.0/8".parse().unwrap(),
    });
    h.store
        .put_status(
            &d,
            &[(
                ObjectKey::Vpc(Name::new("blue").unwrap()),
                OffloadStatus::Offloaded,
            )],
            None,
        )
        .await
        .unwrap();
    let mut c = StatusServiceClient::new(h.channel().await);
    let list = c
        .list_status(pb::ListStatusRequest { dpu: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.statuses.len(), 1);
    assert_eq!(list.statuses[0].placement, pb::Placement::Offloaded as i32);

    let mut stream = c
        .watch(pb::WatchStatusRequest { dpu: "dpu0".into() })
        .await
        .unwrap()
        .into_inner();
    let first = next_event(&mut stream).await;
    assert_eq!(first.status.unwrap().object_text, "vpc blue");
    h.store
        .put_status(
            &d,
            &[(
                route.clone(),
                OffloadStatus::Software {
                    reason: SwReason::Ecmp,
                },
            )],
            None,
        )
        .await
        .unwrap();
    let ev = next_event(&mut stream).await;
    let s = ev.status.unwrap();
    assert_eq!(s.placement, pb::Placement::Software as i32);
    assert_eq!(s.reason_code, "ecmp");
    assert_eq!(s.reason, "ECMP runs in software");
    assert!(!ev.removed);
    h.store.clear_status(&d, &[route]).await.unwrap();
    let ev = next_event(&mut stream).await;
    assert!(ev.removed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_dpus_show_liveness_and_capabilities() {
    let h = Harness::start().await;
    let rec = DpuRecord {
        id: Name::new("bf3-0").unwrap(),
        agent_version: "0.1.0".into(),
        ports: vec![
            PortCaps {
                port: PortId(0),
                caps: CapsSource::Profile(Profile::Full),
            },
            PortCaps {
                port: PortId(1),
                caps: CapsSource::Profile(Profile::TapLike),
            },
        ],
    };
    let lease = h.store.register_dpu(&rec, 10).await.unwrap();
    let mut c = DpuServiceClient::new(h.channel().await);
    let dpus = c
        .list_dpus(pb::ListDpusRequest {})
        .await
        .unwrap()
        .into_inner()
        .dpus;
    assert_eq!(dpus.len(), 1);
    assert!(dpus[0].alive);
    assert_eq!(dpus[0].agent_version, "0.1.0");
    let profiles: Vec<_> = dpus[0].ports.iter().map(|p| p.profile.as_str()).collect();
    assert_eq!(profiles, ["full", "tap_like"]);
    lease.revoke(&h.store).await.unwrap();
    let (code, out, _) = h.dpuctl(&["dpus"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("bf3-0") && out.contains("DEAD"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_etcd_down_is_unavailable() {
    let mut h = Harness::start().await;
    let mut c = VpcServiceClient::new(h.channel().await);
    h.etcd.kill();
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        c.create_vpc(pb::CreateVpcRequest {
            vpc: Some(vpc("blue", 100, 10, &[])),
        }),
    )
    .await
    .expect("no answer within 20 s")
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("etcd unavailable"), "{}", e.message());
    let (code, _, err) = h.dpuctl(&["vpc", "list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("etcd unavailable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let h = Harness::start().await;
    let ch = h.channel().await;
    let mut health = HealthClient::new(ch.clone());
    for service in ["", "dpucp.v1.VpcService", "dpucp.v1.StatusService"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }

    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "dpucp.v1.VpcService",
        "dpucp.v1.RouteService",
        "dpucp.v1.NatService",
        "dpucp.v1.MeterService",
        "dpucp.v1.StatusService",
        "dpucp.v1.DpuService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpuctl_vpc_route_nat_meter_lifecycle() {
    let h = Harness::start().await;
    let (code, out, err) = h
        .dpuctl(&[
            "vpc", "create", "blue", "--vni", "100", "--table", "10", "--port", "1",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("blue") && out.contains("100"), "{out}");

    let (code, out, err) = h
        .dpuctl(&[
            "route",
            "add",
            "10.1.0.0/16",
            "--vpc",
            "blue",
            "--nh",
            "blackhole",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("10.1.0.0/16"), "{out}");
    let (code, out, _) = h.dpuctl(&["--json", "routes", "--vpc", "blue"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["key"]["prefix"], "10.1.0.0/16");
    assert_eq!(v[0]["key"]["table"], 10);

    let (code, _, err) = h
        .dpuctl(&[
            "nat",
            "create",
            "snat",
            "--vpc",
            "blue",
            "--kind",
            "napt44",
            "--pool",
            "198.51.100.1-198.51.100.2",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = h
        .dpuctl(&[
            "meter", "create", "m1", "--vpc", "blue", "--cir", "1000000", "--cbs", "10000",
            "--pir", "2000000", "--pbs", "20000",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = h.dpuctl(&["--json", "meter", "list"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "m1");
    let (code, out, _) = h.dpuctl(&["nat", "list"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("napt44") && out.contains("198.51.100.1-198.51.100.2"),
        "{out}"
    );

    // The VPC is still used: refused, exit 1, nothing removed.
    let (code, _, err) = h.dpuctl(&["vpc", "delete", "blue"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("still used"), "{err}");

    for args in [
        &["meter", "delete", "m1"][..],
        &["nat", "delete", "snat"],
        &["route", "delete", "10.1.0.0/16", "--vpc", "blue"],
        &["vpc", "delete", "blue"],
    ] {
        let (code, _, err) = h.dpuctl(args).await;
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    let (code, out, _) = h.dpuctl(&["--json", "vpc", "list"]).await;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpuctl_invalid_argument_shows_field_and_fails() {
    let h = Harness::start().await;
    let before = h.key_count().await;
    let (code, _, err) = h
        .dpuctl(&[
            "vpc", "create", "blue", "--vni", "16777216", "--table", "10",
        ])
        .await;
    assert_eq!(code, 1);
    assert!(err.contains("InvalidArgument"), "{err}");
    assert!(err.contains("offending field: vni"), "{err}");
    let (code, _, err) = h
        .dpuctl(&[
            "--json", "vpc", "create", "Bad", "--vni", "1", "--table", "10",
        ])
        .await;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(err.trim()).unwrap();
    assert_eq!(v["field"], "name");
    assert_eq!(v["code"], "InvalidArgument");
    assert_eq!(h.key_count().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpuctl_status_shows_where_and_why() {
    let h = Harness::start().await;
    let d = Name::new("dpu0").unwrap();
    h.store
        .put_status(
            &d,
            &[
                (
                    ObjectKey::Vpc(Name::new("blue").unwrap()),
                    OffloadStatus::Offloaded,
                ),
                (
                    ObjectKey::Nat(Name::new("snat").unwrap()),
                    OffloadStatus::Software {
                        reason: SwReason::NeedsState,
                    },
                ),
            ],
            None,
        )
        .await
        .unwrap();
    let (code, out, err) = h.dpuctl(&["status"]).await;
    assert_eq!(code, 0, "{err}");
    let nat_line = out.lines().find(|l| l.contains("nat snat")).expect(&out);
    assert!(
        nat_line.contains("software") && nat_line.contains("needs_state"),
        "{out}"
    );
    let vpc_line = out.lines().find(|l| l.contains("vpc blue")).expect(&out);
    assert!(vpc_line.contains("offloaded"), "{out}");
    let (code, out, _) = h.dpuctl(&["--json", "status", "--dpu", "dpu0"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["placement"] == "software" && e["reason_code"] == "needs_state"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpuctl_unreachable_server_is_a_clear_error() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = dpuctl(&url, &["vpc", "list"]).await;
    assert_eq!(code, 3);
    assert!(out.is_empty());
    assert!(
        err.contains(&format!("cannot reach host agent at {url}"))
            && err.contains("is host-agent running?"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpuctl_node_set_get_conflict_and_bad_input() {
    let h = Harness::start().await;
    // Nothing set yet: NotFound.
    let (code, _, err) = h.dpuctl(&["node", "get"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("NotFound"), "{err}");
    let (code, out, err) = h
        .dpuctl(&[
            "--json",
            "node",
            "set",
            "--vtep",
            "192.0.2.1",
            "--router-mac",
            "02:00:00:00:01:01",
            "--uplink",
            "0",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let set: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let rev = set["revision"].as_i64().unwrap();
    assert!(rev > 0);
    let (code, out, _) = h.dpuctl(&["--json", "node", "get"]).await;
    assert_eq!(code, 0);
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["vtep"], "192.0.2.1");
    assert_eq!(got["router_mac"], "02:00:00:00:01:01");
    assert_eq!(got["uplinks"], serde_json::json!([0]));
    // The stored JSON is what etcdctl shows.
    let mut kv = h.store.client().kv_client();
    let stored = kv.get("/dpucp/v1/node", None).await.unwrap();
    assert_eq!(stored.kvs().len(), 1);
    // Replace at the revision read: accepted; again at the old one: a conflict.
    let args = |r: String| {
        vec![
            "node".to_owned(),
            "set".to_owned(),
            "--vtep".to_owned(),
            "192.0.2.9".to_owned(),
            "--router-mac".to_owned(),
            "02:00:00:00:01:09".to_owned(),
            "--uplink".to_owned(),
            "0".to_owned(),
            "--revision".to_owned(),
            r,
        ]
    };
    let a = args(rev.to_string());
    let (code, _, err) = h
        .dpuctl(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = h
        .dpuctl(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    assert_eq!(code, 1);
    assert!(
        err.contains("FailedPrecondition") || err.contains("Aborted"),
        "{err}"
    );
    // Bad input names the field and changes nothing.
    let before = h.key_count().await;
    let (code, _, err) = h
        .dpuctl(&[
            "node",
            "set",
            "--vtep",
            "192.0.2.300",
            "--router-mac",
            "02:00:00:00:01:01",
            "--uplink",
            "0",
        ])
        .await;
    assert_eq!(code, 1);
    assert!(err.contains("offending field: vtep"), "{err}");
    let (code, _, err) = h
        .dpuctl(&[
            "node",
            "set",
            "--vtep",
            "192.0.2.1",
            "--router-mac",
            "02:00:00:00:01",
            "--uplink",
            "0",
        ])
        .await;
    assert_eq!(code, 1);
    assert!(err.contains("offending field: router_mac"), "{err}");
    assert_eq!(h.key_count().await, before);
    let (_, out, _) = h.dpuctl(&["--json", "node", "get"]).await;
    let got: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["vtep"], "192.0.2.9");
}
