//! Desired state, offload status and DPU liveness in etcd.
//!
//! The store is CP: a write is validated against the current desired model with
//! [`Model::apply`] (bad input changes nothing), then committed in one etcd transaction that
//! compares the mod revision of every key it touches (no lost updates, nothing half-written).
//! When etcd is unreachable every call fails within [`StoreConfig::timeout`] with
//! [`StoreError::Unavailable`]; the last model read stays available through
//! [`Store::last_model`] so forwarding continues on it.
//!
//! The key layout is documented in [`keys`].

pub mod dpu;
pub mod keys;
pub mod leader;
pub mod status;
pub mod watch;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse,
};
use flow_offload::model::{Change, Meter, Model, ModelError, NatRule, Node, ObjectKey, Route, Vpc};
use serde::{Deserialize, Serialize};

pub use dpu::{DpuInfo, DpuLease, DpuRecord, PortCaps};
pub use status::{StatusChange, StatusEntry, StatusWatch};
pub use watch::{ModelUpdate, ModelWatch};

/// How many times [`Store::write`] re-reads and re-validates when another writer committed
/// between its read and its transaction.
const MAX_ATTEMPTS: usize = 8;

/// Why etcd did not answer.
#[derive(Debug, thiserror::Error)]
pub enum EtcdFailure {
    /// No answer within the bound.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The client reported an error.
    #[error(transparent)]
    Client(#[from] etcd_client::Error),
    /// A watch stream ended or was canceled by etcd.
    #[error("watch canceled")]
    Canceled,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The change is invalid against the current desired state (nothing was written).
    #[error("{0}")]
    Invalid(#[from] ModelError),
    /// The object changed since the revision the caller expected (nothing was written).
    #[error("conflict: {key} was modified concurrently (re-read and retry)")]
    Conflict {
        /// The etcd key.
        key: String,
    },
    /// The caller asked to create an object that exists.
    #[error("{object} already exists")]
    AlreadyExists {
        /// The object.
        object: ObjectKey,
    },
    /// No such object.
    #[error("{object}: not found")]
    NotFound {
        /// The object.
        object: ObjectKey,
    },
    /// etcd is unreachable or failing.
    #[error("etcd unavailable during {op}: {source}")]
    Unavailable {
        /// What the store was doing.
        op: &'static str,
        /// Why.
        #[source]
        source: EtcdFailure,
    },
    /// etcd answered but refused the request (not an availability problem).
    #[error("etcd refused {op}: {source}")]
    Rejected {
        /// What the store was doing.
        op: &'static str,
        /// etcd's answer.
        #[source]
        source: etcd_client::Error,
    },
    /// More objects in one batch than one etcd transaction may touch.
    #[error("batch touches {objects} objects; at most {max} fit one etcd transaction")]
    BatchTooLarge {
        /// Objects touched.
        objects: usize,
        /// The limit (etcd's `--max-txn-ops` minus one for the generation key).
        max: usize,
    },
    /// Other writers kept committing; the write was retried and given up.
    #[error("gave up after {attempts} attempts: other writers kept committing")]
    Contended {
        /// Attempts made.
        attempts: usize,
    },
    /// A stored value is not the JSON its key says it is.
    #[error("corrupt value at {key}: {source}")]
    Corrupt {
        /// The etcd key.
        key: String,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored objects do not form a valid model (edited behind the API's back).
    #[error("stored desired state is inconsistent: {0}")]
    Inconsistent(ModelError),
}

impl StoreError {
    fn unavailable(op: &'static str, e: impl Into<EtcdFailure>) -> StoreError {
        StoreError::Unavailable {
            op,
            source: e.into(),
        }
    }
}

/// Where etcd is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// etcd endpoints, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Bound on every request (and on connecting).
    pub timeout: Duration,
    /// etcd's `--max-txn-ops` (128 unless the server was started otherwise).
    pub max_txn_ops: usize,
}

impl StoreConfig {
    /// One endpoint with the default 2 s bound.
    pub fn new(endpoint: impl Into<String>) -> StoreConfig {
        StoreConfig {
            endpoints: vec![endpoint.into()],
            timeout: Duration::from_secs(2),
            max_txn_ops: 128,
        }
    }
}

/// One desired-state object, as stored (the JSON value is the inner type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Object {
    /// The node settings.
    Node(Node),
    /// A VPC.
    Vpc(Vpc),
    /// A route.
    Route(Route),
    /// A NAT rule.
    Nat(NatRule),
    /// A meter.
    Meter(Meter),
}

impl Object {
    /// Its identity.
    pub fn key(&self) -> ObjectKey {
        self.upsert().object()
    }

    /// The change that creates or replaces it.
    pub fn upsert(&self) -> Change {
        match self {
            Object::Node(n) => Change::SetNode(n.clone()),
            Object::Vpc(v) => Change::UpsertVpc(v.clone()),
            Object::Route(r) => Change::UpsertRoute(r.clone()),
            Object::Nat(n) => Change::UpsertNat(n.clone()),
            Object::Meter(m) => Change::UpsertMeter(m.clone()),
        }
    }

    /// The change that deletes it (`None` for the node, which is only ever replaced).
    pub fn delete(key: &ObjectKey) -> Option<Change> {
        Some(match key {
            ObjectKey::Node => return None,
            ObjectKey::Vpc(n) => Change::DeleteVpc(n.clone()),
            ObjectKey::Route(k) => Change::DeleteRoute(*k),
            ObjectKey::Nat(n) => Change::DeleteNat(n.clone()),
            ObjectKey::Meter(n) => Change::DeleteMeter(n.clone()),
        })
    }

    /// The object of `key` in a model.
    pub fn from_model(model: &Model, key: &ObjectKey) -> Option<Object> {
        match key {
            ObjectKey::Node => model.node().cloned().map(Object::Node),
            ObjectKey::Vpc(n) => model.vpcs().get(n).cloned().map(Object::Vpc),
            ObjectKey::Route(k) => model.routes().get(k).cloned().map(Object::Route),
            ObjectKey::Nat(n) => model.nat_rules().get(n).cloned().map(Object::Nat),
            ObjectKey::Meter(n) => model.meters().get(n).cloned().map(Object::Meter),
        }
    }

    /// The JSON stored in etcd.
    pub fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            Object::Node(x) => serde_json::to_vec(x),
            Object::Vpc(x) => serde_json::to_vec(x),
            Object::Route(x) => serde_json::to_vec(x),
            Object::Nat(x) => serde_json::to_vec(x),
            Object::Meter(x) => serde_json::to_vec(x),
        }
    }

    /// Decodes the JSON stored under `key`; the decoded object must be the one the key names.
    pub fn from_json(key: &ObjectKey, value: &[u8]) -> Result<Object, serde_json::Error> {
        let o = match key {
            ObjectKey::Node => Object::Node(serde_json::from_slice(value)?),
            ObjectKey::Vpc(_) => Object::Vpc(serde_json::from_slice(value)?),
            ObjectKey::Route(_) => Object::Route(serde_json::from_slice(value)?),
            ObjectKey::Nat(_) => Object::Nat(serde_json::from_slice(value)?),
            ObjectKey::Meter(_) => Object::Meter(serde_json::from_slice(value)?),
        };
        if &o.key() != key {
            return Err(serde::de::Error::custom(format!(
                "value describes {}, key names {key}",
                o.key()
            )));
        }
        Ok(o)
    }
}

/// The desired state at one etcd revision, with each object's mod revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The validated model.
    pub model: Model,
    /// The etcd revision it was read at.
    pub revision: i64,
    /// Every object with its mod revision.
    pub objects: BTreeMap<ObjectKey, (Object, i64)>,
    /// The mod revision of [`keys::GENERATION`] (0 if never written).
    pub generation: i64,
}

impl Snapshot {
    /// The mod revision of an object, if it exists.
    pub fn revision_of(&self, key: &ObjectKey) -> Option<i64> {
        self.objects.get(key).map(|(_, r)| *r)
    }
}

/// What a write expects of the object it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: last validated writer wins.
    Any,
    /// The object must not exist (create).
    Absent,
    /// The object must exist with this mod revision (update/delete after a read).
    Revision(i64),
}

/// A change with its precondition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guarded {
    /// The change.
    pub change: Change,
    /// Its precondition.
    pub expect: Expect,
}

impl Guarded {
    /// A change without precondition.
    pub fn any(change: Change) -> Guarded {
        Guarded {
            change,
            expect: Expect::Any,
        }
    }

    /// A create: the object must not exist yet.
    pub fn create(change: Change) -> Guarded {
        Guarded {
            change,
            expect: Expect::Absent,
        }
    }

    /// An update or delete of the object as read at `revision`.
    pub fn at(change: Change, revision: i64) -> Guarded {
        Guarded {
            change,
            expect: Expect::Revision(revision),
        }
    }
}

/// The desired-state store over etcd. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    client: Client,
    timeout: Duration,
    max_txn_ops: usize,
    last: Arc<RwLock<Option<Snapshot>>>,
}

impl core::fmt::Debug for Store {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects lazily: this succeeds while etcd is down (the daemon must come up and keep
    /// forwarding); requests then fail with [`StoreError::Unavailable`] until it is back.
    pub async fn connect(cfg: &StoreConfig) -> Result<Store, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(cfg.timeout)
            // HTTP/2 pings notice a dead etcd under an idle watch stream.
            .with_keep_alive(Duration::from_secs(1), cfg.timeout)
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(cfg.timeout, Client::connect(&cfg.endpoints, Some(opts)))
            .await
            .map_err(|_| StoreError::unavailable("connect", EtcdFailure::Timeout(cfg.timeout)))?
            .map_err(|e| StoreError::unavailable("connect", e))?;
        Ok(Store {
            client,
            timeout: cfg.timeout,
            max_txn_ops: cfg.max_txn_ops,
            last: Arc::new(RwLock::new(None)),
        })
    }

    /// The request bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The underlying client (for tests and tools).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one etcd request under the bound.
    async fn bounded<T>(
        &self,
        op: &'static str,
        fut: impl core::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(StoreError::unavailable(
                op,
                EtcdFailure::Timeout(self.timeout),
            )),
            Ok(Err(e)) if refused(&e) => Err(StoreError::Rejected { op, source: e }),
            Ok(Err(e)) => Err(StoreError::unavailable(op, e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Reads the whole desired state at one revision and validates it.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let snap = self.read_snapshot().await?;
        self.remember(&snap);
        Ok(snap)
    }

    /// Reads every desired object (without touching the cache).
    async fn read_snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut ops: Vec<TxnOp> = keys::DESIRED
            .iter()
            .map(|p| TxnOp::get(*p, Some(GetOptions::new().with_prefix())))
            .collect();
        ops.push(TxnOp::get(keys::GENERATION, None));
        let mut kv = self.client.kv_client();
        let resp = self
            .bounded("read", kv.txn(Txn::new().and_then(ops)))
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut objects = BTreeMap::new();
        let mut generation = 0;
        for r in resp.op_responses() {
            let TxnOpResponse::Get(get) = r else { continue };
            for kv in get.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if key == keys::GENERATION {
                    generation = kv.mod_revision();
                    continue;
                }
                // Keys we do not understand (a newer schema, a typo via etcdctl) are skipped.
                let Some(okey) = keys::parse_object_key(&key) else {
                    tracing::warn!(%key, "ignoring unknown key under the desired-state prefix");
                    continue;
                };
                let obj = Object::from_json(&okey, kv.value())
                    .map_err(|source| StoreError::Corrupt { key, source })?;
                objects.insert(okey, (obj, kv.mod_revision()));
            }
        }
        let mut changes: Vec<Change> = objects.values().map(|(o, _)| o.upsert()).collect();
        changes.sort_by_key(|c| keys::rank(&c.object()));
        let mut model = Model::new();
        model.apply(&changes).map_err(StoreError::Inconsistent)?;
        Ok(Snapshot {
            model,
            revision,
            objects,
            generation,
        })
    }

    fn take_snapshot(&self) -> Option<Snapshot> {
        self.last.write().ok().and_then(|mut l| l.take())
    }

    fn put_snapshot(&self, snap: Snapshot) {
        if let Ok(mut last) = self.last.write() {
            if last.as_ref().is_none_or(|l| l.revision <= snap.revision) {
                *last = Some(snap);
            }
        }
    }

    fn remember(&self, snap: &Snapshot) {
        if let Ok(mut last) = self.last.write() {
            if last.as_ref().is_none_or(|l| l.revision <= snap.revision) {
                *last = Some(snap.clone());
            }
        }
    }

    /// The desired model and the revision it was read at.
    pub async fn load(&self) -> Result<(Model, i64), StoreError> {
        let s = self.snapshot().await?;
        Ok((s.model, s.revision))
    }

    /// The last model this store read or wrote, whether or not etcd is reachable now.
    pub fn last_model(&self) -> Option<(Model, i64)> {
        self.last
            .read()
            .ok()?
            .as_ref()
            .map(|s| (s.model.clone(), s.revision))
    }

    /// Reads one object with its mod revision.
    pub async fn get(&self, key: &ObjectKey) -> Result<(Object, i64), StoreError> {
        let k = keys::object_key(key);
        let mut kv = self.client.kv_client();
        let resp = self.bounded("read", kv.get(k.clone(), None)).await?;
        let Some(item) = resp.kvs().first() else {
            return Err(StoreError::NotFound {
                object: key.clone(),
            });
        };
        let obj = Object::from_json(key, item.value())
            .map_err(|source| StoreError::Corrupt { key: k, source })?;
        Ok((obj, item.mod_revision()))
    }

    /// Applies changes with no precondition (each validated against a fresh read).
    pub async fn apply(&self, changes: &[Change]) -> Result<i64, StoreError> {
        let batch: Vec<Guarded> = changes.iter().cloned().map(Guarded::any).collect();
        self.write(&batch).await
    }

    /// Writes a batch atomically: validated against the current desired state, then one etcd
    /// transaction that compares the mod revision of every touched key and of the generation
    /// key. Returns the revision of the write. If another writer committed in between, the
    /// batch is re-read and re-validated (bounded); a precondition that no longer holds is
    /// [`StoreError::Conflict`] / [`StoreError::AlreadyExists`] / [`StoreError::NotFound`].
    pub async fn write(&self, batch: &[Guarded]) -> Result<i64, StoreError> {
        // The first attempt validates against the last snapshot this store read or wrote, when
        // there is one: the transaction's generation compare fails if anyone wrote since, and
        // then a fresh read decides. A write thus costs O(what it touches), not a read of all
        // desired state.
        // The cached snapshot is taken out (not copied) and changed in place; it goes back
        // only when it again matches etcd. Concurrent writers find no cache and read.
        let mut cached = self.take_snapshot();
        for _ in 0..MAX_ATTEMPTS {
            let from_cache = cached.is_some();
            let mut snap = match cached.take() {
                Some(s) => s,
                None => self.read_snapshot().await?,
            };
            if batch.is_empty() {
                let r = snap.revision;
                self.put_snapshot(snap);
                return Ok(r);
            }
            if let Err(e) = check_expectations(&snap, batch) {
                if from_cache {
                    continue;
                }
                self.put_snapshot(snap);
                return Err(e);
            }
            let changes: Vec<Change> = batch.iter().map(|g| g.change.clone()).collect();
            // Ordering several effects needs the model before them; one needs none.
            let before = (changes.len() > 1).then(|| snap.model.clone());
            // Atomic: on error the model is unchanged.
            if let Err(e) = snap.model.apply(&changes) {
                if from_cache {
                    continue;
                }
                self.put_snapshot(snap);
                return Err(e.into());
            }
            let model = &snap.model;

            // The final effect per touched key, deletes first (dependents before what they
            // refer to), then upserts in dependency order: watchers see an applicable order.
            let mut touched: Vec<ObjectKey> = changes.iter().map(Change::object).collect();
            touched.sort();
            touched.dedup();
            // Each touched key is one compare and one operation, plus the generation key.
            let max = self.max_txn_ops.saturating_sub(1);
            if touched.len() > max {
                return Err(StoreError::BatchTooLarge {
                    objects: touched.len(),
                    max,
                });
            }
            let mut effects: Vec<(ObjectKey, Option<Object>)> = touched
                .iter()
                .map(|k| (k.clone(), Object::from_model(model, k)))
                .collect();
            effects.sort_by_key(|(k, o)| match o {
                None => (0u8, 4 - keys::rank(k)),
                Some(_) => (1, keys::rank(k)),
            });
            let effects = match &before {
                Some(b) => applicable_order(b, effects),
                None => effects,
            };

            let mut compares = vec![Compare::mod_revision(
                keys::GENERATION,
                CompareOp::Equal,
                snap.generation,
            )];
            let mut ops = Vec::with_capacity(effects.len() + 1);
            for (k, after) in &effects {
                let key = keys::object_key(k);
                compares.push(Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    snap.revision_of(k).unwrap_or(0),
                ));
                ops.push(match after {
                    Some(o) => {
                        let json = o.to_json().map_err(|source| StoreError::Corrupt {
                            key: key.clone(),
                            source,
                        })?;
                        TxnOp::put(key, json, None)
                    }
                    None => TxnOp::delete(key, None),
                });
            }
            ops.push(TxnOp::put(keys::GENERATION, "{}", None));
            let mut kv = self.client.kv_client();
            let resp = match self
                .bounded("write", kv.txn(Txn::new().when(compares).and_then(ops)))
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    // Nothing was written: the snapshot goes back as it was, so the last model
                    // stays known while etcd is away.
                    if restore(&mut snap, &touched) {
                        self.put_snapshot(snap);
                    }
                    return Err(e);
                }
            };
            if !resp.succeeded() {
                // Someone committed in between: re-read; the expectations decide.
                continue;
            }
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            for (k, after) in effects {
                match after {
                    Some(o) => snap.objects.insert(k, (o, revision)),
                    None => snap.objects.remove(&k),
                };
            }
            snap.revision = revision;
            snap.generation = revision;
            self.put_snapshot(snap);
            return Ok(revision);
        }
        Err(StoreError::Contended {
            attempts: MAX_ATTEMPTS,
        })
    }

    /// Follows the desired state from `from_revision` (exclusive) on, starting from `base`
    /// (normally what [`Store::load`] returned). See [`ModelWatch`].
    pub fn watch(&self, base: &Model, from_revision: i64) -> ModelWatch {
        watch::spawn(self.clone(), base, from_revision)
    }
}

/// Whether etcd answered with a refusal (as opposed to not answering usefully).
fn refused(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::GRpcStatus(s) => !matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ),
        _ => false,
    }
}

/// Undoes, in `snap.model`, a batch that touched `touched` (its objects are still those before
/// the batch). False if the model cannot be restored (then the snapshot must be dropped).
fn restore(snap: &mut Snapshot, touched: &[ObjectKey]) -> bool {
    let back: Vec<(ObjectKey, Option<Object>)> = touched
        .iter()
        .map(|k| (k.clone(), snap.objects.get(k).map(|(o, _)| o.clone())))
        .collect();
    let back = applicable_order(&snap.model, back);
    let mut changes = Vec::with_capacity(back.len());
    for (k, o) in &back {
        match (o, Object::delete(k)) {
            (Some(o), _) => changes.push(o.upsert()),
            (None, Some(d)) => changes.push(d),
            // Not deletable (the node): restorable only if it is not there.
            (None, None) if !snap.model.contains(k) => {}
            (None, None) => return false,
        }
    }
    snap.model.apply(&changes).is_ok()
}

fn check_expectations(snap: &Snapshot, batch: &[Guarded]) -> Result<(), StoreError> {
    for g in batch {
        let object = g.change.object();
        let current = snap.revision_of(&object);
        match (g.expect, current) {
            (Expect::Any, _) | (Expect::Absent, None) => {}
            (Expect::Absent, Some(_)) => return Err(StoreError::AlreadyExists { object }),
            (Expect::Revision(_), None) => return Err(StoreError::NotFound { object }),
            (Expect::Revision(r), Some(c)) if r != c => {
                return Err(StoreError::Conflict {
                    key: keys::object_key(&object),
                })
            }
            (Expect::Revision(_), Some(_)) => {}
        }
    }
    Ok(())
}

/// The objects of a model, for diffing.
pub fn objects_of(model: &Model) -> BTreeMap<ObjectKey, Object> {
    let mut out = BTreeMap::new();
    if let Some(n) = model.node() {
        out.insert(ObjectKey::Node, Object::Node(n.clone()));
    }
    for v in model.vpcs().values() {
        out.insert(ObjectKey::Vpc(v.name.clone()), Object::Vpc(v.clone()));
    }
    for r in model.routes().values() {
        out.insert(ObjectKey::Route(r.key), Object::Route(r.clone()));
    }
    for n in model.nat_rules().values() {
        out.insert(ObjectKey::Nat(n.name.clone()), Object::Nat(n.clone()));
    }
    for m in model.meters().values() {
        out.insert(ObjectKey::Meter(m.name.clone()), Object::Meter(m.clone()));
    }
    out
}

/// Reorders final effects so that applying them one by one to `base` succeeds at every step
/// (etcd delivers a transaction's events in operation order, and consumers apply them in that
/// order). Greedy: take the first effect that applies; `Model::apply` changes nothing on
/// failure, so no copies are needed. Effects that never apply keep their canonical order at the
/// end (only possible for states `base` cannot reach one change at a time).
fn applicable_order(
    base: &Model,
    effects: Vec<(ObjectKey, Option<Object>)>,
) -> Vec<(ObjectKey, Option<Object>)> {
    let change = |(k, o): &(ObjectKey, Option<Object>)| match o {
        Some(o) => Some(o.upsert()),
        None => Object::delete(k),
    };
    let mut cur = base.clone();
    let mut pending = effects;
    let mut out = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let next = pending
            .iter()
            .position(|e| change(e).is_none_or(|c| cur.apply(core::slice::from_ref(&c)).is_ok()));
        match next {
            Some(i) => out.push(pending.remove(i)),
            None => {
                out.append(&mut pending);
                break;
            }
        }
    }
    out
}

/// The changes that turn `old` into `new` (set difference), in an order [`Model::apply`]
/// accepts one change at a time: deletes of dependents first, then upserts in dependency
/// order, then reordered where a particular dependency needs it (see `applicable_order`).
pub fn diff(old: &BTreeMap<ObjectKey, Object>, new: &BTreeMap<ObjectKey, Object>) -> Vec<Change> {
    let mut deletes: Vec<&ObjectKey> = old.keys().filter(|k| !new.contains_key(*k)).collect();
    deletes.sort_by_key(|k| 4 - keys::rank(k));
    let mut upserts: Vec<&Object> = new
        .iter()
        .filter(|(k, o)| old.get(*k) != Some(*o))
        .map(|(_, o)| o)
        .collect();
    upserts.sort_by_key(|o| keys::rank(&o.key()));
    let effects: Vec<(ObjectKey, Option<Object>)> = deletes
        .into_iter()
        .map(|k| (k.clone(), None))
        .chain(upserts.into_iter().map(|o| (o.key(), Some(o.clone()))))
        .collect();
    let mut changes: Vec<Change> = old.values().map(Object::upsert).collect();
    changes.sort_by_key(|c| keys::rank(&c.object()));
    let mut base = Model::new();
    let effects = if base.apply(&changes).is_ok() {
        applicable_order(&base, effects)
    } else {
        effects
    };
    effects
        .into_iter()
        .filter_map(|(k, o)| match o {
            Some(o) => Some(o.upsert()),
            None => Object::delete(&k),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use flow_offload::model::{
        MeterProfile, MeterTarget, Name, Nexthop, Prefix, RouteKey, TableId, Vni,
    };

    fn vpc(n: &str, vni: u32, table: u32) -> Vpc {
        Vpc {
            name: Name::new(n).unwrap(),
            vni: Vni::new(vni).unwrap(),
            table: TableId(table),
            ports: Default::default(),
        }
    }

    fn route(table: u32, p: &str) -> Route {
        Route {
            key: RouteKey {
                table: TableId(table),
                prefix: p.parse::<Prefix>().unwrap(),
            },
            nexthops: vec![Nexthop::Blackhole],
        }
    }

    fn meter(target: MeterTarget) -> Meter {
        Meter {
            name: Name::new("m").unwrap(),
            profile: MeterProfile::SrTcm {
                cir: 1000,
                cbs: 2000,
                ebs: 2000,
            },
            target,
        }
    }

    /// Unit test on in-memory maps: a meter moved off a route that is deleted in the same
    /// step must be moved first, against the canonical deletes-first order.
    #[test]
    fn diff_orders_retarget_before_delete() {
        let r = route(10, "10.0.0.0/8");
        let mut m = Model::new();
        let old_changes = vec![
            Change::UpsertVpc(vpc("a", 100, 10)),
            Change::UpsertRoute(r.clone()),
            Change::UpsertMeter(meter(MeterTarget::Route(r.key))),
        ];
        m.apply(&old_changes).unwrap();
        let old = objects_of(&m);
        let mut want = m.clone();
        want.apply(&[
            Change::UpsertMeter(meter(MeterTarget::Vpc(Name::new("a").unwrap()))),
            Change::DeleteRoute(r.key),
        ])
        .unwrap();
        let new = objects_of(&want);
        let changes = diff(&old, &new);
        let mut got = m.clone();
        for c in &changes {
            got.apply(core::slice::from_ref(c)).unwrap();
        }
        assert_eq!(got, want);
    }

    #[test]
    fn diff_is_empty_for_equal_states() {
        let mut m = Model::new();
        m.apply(&[Change::UpsertVpc(vpc("a", 100, 10))]).unwrap();
        assert!(diff(&objects_of(&m), &objects_of(&m)).is_empty());
    }
}
