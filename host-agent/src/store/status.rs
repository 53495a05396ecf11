//! Per-DPU, per-object offload status under `/dpucp/v1/status/DPU/...`.

use std::pin::Pin;
use std::task::{Context, Poll};

use etcd_client::{EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use flow_offload::model::{Name, ObjectKey};
use flow_offload::status::OffloadStatus;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::Stream;

use super::{keys, EtcdFailure, Store, StoreError};

/// Where one object landed on one DPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEntry {
    /// The DPU.
    pub dpu: Name,
    /// The object.
    pub object: ObjectKey,
    /// Where it landed.
    pub status: OffloadStatus,
}

/// A change of status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusChange {
    /// Set or changed.
    Set {
        /// The new entry.
        entry: StatusEntry,
        /// The etcd revision.
        revision: i64,
    },
    /// Removed (the object was deleted or the DPU went away).
    Removed {
        /// The DPU.
        dpu: Name,
        /// The object.
        object: ObjectKey,
        /// The etcd revision.
        revision: i64,
    },
}

/// A stream of status changes; ends with an error when the etcd watch is lost or compacted
/// (the consumer re-lists). Dropping it stops its task.
#[derive(Debug)]
pub struct StatusWatch {
    rx: mpsc::Receiver<Result<StatusChange, StoreError>>,
    task: JoinHandle<()>,
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for StatusWatch {
    type Item = Result<StatusChange, StoreError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

fn status_prefix(dpu: Option<&Name>) -> String {
    match dpu {
        Some(d) => format!("{}{d}/", keys::STATUS),
        None => keys::STATUS.to_owned(),
    }
}

impl Store {
    /// Records where objects landed on a DPU, in one transaction. With `lease`, the entries
    /// vanish when the DPU's lease expires.
    pub async fn put_status(
        &self,
        dpu: &Name,
        entries: &[(ObjectKey, OffloadStatus)],
        lease: Option<i64>,
    ) -> Result<i64, StoreError> {
        let mut ops = Vec::with_capacity(entries.len());
        for (object, status) in entries {
            let key = keys::status_key(dpu, object);
            let json = serde_json::to_vec(status).map_err(|source| StoreError::Corrupt {
                key: key.clone(),
                source,
            })?;
            let opts = lease.map(|l| PutOptions::new().with_lease(l));
            ops.push(TxnOp::put(key, json, opts));
        }
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded("status write", kv.txn(Txn::new().and_then(ops)))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Removes the status of objects on a DPU (they were deleted).
    pub async fn clear_status(&self, dpu: &Name, objects: &[ObjectKey]) -> Result<i64, StoreError> {
        let ops: Vec<TxnOp> = objects
            .iter()
            .map(|o| TxnOp::delete(keys::status_key(dpu, o), None))
            .collect();
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded("status write", kv.txn(Txn::new().and_then(ops)))
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
    }

    /// Every status entry (of one DPU, or all), with the revision read at.
    pub async fn status(&self, dpu: Option<&Name>) -> Result<(Vec<StatusEntry>, i64), StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded(
                "status read",
                kv.get(status_prefix(dpu), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some((dpu, object)) = keys::parse_status_key(&key) else {
                continue;
            };
            let status = serde_json::from_slice(kv.value())
                .map_err(|source| StoreError::Corrupt { key, source })?;
            out.push(StatusEntry {
                dpu,
                object,
                status,
            });
        }
        Ok((out, revision))
    }

    /// Follows status changes after `from_revision`.
    pub async fn watch_status(
        &self,
        dpu: Option<&Name>,
        from_revision: i64,
    ) -> Result<StatusWatch, StoreError> {
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from_revision + 1);
        let mut wc = self.client.watch_client();
        let mut stream = self
            .bounded("status watch", wc.watch(status_prefix(dpu), Some(opts)))
            .await?;
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                let resp = match msg {
                    Ok(Some(r)) if !r.canceled() => r,
                    Ok(Some(_)) | Ok(None) => {
                        let e = etcd_client::Error::WatchError("status watch canceled".into());
                        let _ = tx
                            .send(Err(StoreError::unavailable(
                                "status watch",
                                EtcdFailure::Client(e),
                            )))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(StoreError::unavailable("status watch", e)))
                            .await;
                        return;
                    }
                };
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let Some((dpu, object)) = keys::parse_status_key(&key) else {
                        continue;
                    };
                    let revision = kv.mod_revision();
                    let change = match ev.event_type() {
                        EventType::Delete => Ok(StatusChange::Removed {
                            dpu,
                            object,
                            revision,
                        }),
                        EventType::Put => match serde_json::from_slice(kv.value()) {
                            Ok(status) => Ok(StatusChange::Set {
                                entry: StatusEntry {
                                    dpu,
                                    object,
                                    status,
                                },
                                revision,
                            }),
                            Err(source) => Err(StoreError::Corrupt { key, source }),
                        },
                    };
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(StatusWatch { rx, task })
    }
}
