//! `dpuctl`: the operator's CLI over the host agent's gRPC API.
//!
//! Exit codes: 0 success, 1 the host agent refused or failed the request, 2 bad command line,
//! 3 the host agent is unreachable.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use host_agent::api::{bad_request, pb};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use pb::dpu_service_client::DpuServiceClient;
use pb::image_service_client::ImageServiceClient;
use pb::meter_service_client::MeterServiceClient;
use pb::nat_service_client::NatServiceClient;
use pb::node_service_client::NodeServiceClient;
use pb::route_service_client::RouteServiceClient;
use pb::status_service_client::StatusServiceClient;
use pb::vpc_service_client::VpcServiceClient;

const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Manage the DPU gateway through the host agent.
#[derive(Debug, Parser)]
#[command(name = "dpuctl", version)]
struct Cli {
    /// The host agent's gRPC address [default: $DPUCTL_SERVER, else http://127.0.0.1:50051].
    #[arg(long, global = true)]
    server: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// VPCs.
    #[command(subcommand)]
    Vpc(VpcCmd),
    /// Static routes.
    #[command(subcommand)]
    Route(RouteCmd),
    /// The routes of one VPC.
    Routes {
        /// The VPC.
        #[arg(long)]
        vpc: String,
    },
    /// NAT rules.
    #[command(subcommand)]
    Nat(NatCmd),
    /// Meters.
    #[command(subcommand)]
    Meter(MeterCmd),
    /// Where each object landed (offloaded, software, failed) and why.
    Status {
        /// Only this DPU.
        #[arg(long)]
        dpu: Option<String>,
    },
    /// The DPUs: identity, agent version, liveness, capabilities per port.
    Dpus,
    /// The node: the DPU's VTEP, router MAC and uplink ports.
    #[command(subcommand)]
    Node(NodeCmd),
    /// DPU images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// DPUs: A/B pair operations.
    #[command(subcommand)]
    Dpu(DpuCmd),
}

#[derive(Debug, Subcommand)]
enum DpuCmd {
    /// Planned switchover of an A/B pair: the active member stops allocating, waits until the
    /// standby holds every session, and hands the leader key over; no packet is lost. Refused
    /// while the standby is not Ready. Returns once the other member is active.
    Switchover {
        /// The pair (its `group` in the host agent's configuration); may be left out when the
        /// host agent runs one pair.
        #[arg(long)]
        group: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Flash a signed image (built with `dpu-image build`) into the inactive slot of DPUs. The
    /// host agent reads the file once and serves it to every DPU; each DPU verifies it against
    /// its own trusted keys and target. Exit 1 if any DPU failed or rolled back.
    Flash {
        /// A DPU to flash (repeat for several).
        #[arg(long = "dpu", required_unless_present = "all")]
        dpus: Vec<String>,
        /// Every connected DPU.
        #[arg(long, conflicts_with = "dpus")]
        all: bool,
        /// DPUs flashed at once.
        #[arg(long, default_value_t = 4)]
        parallel: u32,
        /// Parallel fetch streams per DPU (1-16).
        #[arg(long, default_value_t = 4)]
        streams: u32,
        /// Trial boots of the new slot before it rolls back (1-10).
        #[arg(long, default_value_t = 3)]
        tries: u32,
        /// Restart each DPU agent into the new slot and wait until it commits or rolls back.
        #[arg(long)]
        activate: bool,
        /// The image file (on the host agent's machine).
        image: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCmd {
    /// Set (create or replace) the node.
    Set {
        /// The local VXLAN tunnel endpoint (IPv4).
        #[arg(long)]
        vtep: String,
        /// The router MAC, e.g. 02:00:00:00:00:01.
        #[arg(long)]
        router_mac: String,
        /// A DPU port facing the underlay (repeatable).
        #[arg(long = "uplink", required = true)]
        uplinks: Vec<u32>,
        /// Only if the stored node's revision is still this.
        #[arg(long, default_value_t = 0)]
        revision: i64,
    },
    /// Show the node.
    Get,
}

#[derive(Debug, Subcommand)]
enum VpcCmd {
    /// Create a VPC.
    Create {
        name: String,
        /// Its L3 VNI.
        #[arg(long)]
        vni: u32,
        /// Its VRF table.
        #[arg(long)]
        table: u32,
        /// A DPU port of the VPC (repeatable).
        #[arg(long = "port")]
        ports: Vec<u32>,
    },
    /// List VPCs.
    List,
    /// Show one VPC.
    Get { name: String },
    /// Delete a VPC.
    Delete {
        name: String,
        /// Only if its revision is still this.
        #[arg(long, default_value_t = 0)]
        revision: i64,
    },
}

#[derive(Debug, Args)]
struct TableSel {
    /// The VRF table.
    #[arg(long, conflicts_with = "vpc")]
    table: Option<u32>,
    /// The VPC whose table it is.
    #[arg(long)]
    vpc: Option<String>,
}

#[derive(Debug, Subcommand)]
enum RouteCmd {
    /// Add a static route.
    Add {
        /// The prefix, e.g. 10.1.0.0/16.
        prefix: String,
        #[command(flatten)]
        sel: TableSel,
        /// A next hop (repeatable for ECMP): `blackhole`, `vrf=254`,
        /// `via=GW,port=P,mac=MAC` or `vni=N,vtep=IP,rmac=MAC`.
        #[arg(long = "nh", required = true)]
        nexthops: Vec<String>,
    },
    /// List static routes.
    List {
        #[command(flatten)]
        sel: TableSel,
    },
    /// Delete a static route.
    Delete {
        prefix: String,
        #[command(flatten)]
        sel: TableSel,
        /// Only if its revision is still this.
        #[arg(long, default_value_t = 0)]
        revision: i64,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum NatKindArg {
    Static44,
    Static66,
    Napt44,
    Nat64,
}

#[derive(Debug, Subcommand)]
enum NatCmd {
    /// Create a NAT rule.
    Create {
        name: String,
        /// The VPC whose traffic it translates.
        #[arg(long)]
        vpc: String,
        /// The kind of translation.
        #[arg(long, value_enum)]
        kind: NatKindArg,
        /// Inside address (static44/static66).
        #[arg(long)]
        inside: Option<String>,
        /// Outside address (static44/static66).
        #[arg(long)]
        outside: Option<String>,
        /// Public pool FIRST-LAST (napt44/nat64).
        #[arg(long)]
        pool: Option<String>,
        /// Port range FIRST-LAST (napt44/nat64).
        #[arg(long, default_value = "1024-65535")]
        ports: String,
        /// NAT64 prefix (nat64), e.g. 64:ff9b::/96.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// List NAT rules.
    List,
    /// Delete a NAT rule.
    Delete {
        name: String,
        #[arg(long, default_value_t = 0)]
        revision: i64,
    },
}

#[derive(Debug, Subcommand)]
enum MeterCmd {
    /// Create a meter (trTCM with --pir/--pbs, srTCM with --ebs).
    Create {
        name: String,
        /// Police a VPC's traffic.
        #[arg(long, conflicts_with = "route")]
        vpc: Option<String>,
        /// Police a route's traffic: TABLE:PREFIX.
        #[arg(long)]
        route: Option<String>,
        /// Committed rate, bytes/s.
        #[arg(long)]
        cir: u64,
        /// Committed burst, bytes.
        #[arg(long)]
        cbs: u64,
        /// Peak rate, bytes/s (trTCM).
        #[arg(long, requires = "pbs", conflicts_with = "ebs")]
        pir: Option<u64>,
        /// Peak burst, bytes (trTCM).
        #[arg(long, requires = "pir")]
        pbs: Option<u64>,
        /// Excess burst, bytes (srTCM).
        #[arg(long)]
        ebs: Option<u64>,
    },
    /// List meters.
    List,
    /// Delete a meter.
    Delete {
        name: String,
        #[arg(long, default_value_t = 0)]
        revision: i64,
    },
}

/// Why dpuctl failed.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot reach host agent at {url}: {reason}; is host-agent running?")]
    Unreachable { url: String, reason: String },
    #[error("host agent at {url} is unreachable: {message}; is host-agent running?")]
    Gone { url: String, message: String },
    #[error("{code:?}: {message}")]
    Refused {
        code: Code,
        message: String,
        field: Option<String>,
    },
    #[error("{0}")]
    Usage(String),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{failed} of {total} DPUs did not flash")]
    Flash { failed: usize, total: usize },
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } | CliError::Gone { .. } => 3,
            CliError::Usage(_) => 2,
            CliError::Refused { .. } | CliError::Json(_) | CliError::Flash { .. } => 1,
        }
    }
}

struct Ctx {
    url: String,
    channel: Channel,
    json: bool,
}

impl Ctx {
    fn refused(&self, s: Status) -> CliError {
        // A transport failure after connecting (agent stopped mid-call) is not the agent's answer.
        // Statuses the agent sent carry no source; client-side transport failures do.
        if s.code() == Code::Unavailable && std::error::Error::source(&s).is_some() {
            return CliError::Gone {
                url: self.url.clone(),
                message: s.message().to_owned(),
            };
        }
        let field = bad_request(&s)
            .and_then(|b| b.field_violations.first().map(|f| f.field.clone()))
            .filter(|f| !f.is_empty());
        CliError::Refused {
            code: s.code(),
            message: s.message().to_owned(),
            field,
        }
    }

    fn print<T: Serialize>(
        &self,
        v: &T,
        table: impl FnOnce() -> Vec<Vec<String>>,
    ) -> Result<(), CliError> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else {
            print_table(&table());
        }
        Ok(())
    }
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                let w = widths.get(c).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// "transport error: tcp connect error: Connection refused (os error 111)".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.ends_with(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

fn header(cols: &[&str]) -> Vec<String> {
    cols.iter().map(|s| (*s).to_owned()).collect()
}

fn kv_map(spec: &str) -> Result<Vec<(&str, &str)>, CliError> {
    spec.split(',')
        .map(|p| {
            p.split_once('=')
                .ok_or_else(|| CliError::Usage(format!("next hop `{spec}`: expected key=value")))
        })
        .collect()
}

fn parse_u32(what: &str, s: &str) -> Result<u32, CliError> {
    s.parse()
        .map_err(|_| CliError::Usage(format!("{what}: `{s}` is not a number")))
}

/// Parses a `--nh` spec into a next hop.
fn nexthop(spec: &str) -> Result<pb::Nexthop, CliError> {
    use pb::nexthop::Kind;
    if spec == "blackhole" {
        return Ok(pb::Nexthop {
            kind: Some(Kind::Blackhole(pb::BlackholeNexthop {})),
        });
    }
    let kv = kv_map(spec)?;
    let get = |k: &str| {
        kv.iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| (*v).to_owned())
            .ok_or_else(|| CliError::Usage(format!("next hop `{spec}`: missing `{k}=`")))
    };
    let kind = if let Ok(t) = get("vrf") {
        Kind::Vrf(pb::VrfNexthop {
            table: parse_u32("vrf", &t)?,
        })
    } else if let Ok(gw) = get("via") {
        Kind::Underlay(pb::UnderlayNexthop {
            gateway: gw,
            port: parse_u32("port", &get("port")?)?,
            mac: get("mac")?,
        })
    } else if let Ok(vni) = get("vni") {
        Kind::Vxlan(pb::VxlanNexthop {
            vni: parse_u32("vni", &vni)?,
            remote_vtep: get("vtep")?,
            router_mac: get("rmac")?,
        })
    } else {
        return Err(CliError::Usage(format!(
            "next hop `{spec}`: expected blackhole, vrf=T, via=GW,port=P,mac=M or vni=N,vtep=IP,rmac=M"
        )));
    };
    Ok(pb::Nexthop { kind: Some(kind) })
}

fn nexthop_text(nh: &pb::Nexthop) -> String {
    use pb::nexthop::Kind;
    match &nh.kind {
        Some(Kind::Underlay(u)) => format!("via {} port {} mac {}", u.gateway, u.port, u.mac),
        Some(Kind::Vxlan(x)) => format!(
            "vxlan vni {} vtep {} rmac {}",
            x.vni, x.remote_vtep, x.router_mac
        ),
        Some(Kind::Vrf(v)) => format!("table {}", v.table),
        Some(Kind::Blackhole(_)) => "blackhole".to_owned(),
        None => "?".to_owned(),
    }
}

fn range(what: &str, s: &str) -> Result<(String, String), CliError> {
    s.split_once('-')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .ok_or_else(|| CliError::Usage(format!("{what}: expected FIRST-LAST, got `{s}`")))
}

fn need(v: Option<String>, what: &str) -> Result<String, CliError> {
    v.ok_or_else(|| CliError::Usage(format!("--{what} is required for this kind")))
}

async fn table_of(ctx: &Ctx, sel: &TableSel) -> Result<Option<u32>, CliError> {
    match (&sel.table, &sel.vpc) {
        (Some(t), _) => Ok(Some(*t)),
        (None, Some(v)) => {
            let mut c = VpcServiceClient::new(ctx.channel.clone());
            let vpc = c
                .get_vpc(pb::GetVpcRequest { name: v.clone() })
                .await
                .map_err(|s| ctx.refused(s))?
                .into_inner();
            Ok(Some(vpc.table))
        }
        (None, None) => Ok(None),
    }
}

fn node_rows(n: &pb::Node) -> Vec<Vec<String>> {
    let uplinks: Vec<String> = n.uplinks.iter().map(u32::to_string).collect();
    vec![
        header(&["VTEP", "ROUTER MAC", "UPLINKS", "REVISION"]),
        vec![
            n.vtep.clone(),
            n.router_mac.clone(),
            uplinks.join(","),
            n.revision.to_string(),
        ],
    ]
}

fn vpc_rows(vpcs: &[pb::Vpc]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["NAME", "VNI", "TABLE", "PORTS", "REVISION"])];
    for v in vpcs {
        let ports: Vec<String> = v.ports.iter().map(u32::to_string).collect();
        rows.push(vec![
            v.name.clone(),
            v.vni.to_string(),
            v.table.to_string(),
            ports.join(","),
            v.revision.to_string(),
        ]);
    }
    rows
}

fn route_rows(routes: &[pb::Route]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "TABLE", "PREFIX", "SOURCE", "NEXTHOPS", "REVISION",
    ])];
    for r in routes {
        let (t, p) = r
            .key
            .as_ref()
            .map(|k| (k.table.to_string(), k.prefix.clone()))
            .unwrap_or_default();
        let nhs: Vec<String> = r.nexthops.iter().map(nexthop_text).collect();
        rows.push(vec![
            t,
            p,
            r.source.clone(),
            nhs.join("; "),
            r.revision.to_string(),
        ]);
    }
    rows
}

fn nat_text(n: &pb::NatRule) -> (String, String) {
    use pb::nat_rule::Kind;
    let pool = |p: &Option<pb::Ipv4Range>| {
        p.as_ref()
            .map(|p| format!("{}-{}", p.first, p.last))
            .unwrap_or_default()
    };
    let ports = |p: &Option<pb::PortRange>| {
        p.as_ref()
            .map(|p| format!("{}-{}", p.first, p.last))
            .unwrap_or_default()
    };
    match &n.kind {
        Some(Kind::Static44(s)) => ("static44".into(), format!("{} <-> {}", s.inside, s.outside)),
        Some(Kind::Static66(s)) => ("static66".into(), format!("{} <-> {}", s.inside, s.outside)),
        Some(Kind::Napt44(s)) => (
            "napt44".into(),
            format!("pool {} ports {}", pool(&s.pool), ports(&s.ports)),
        ),
        Some(Kind::Nat64(s)) => (
            "nat64".into(),
            format!(
                "{} pool {} ports {}",
                s.prefix,
                pool(&s.pool),
                ports(&s.ports)
            ),
        ),
        None => ("?".into(), String::new()),
    }
}

fn placement_name(p: i32) -> &'static str {
    match pb::Placement::try_from(p) {
        Ok(pb::Placement::Offloaded) => "offloaded",
        Ok(pb::Placement::Software) => "software",
        Ok(pb::Placement::Failed) => "failed",
        _ => "unknown",
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let url = cli
        .server
        .clone()
        .or_else(|| {
            std::env::var("DPUCTL_SERVER")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| CliError::Usage(format!("--server {url}: {e}")))?
        .connect_timeout(Duration::from_secs(3));
    // A flash streams for as long as it takes; everything else gets 30 s.
    let long_channel = endpoint.connect_lazy();
    let channel = endpoint
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| CliError::Unreachable {
            url: url.clone(),
            reason: error_chain(&e),
        })?;
    let ctx = Ctx {
        url,
        channel,
        json: cli.json,
    };
    let ch = || ctx.channel.clone();
    let refused = |s: Status| ctx.refused(s);

    match cli.cmd {
        Cmd::Image(ImageCmd::Flash {
            dpus,
            all,
            parallel,
            streams,
            tries,
            activate,
            image,
        }) => {
            let path = std::path::absolute(&image)
                .map_err(|e| CliError::Usage(format!("{}: {e}", image.display())))?;
            let mut c = ImageServiceClient::new(long_channel);
            let mut events = c
                .flash(pb::FlashRequest {
                    image_path: path.display().to_string(),
                    dpu_ids: dpus,
                    all,
                    parallel,
                    streams,
                    tries,
                    activate,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let mut view = FlashView::new(ctx.json);
            loop {
                match events.message().await {
                    Ok(Some(e)) => view.event(e)?,
                    Ok(None) => break,
                    Err(s) => return Err(refused(s)),
                }
            }
            view.finish()?;
        }
        Cmd::Vpc(cmd) => {
            let mut c = VpcServiceClient::new(ch());
            match cmd {
                VpcCmd::Create {
                    name,
                    vni,
                    table,
                    ports,
                } => {
                    let vpc = pb::Vpc {
                        name,
                        vni,
                        table,
                        ports,
                        revision: 0,
                    };
                    let v = c
                        .create_vpc(pb::CreateVpcRequest { vpc: Some(vpc) })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&v, || vpc_rows(std::slice::from_ref(&v)))?;
                }
                VpcCmd::List => {
                    let r = c
                        .list_vpcs(pb::ListVpcsRequest {})
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r.vpcs, || vpc_rows(&r.vpcs))?;
                }
                VpcCmd::Get { name } => {
                    let v = c
                        .get_vpc(pb::GetVpcRequest { name })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&v, || vpc_rows(std::slice::from_ref(&v)))?;
                }
                VpcCmd::Delete { name, revision } => {
                    let r = c
                        .delete_vpc(pb::DeleteVpcRequest {
                            name: name.clone(),
                            revision,
                        })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r, || vec![vec![format!("deleted vpc {name}")]])?;
                }
            }
        }
        Cmd::Route(cmd) => {
            let mut c = RouteServiceClient::new(ch());
            match cmd {
                RouteCmd::Add {
                    prefix,
                    sel,
                    nexthops,
                } => {
                    let table = table_of(&ctx, &sel).await?.unwrap_or(254);
                    let nexthops = nexthops
                        .iter()
                        .map(|s| nexthop(s))
                        .collect::<Result<_, _>>()?;
                    let route = pb::Route {
                        key: Some(pb::RouteKey { table, prefix }),
                        nexthops,
                        revision: 0,
                        source: String::new(),
                    };
                    let r = c
                        .create_route(pb::CreateRouteRequest { route: Some(route) })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r, || route_rows(std::slice::from_ref(&r)))?;
                }
                RouteCmd::List { sel } => {
                    let table = table_of(&ctx, &sel).await?.unwrap_or(0);
                    let r = c
                        .list_routes(pb::ListRoutesRequest {
                            table,
                            vpc: String::new(),
                            learned: false,
                        })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r.routes, || route_rows(&r.routes))?;
                }
                RouteCmd::Delete {
                    prefix,
                    sel,
                    revision,
                } => {
                    let table = table_of(&ctx, &sel).await?.unwrap_or(254);
                    let r = c
                        .delete_route(pb::DeleteRouteRequest {
                            key: Some(pb::RouteKey {
                                table,
                                prefix: prefix.clone(),
                            }),
                            revision,
                        })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r, || {
                        vec![vec![format!("deleted route {prefix} in table {table}")]]
                    })?;
                }
            }
        }
        Cmd::Routes { vpc } => {
            let mut c = RouteServiceClient::new(ch());
            let r = c
                .list_routes(pb::ListRoutesRequest {
                    table: 0,
                    vpc,
                    learned: true,
                })
                .await
                .map_err(refused)?
                .into_inner();
            ctx.print(&r.routes, || route_rows(&r.routes))?;
        }
        Cmd::Nat(cmd) => {
            let mut c = NatServiceClient::new(ch());
            match cmd {
                NatCmd::Create {
                    name,
                    vpc,
                    kind,
                    inside,
                    outside,
                    pool,
                    ports,
                    prefix,
                } => {
                    use pb::nat_rule::Kind;
                    let port_range = || -> Result<pb::PortRange, CliError> {
                        let (a, b) = range("--ports", &ports)?;
                        Ok(pb::PortRange {
                            first: parse_u32("--ports", &a)?,
                            last: parse_u32("--ports", &b)?,
                        })
                    };
                    let pool_range = |p: Option<String>| -> Result<pb::Ipv4Range, CliError> {
                        let (first, last) = range("--pool", &need(p, "pool")?)?;
                        Ok(pb::Ipv4Range { first, last })
                    };
                    let kind = match kind {
                        NatKindArg::Static44 => Kind::Static44(pb::Static44 {
                            inside: need(inside, "inside")?,
                            outside: need(outside, "outside")?,
                        }),
                        NatKindArg::Static66 => Kind::Static66(pb::Static66 {
                            inside: need(inside, "inside")?,
                            outside: need(outside, "outside")?,
                        }),
                        NatKindArg::Napt44 => Kind::Napt44(pb::Napt44 {
                            pool: Some(pool_range(pool)?),
                            ports: Some(port_range()?),
                        }),
                        NatKindArg::Nat64 => Kind::Nat64(pb::Nat64 {
                            prefix: need(prefix, "prefix")?,
                            pool: Some(pool_range(pool)?),
                            ports: Some(port_range()?),
                        }),
                    };
                    let rule = pb::NatRule {
                        name,
                        vpc,
                        kind: Some(kind),
                        revision: 0,
                    };
                    let r = c
                        .create_nat_rule(pb::CreateNatRuleRequest { rule: Some(rule) })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r, || nat_rows(std::slice::from_ref(&r)))?;
                }
                NatCmd::List => {
                    let r = c
                        .list_nat_rules(pb::ListNatRulesRequest {})
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r.rules, || nat_rows(&r.rules))?;
                }
                NatCmd::Delete { name, revision } => {
                    let r = c
                        .delete_nat_rule(pb::DeleteNatRuleRequest {
                            name: name.clone(),
                            revision,
                        })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r, || vec![vec![format!("deleted nat rule {name}")]])?;
                }
            }
        }
        Cmd::Meter(cmd) => {
            let mut c = MeterServiceClient::new(ch());
            match cmd {
                MeterCmd::Create {
                    name,
                    vpc,
                    route,
                    cir,
                    cbs,
                    pir,
                    pbs,
                    ebs,
                } => {
                    let profile = match (pir, pbs) {
                        (Some(pir), Some(pbs)) => {
                            pb::meter::Profile::Trtcm(pb::TrTcm { cir, cbs, pir, pbs })
                        }
                        _ => pb::meter::Profile::Srtcm(pb::SrTcm {
                            cir,
                            cbs,
                            ebs: ebs.unwrap_or(0),
                        }),
                    };
                    let target = match (vpc, route) {
                        (Some(v), _) => pb::meter::Target::Vpc(v),
                        (None, Some(r)) => {
                            let (t, p) = r.split_once(':').ok_or_else(|| {
                                CliError::Usage(format!(
                                    "--route: expected TABLE:PREFIX, got `{r}`"
                                ))
                            })?;
                            pb::meter::Target::Route(pb::RouteKey {
                                table: parse_u32("--route", t)?,
                                prefix: p.to_owned(),
                            })
                        }
                        (None, None) => {
                            return Err(CliError::Usage(
                                "one of --vpc or --route is required".into(),
                            ))
                        }
                    };
                    let meter = pb::Meter {
                        name,
                        profile: Some(profile),
                        target: Some(target),
                        revision: 0,
                    };
                    let r = c
                        .create_meter(pb::CreateMeterRequest { meter: Some(meter) })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r, || meter_rows(std::slice::from_ref(&r)))?;
                }
                MeterCmd::List => {
                    let r = c
                        .list_meters(pb::ListMetersRequest {})
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r.meters, || meter_rows(&r.meters))?;
                }
                MeterCmd::Delete { name, revision } => {
                    let r = c
                        .delete_meter(pb::DeleteMeterRequest {
                            name: name.clone(),
                            revision,
                        })
                        .await
                        .map_err(refused)?
                        .into_inner();
                    ctx.print(&r, || vec![vec![format!("deleted meter {name}")]])?;
                }
            }
        }
        Cmd::Status { dpu } => {
            let mut c = StatusServiceClient::new(ch());
            let r = c
                .list_status(pb::ListStatusRequest {
                    dpu: dpu.unwrap_or_default(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let json: Vec<serde_json::Value> = r
                .statuses
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "dpu": s.dpu,
                        "object": s.object_text,
                        "placement": placement_name(s.placement),
                        "reason_code": s.reason_code,
                        "reason": s.reason,
                    })
                })
                .collect();
            ctx.print(&json, || {
                let mut rows = vec![header(&["DPU", "OBJECT", "WHERE", "WHY"])];
                for s in &r.statuses {
                    let why = if s.reason_code.is_empty() {
                        String::new()
                    } else {
                        format!("{}: {}", s.reason_code, s.reason)
                    };
                    // zebra's routes on no DPU come with no DPU.
                    let dpu = if s.dpu.is_empty() { "-" } else { &s.dpu };
                    rows.push(vec![
                        dpu.to_owned(),
                        s.object_text.clone(),
                        placement_name(s.placement).to_owned(),
                        why,
                    ]);
                }
                rows
            })?;
        }
        Cmd::Node(cmd) => {
            let mut c = NodeServiceClient::new(ch());
            let n = match cmd {
                NodeCmd::Set {
                    vtep,
                    router_mac,
                    uplinks,
                    revision,
                } => {
                    let node = pb::Node {
                        vtep,
                        router_mac,
                        uplinks,
                        revision: 0,
                    };
                    c.set_node(pb::SetNodeRequest {
                        node: Some(node),
                        revision,
                    })
                    .await
                }
                NodeCmd::Get => c.get_node(pb::GetNodeRequest {}).await,
            }
            .map_err(refused)?
            .into_inner();
            ctx.print(&n, || node_rows(&n))?;
        }
        Cmd::Dpu(DpuCmd::Switchover { group }) => {
            let mut c = DpuServiceClient::new(ch());
            let r = c
                .switchover(pb::SwitchoverRequest {
                    group: group.unwrap_or_default(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            ctx.print(&r, || {
                vec![
                    header(&["FROM", "TO", "EPOCH", "TOOK"]),
                    vec![
                        r.from.clone(),
                        r.to.clone(),
                        r.epoch.to_string(),
                        format!("{} ms", r.took_ms),
                    ],
                ]
            })?;
        }
        Cmd::Dpus => {
            let mut c = DpuServiceClient::new(ch());
            let r = c
                .list_dpus(pb::ListDpusRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            ctx.print(&r.dpus, || {
                let mut rows = vec![header(&[
                    "ID",
                    "AGENT",
                    "ALIVE",
                    "PORTS",
                    "SLOT",
                    "ACTIVE",
                    "PENDING",
                    "LAST BOOT",
                    "PAIR",
                ])];
                for d in &r.dpus {
                    let ports: Vec<String> = d
                        .ports
                        .iter()
                        .map(|p| format!("{}:{}", p.port, p.profile))
                        .collect();
                    let or_dash = |s: &str| {
                        if s.is_empty() {
                            "-".to_owned()
                        } else {
                            s.to_owned()
                        }
                    };
                    rows.push(vec![
                        d.id.clone(),
                        d.agent_version.clone(),
                        if d.alive { "yes" } else { "DEAD" }.to_owned(),
                        ports.join(" "),
                        or_dash(&d.running_slot),
                        or_dash(&d.active_slot),
                        if d.pending_slot.is_empty() {
                            "-".to_owned()
                        } else {
                            format!("{} ({} tries)", d.pending_slot, d.tries_left)
                        },
                        or_dash(&d.last_boot),
                        d.pair.as_ref().map_or_else(
                            || "-".to_owned(),
                            |p| {
                                format!(
                                    "{} epoch={} {} lag={}ev/{}ms sessions={}{}",
                                    p.role,
                                    p.epoch,
                                    if p.ready { "ready" } else { "NOT-READY" },
                                    p.lag_events,
                                    p.lag_ms,
                                    p.sessions,
                                    if p.peer_connected { "" } else { " peer-down" }
                                )
                            },
                        ),
                    ]);
                }
                rows
            })?;
        }
    }
    Ok(())
}

/// What `dpuctl image flash` shows: JSON lines, a live bar per DPU on a terminal, or a line
/// per step (and per quarter of progress) otherwise; then a summary.
struct FlashView {
    json: bool,
    tty: bool,
    order: Vec<String>,
    last: std::collections::BTreeMap<String, pb::FlashEvent>,
    drawn: usize,
}

fn flash_line(e: &pb::FlashEvent) -> String {
    let bar = |done: u32, total: u32| {
        let width = 30usize;
        let filled = (done as usize * width)
            .checked_div(total as usize)
            .unwrap_or(0)
            .min(width);
        format!(
            "[{}{}] {:>3}% {done}/{total} chunks",
            "#".repeat(filled),
            ".".repeat(width - filled),
            (done * 100).checked_div(total).unwrap_or(0)
        )
    };
    let what = match e.phase.as_str() {
        "queued" => "queued".to_owned(),
        "started" => format!(
            "slot {}: {} chunks{}",
            e.slot,
            e.total,
            if e.resumed > 0 {
                format!(", {} resumed", e.resumed)
            } else {
                String::new()
            }
        ),
        "progress" => bar(e.done, e.total),
        "flashed" => format!(
            "slot {} flashed and verified, {} trial boot(s) armed ({} fetches, {} re-fetched, {} resumed)",
            e.slot, e.tries, e.fetches, e.refetches, e.resumed
        ),
        "rebooting" => format!("restarting into slot {}", e.slot),
        "failed" => format!("FAILED ({}): {}", e.failure, e.message),
        "committed" | "rolled_back" | "booted" => format!("{}: {}", e.phase, e.message),
        other => other.to_owned(),
    };
    format!("{:<16} {what}", e.dpu_id)
}

impl FlashView {
    fn new(json: bool) -> Self {
        use std::io::IsTerminal;
        FlashView {
            json,
            tty: std::io::stderr().is_terminal(),
            order: Vec::new(),
            last: std::collections::BTreeMap::new(),
            drawn: 0,
        }
    }

    fn event(&mut self, e: pb::FlashEvent) -> Result<(), CliError> {
        if self.json {
            println!("{}", serde_json::to_string(&e)?);
        }
        if !self.order.contains(&e.dpu_id) {
            self.order.push(e.dpu_id.clone());
        }
        let prev = self.last.insert(e.dpu_id.clone(), e.clone());
        if self.json {
            return Ok(());
        }
        if self.tty {
            // Redraw one line per DPU in place.
            let mut out = String::new();
            if self.drawn > 0 {
                out.push_str(&format!("\x1b[{}A", self.drawn));
            }
            for d in &self.order {
                if let Some(ev) = self.last.get(d) {
                    out.push_str(&format!("\x1b[2K{}\n", flash_line(ev)));
                }
            }
            self.drawn = self.order.len();
            eprint!("{out}");
        } else {
            let quarter = |x: &pb::FlashEvent| (x.done * 4).checked_div(x.total).unwrap_or(0);
            let show = e.phase != "progress"
                || prev.is_none_or(|p| p.phase != "progress" || quarter(&p) != quarter(&e));
            if show {
                eprintln!("{}", flash_line(&e));
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), CliError> {
        let total = self.order.len();
        let ok = |e: &pb::FlashEvent| matches!(e.phase.as_str(), "committed" | "flashed");
        let failed = self
            .order
            .iter()
            .filter(|d| !self.last.get(*d).is_some_and(ok))
            .count();
        if !self.json {
            let mut rows = vec![header(&["DPU", "RESULT", "SLOT", "DETAILS"])];
            for d in &self.order {
                let Some(e) = self.last.get(d) else { continue };
                let details = match e.phase.as_str() {
                    "flashed" => format!("{} trial boot(s) armed; not restarted", e.tries),
                    "failed" => format!("{}: {}", e.failure, e.message),
                    _ => e.message.clone(),
                };
                rows.push(vec![d.clone(), e.phase.clone(), e.slot.clone(), details]);
            }
            print_table(&rows);
        }
        if failed > 0 {
            return Err(CliError::Flash { failed, total });
        }
        Ok(())
    }
}

fn nat_rows(rules: &[pb::NatRule]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["NAME", "VPC", "KIND", "DETAILS", "REVISION"])];
    for n in rules {
        let (kind, details) = nat_text(n);
        rows.push(vec![
            n.name.clone(),
            n.vpc.clone(),
            kind,
            details,
            n.revision.to_string(),
        ]);
    }
    rows
}

fn meter_rows(meters: &[pb::Meter]) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["NAME", "TARGET", "PROFILE", "REVISION"])];
    for m in meters {
        let target = match &m.target {
            Some(pb::meter::Target::Vpc(v)) => format!("vpc {v}"),
            Some(pb::meter::Target::Route(k)) => format!("route {} in table {}", k.prefix, k.table),
            None => String::new(),
        };
        let profile = match &m.profile {
            Some(pb::meter::Profile::Srtcm(p)) => {
                format!("srTCM cir {} cbs {} ebs {}", p.cir, p.cbs, p.ebs)
            }
            Some(pb::meter::Profile::Trtcm(p)) => {
                format!(
                    "trTCM cir {} cbs {} pir {} pbs {}",
                    p.cir, p.cbs, p.pir, p.pbs
                )
            }
            None => String::new(),
        };
        rows.push(vec![
            m.name.clone(),
            target,
            profile,
            m.revision.to_string(),
        ]);
    }
    rows
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                let (code, field) = match &e {
                    CliError::Refused { code, field, .. } => (format!("{code:?}"), field.clone()),
                    _ => (String::new(), None),
                };
                let v = serde_json::json!({"error": e.to_string(), "code": code, "field": field});
                eprintln!("{v}");
            } else {
                eprintln!("dpuctl: {e}");
                if let CliError::Refused { field: Some(f), .. } = &e {
                    eprintln!("  offending field: {f}");
                }
            }
            ExitCode::from(e.exit_code())
        }
    }
}
