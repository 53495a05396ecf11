//! DPU records and liveness. The record (`/dpucp/v1/dpus/ID`) persists so an expired DPU is
//! shown as dead rather than forgotten; liveness is a separate key (`/dpucp/v1/alive/ID`)
//! bound to a lease the host agent keeps alive while the DPU's link is up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use flow_offload::caps::CapsSource;
use flow_offload::model::{Name, PortId};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{keys, Store, StoreError};

/// A port of a DPU and what its NIC accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCaps {
    /// The port.
    pub port: PortId,
    /// The capability profile (named or probed).
    pub caps: CapsSource,
}

/// What the host agent knows of a DPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpuRecord {
    /// Its identity.
    pub id: Name,
    /// The DPU agent's version.
    pub agent_version: String,
    /// Its ports.
    pub ports: Vec<PortCaps>,
}

/// A DPU record with its liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpuInfo {
    /// The record.
    pub record: DpuRecord,
    /// Whether its lease is alive.
    pub alive: bool,
}

/// A registered DPU's lease, kept alive by a task until [`DpuLease::stop`], drop, or
/// [`DpuLease::revoke`].
#[derive(Debug)]
pub struct DpuLease {
    id: Name,
    lease: i64,
    expired: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl DpuLease {
    /// The etcd lease id (status entries may be bound to it).
    pub fn lease_id(&self) -> i64 {
        self.lease
    }

    /// The DPU.
    pub fn dpu(&self) -> &Name {
        &self.id
    }

    /// Whether etcd reported the lease gone (e.g. etcd was unreachable for longer than the TTL):
    /// keep-alives cannot revive it; register again for a new lease.
    pub fn is_expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    /// Stops the keep-alives: the lease expires after its TTL and the DPU reads as dead.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Ends the lease now: the DPU reads as dead at once.
    pub async fn revoke(self, store: &Store) -> Result<(), StoreError> {
        self.task.abort();
        let mut lc = store.client.lease_client();
        store.bounded("lease revoke", lc.revoke(self.lease)).await?;
        Ok(())
    }
}

impl Drop for DpuLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Store {
    /// Records a DPU and marks it alive under a lease of `ttl` (seconds, ≥ 1) that a task keeps
    /// alive every `ttl / 3`.
    pub async fn register_dpu(&self, record: &DpuRecord, ttl: i64) -> Result<DpuLease, StoreError> {
        let ttl = ttl.max(1);
        let mut lc = self.client.lease_client();
        let lease = self.bounded("lease grant", lc.grant(ttl, None)).await?.id();
        let json = serde_json::to_vec(record).map_err(|source| StoreError::Corrupt {
            key: keys::dpu_key(&record.id),
            source,
        })?;
        let ops = vec![
            TxnOp::put(keys::dpu_key(&record.id), json, None),
            TxnOp::put(
                keys::alive_key(&record.id),
                "{}",
                Some(PutOptions::new().with_lease(lease)),
            ),
        ];
        let mut kv = self.client.kv_client();
        self.bounded("dpu register", kv.txn(Txn::new().and_then(ops)))
            .await?;
        let store = self.clone();
        let expired = Arc::new(AtomicBool::new(false));
        let flag = expired.clone();
        let period = Duration::from_millis(u64::try_from(ttl).unwrap_or(1) * 1000 / 3);
        let task = tokio::spawn(async move {
            let mut lc = store.client.lease_client();
            loop {
                // A fresh keep-alive stream each round keeps this robust across reconnects.
                // One renewal per round on a fresh stream: robust across reconnects.
                match tokio::time::timeout(store.timeout, lc.keep_alive(lease)).await {
                    Ok(Ok(_)) => {}
                    other => {
                        // The client reports a vanished lease as an error: ask etcd which.
                        let ttl = tokio::time::timeout(store.timeout, lc.time_to_live(lease, None))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .map(|r| r.ttl());
                        if ttl.is_some_and(|t| t <= 0) {
                            tracing::warn!(lease, "DPU lease expired: re-register the DPU");
                            flag.store(true, Ordering::Relaxed);
                            return;
                        }
                        tracing::warn!(lease, ?other, "DPU lease keep-alive failed");
                    }
                }
                tokio::time::sleep(period).await;
            }
        });
        Ok(DpuLease {
            id: record.id.clone(),
            lease,
            expired,
            task,
        })
    }

    /// Every known DPU with its liveness.
    pub async fn dpus(&self) -> Result<Vec<DpuInfo>, StoreError> {
        let ops = vec![
            TxnOp::get(keys::DPUS, Some(GetOptions::new().with_prefix())),
            TxnOp::get(
                keys::ALIVE,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        ];
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded("dpu read", kv.txn(Txn::new().and_then(ops)))
            .await?;
        let mut records = Vec::new();
        let mut alive = Vec::new();
        for (i, r) in resp.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(get) = r else { continue };
            for kv in get.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if i == 0 {
                    let rec: DpuRecord = serde_json::from_slice(kv.value())
                        .map_err(|source| StoreError::Corrupt { key, source })?;
                    records.push(rec);
                } else if let Some(id) = key.strip_prefix(keys::ALIVE) {
                    alive.push(id.to_owned());
                }
            }
        }
        Ok(records
            .into_iter()
            .map(|record| DpuInfo {
                alive: alive.iter().any(|a| a == record.id.as_str()),
                record,
            })
            .collect())
    }
}
