//! The management gRPC API (`dpucp.v1`, proto files in `host-agent/proto/`), served with
//! `grpc.health.v1` and server reflection so `grpcurl` works without the proto files.
//!
//! Errors: invalid input is `InvalidArgument` with the field path in the message and a
//! `dpucp.v1.BadRequest` in the status details (a `google.rpc.Status` in
//! `grpc-status-details-bin`, as rich-error clients expect); a stale revision is `Aborted`;
//! creating what exists is `AlreadyExists`; deleting what others use is `FailedPrecondition`;
//! etcd unreachable is `Unavailable`. Nothing is stored when an error is returned.

pub mod convert;
mod services;

use core::future::Future;
use std::net::SocketAddr;

use flow_offload::model::ModelError;
use prost::Message;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Status};

use crate::flashing::FlashHub;
use crate::store::{Store, StoreError};
use convert::FieldError;

/// The generated protobuf and gRPC code.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_debug_implementations
)]
pub mod pb {
    tonic::include_proto!("dpucp.v1");
    /// The encoded file descriptor set of `dpucp.v1`, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("dpucp_v1_descriptor");
}

/// `google.rpc.Status`, the payload of `grpc-status-details-bin` (field numbers as published).
#[derive(Clone, PartialEq, Message)]
pub struct RpcStatus {
    /// The gRPC code.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// The message.
    #[prost(string, tag = "2")]
    pub message: String,
    /// Typed details.
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<AnyDetail>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, Message)]
pub struct AnyDetail {
    /// `type.googleapis.com/dpucp.v1.BadRequest`.
    #[prost(string, tag = "1")]
    pub type_url: String,
    /// The encoded message.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// The type URL of [`pb::BadRequest`] details.
pub const BAD_REQUEST_TYPE_URL: &str = "type.googleapis.com/dpucp.v1.BadRequest";

/// The `BadRequest` details of an `InvalidArgument` status, if it carries them.
pub fn bad_request(status: &Status) -> Option<pb::BadRequest> {
    let s = RpcStatus::decode(status.details()).ok()?;
    s.details
        .iter()
        .find(|d| d.type_url == BAD_REQUEST_TYPE_URL)
        .and_then(|d| pb::BadRequest::decode(d.value.as_slice()).ok())
}

/// `InvalidArgument` naming the field, with `BadRequest` details.
pub fn invalid_argument(e: &FieldError) -> Status {
    invalid_field(&e.object, &e.field, &e.problem.to_string(), e.to_string())
}

/// `InvalidArgument` for `object`'s `field`, with `BadRequest` details (`description`) and
/// `message`.
pub fn invalid_field(object: &str, field: &str, description: &str, message: String) -> Status {
    let detail = pb::BadRequest {
        field_violations: vec![pb::FieldViolation {
            field: field.to_owned(),
            description: description.to_owned(),
        }],
        object: object.to_owned(),
    };
    let status = RpcStatus {
        code: Code::InvalidArgument as i32,
        message: message.clone(),
        details: vec![AnyDetail {
            type_url: BAD_REQUEST_TYPE_URL.to_owned(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(
        Code::InvalidArgument,
        message,
        status.encode_to_vec().into(),
    )
}

fn model_status(e: &ModelError) -> Status {
    match e {
        ModelError::InBatch { source, .. } => model_status(source),
        ModelError::Invalid { .. } => invalid_argument(&FieldError::from(e.clone())),
        ModelError::NotFound { .. } => Status::not_found(e.to_string()),
        ModelError::InUse { .. } => Status::failed_precondition(e.to_string()),
    }
}

/// The gRPC status of a store error.
pub fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::Invalid(m) => model_status(m),
        StoreError::Conflict { .. } | StoreError::Contended { .. } => {
            Status::aborted(e.to_string())
        }
        StoreError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        StoreError::NotFound { .. } => Status::not_found(e.to_string()),
        StoreError::Unavailable { .. } => Status::unavailable(e.to_string()),
        StoreError::BatchTooLarge { .. } => Status::invalid_argument(e.to_string()),
        StoreError::Corrupt { .. } | StoreError::Inconsistent(_) | StoreError::Rejected { .. } => {
            Status::internal(e.to_string())
        }
    }
}

/// Why the API server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The reflection service could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What the daemon shares with the API beside etcd: the desired state it pushes to its DPUs
/// (listings of FRR's routes), its flash hub (image flashing), and zebra's routes that are
/// on no DPU (`ListStatus`). Each is optional: without it, the matching calls list nothing
/// more than etcd holds (or, for flashing, answer `Unavailable`).
#[derive(Debug, Clone, Default)]
pub struct DaemonViews {
    /// The desired state pushed to the DPUs.
    pub desired: Option<DesiredState>,
    /// The flash hub.
    pub hub: Option<FlashHub>,
    /// zebra's routes on no DPU, and why.
    pub refused: Option<crate::fpm::RefusedRoutes>,
    /// Pair members' reports.
    pub pairs: Option<crate::pair::PairStates>,
    /// Pair members' switchover controls.
    pub pair_controls: Option<crate::pair::PairControls>,
}

/// Binds `addr` and serves the API until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    store: Store,
    views: DaemonViews,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Bind { addr, source })?;
    serve_on_with(listener, store, views, shutdown).await
}

/// The desired state the host agent pushes to its DPUs (configuration + FRR's routes), for
/// listings of learned routes.
pub type DesiredState = tokio::sync::watch::Receiver<std::sync::Arc<flow_offload::model::Model>>;

/// Serves the API on a bound listener (tests bind `127.0.0.1:0` and read the port first).
pub async fn serve_on(
    listener: TcpListener,
    store: Store,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    serve_on_with(listener, store, DaemonViews::default(), shutdown).await
}

/// As [`serve_on`], with the daemon's views ([`DaemonViews`]).
pub async fn serve_on_with(
    listener: TcpListener,
    store: Store,
    views: DaemonViews,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    use pb::dpu_service_server::DpuServiceServer;
    use pb::image_service_server::ImageServiceServer;
    use pb::meter_service_server::MeterServiceServer;
    use pb::nat_service_server::NatServiceServer;
    use pb::node_service_server::NodeServiceServer;
    use pb::route_service_server::RouteServiceServer;
    use pb::status_service_server::StatusServiceServer;
    use pb::vpc_service_server::VpcServiceServer;

    let api = services::Api::new(store, views);
    let (health, health_svc) = tonic_health::server::health_reporter();
    health
        .set_serving::<VpcServiceServer<services::Api>>()
        .await;
    health
        .set_serving::<RouteServiceServer<services::Api>>()
        .await;
    health
        .set_serving::<NatServiceServer<services::Api>>()
        .await;
    health
        .set_serving::<MeterServiceServer<services::Api>>()
        .await;
    health
        .set_serving::<StatusServiceServer<services::Api>>()
        .await;
    health
        .set_serving::<DpuServiceServer<services::Api>>()
        .await;
    health
        .set_serving::<NodeServiceServer<services::Api>>()
        .await;
    health
        .set_serving::<ImageServiceServer<services::Api>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1 and v1alpha: grpcurl and older clients still ask v1alpha.
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let reflection = reflection().build_v1()?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "management API listening");
    }
    tonic::transport::Server::builder()
        .add_service(health_svc)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(VpcServiceServer::new(api.clone()))
        .add_service(RouteServiceServer::new(api.clone()))
        .add_service(NatServiceServer::new(api.clone()))
        .add_service(MeterServiceServer::new(api.clone()))
        .add_service(StatusServiceServer::new(api.clone()))
        .add_service(NodeServiceServer::new(api.clone()))
        .add_service(ImageServiceServer::new(api.clone()))
        .add_service(DpuServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await?;
    Ok(())
}
