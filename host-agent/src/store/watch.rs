//! Following the desired state: etcd watch from a revision, full resync on compaction or
//! reconnect.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use flow_offload::model::{Change, Model, ObjectKey};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::Stream;

use super::{diff, keys, objects_of, Object, Store, StoreError};

/// Changes of the desired state at one etcd revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelUpdate {
    /// The etcd revision after these changes.
    pub revision: i64,
    /// The changes, in an order [`Model::apply`] accepts for the writes the API makes.
    pub changes: Vec<Change>,
    /// True when this is the diff of a full reload (after compaction or a reconnect) rather
    /// than a watched event: the consumer's model is brought to the state at `revision`.
    pub resync: bool,
}

/// A stream of [`ModelUpdate`]s. Errors are reported (e.g. a stored state that does not
/// validate) and the watch keeps trying; dropping the stream stops its task.
#[derive(Debug)]
pub struct ModelWatch {
    rx: mpsc::Receiver<Result<ModelUpdate, StoreError>>,
    task: JoinHandle<()>,
}

impl Drop for ModelWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ModelWatch {
    /// The next update (`None` only if the task ended).
    pub async fn next(&mut self) -> Option<Result<ModelUpdate, StoreError>> {
        self.rx.recv().await
    }
}

impl Stream for ModelWatch {
    type Item = Result<ModelUpdate, StoreError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

type Tx = mpsc::Sender<Result<ModelUpdate, StoreError>>;

/// Why a watch stream stopped.
enum Stopped {
    /// The start revision was compacted away.
    Compacted,
    /// The stream failed or ended (etcd down, connection lost).
    Lost,
    /// Nobody listens any more.
    Closed,
}

pub(super) fn spawn(store: Store, base: &Model, from_revision: i64) -> ModelWatch {
    let (tx, rx) = mpsc::channel(64);
    let state = objects_of(base);
    let task = tokio::spawn(run(store, state, from_revision, tx));
    ModelWatch { rx, task }
}

async fn run(store: Store, mut state: BTreeMap<ObjectKey, Object>, mut rev: i64, tx: Tx) {
    loop {
        match follow(&store, &mut state, &mut rev, &tx).await {
            Stopped::Closed => return,
            Stopped::Compacted => tracing::info!(rev, "watch revision compacted: resyncing"),
            Stopped::Lost => tracing::warn!(rev, "etcd watch lost: resyncing when reachable"),
        }
        // Full resync: reload until etcd answers (bounded back-off), diff by set difference.
        let mut backoff = Duration::from_millis(100);
        loop {
            match store.snapshot().await {
                Ok(snap) => {
                    let new: BTreeMap<ObjectKey, Object> =
                        snap.objects.into_iter().map(|(k, (o, _))| (k, o)).collect();
                    let changes = diff(&state, &new);
                    state = new;
                    rev = snap.revision;
                    let update = ModelUpdate {
                        revision: rev,
                        changes,
                        resync: true,
                    };
                    if tx.send(Ok(update)).await.is_err() {
                        return;
                    }
                    break;
                }
                Err(e) => {
                    let unavailable = matches!(e, StoreError::Unavailable { .. });
                    // Unavailability is the normal state of an outage; anything else is news.
                    if !unavailable && tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

async fn follow(
    store: &Store,
    state: &mut BTreeMap<ObjectKey, Object>,
    rev: &mut i64,
    tx: &Tx,
) -> Stopped {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*rev + 1);
    let mut wc = store.client.watch_client();
    let stream = tokio::time::timeout(store.timeout, wc.watch(keys::PREFIX, Some(opts))).await;
    let Ok(Ok(mut stream)) = stream else {
        return Stopped::Lost;
    };
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            () = tx.closed() => return Stopped::Closed,
        };
        let resp = match msg {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return Stopped::Lost,
        };
        if resp.canceled() {
            return if resp.compact_revision() > 0 {
                Stopped::Compacted
            } else {
                Stopped::Lost
            };
        }
        // One response may carry several revisions: one update per revision.
        let mut pending: Option<ModelUpdate> = None;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key());
            let Some(okey) = keys::parse_object_key(&key) else {
                continue;
            };
            let change = match ev.event_type() {
                EventType::Put => match Object::from_json(&okey, kv.value()) {
                    Ok(o) => {
                        let c = o.upsert();
                        state.insert(okey, o);
                        Some(c)
                    }
                    Err(source) => {
                        let err = StoreError::Corrupt {
                            key: key.into_owned(),
                            source,
                        };
                        if tx.send(Err(err)).await.is_err() {
                            return Stopped::Closed;
                        }
                        None
                    }
                },
                EventType::Delete => {
                    state.remove(&okey);
                    Object::delete(&okey)
                }
            };
            let r = kv.mod_revision();
            if pending.as_ref().is_some_and(|p| p.revision != r) {
                if let Some(p) = pending.take() {
                    if tx.send(Ok(p)).await.is_err() {
                        return Stopped::Closed;
                    }
                }
            }
            let p = pending.get_or_insert_with(|| ModelUpdate {
                revision: r,
                changes: Vec::new(),
                resync: false,
            });
            p.changes.extend(change);
            *rev = (*rev).max(r);
        }
        if let Some(p) = pending {
            if tx.send(Ok(p)).await.is_err() {
                return Stopped::Closed;
            }
        }
    }
}
