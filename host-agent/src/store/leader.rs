//! The leader key of an A/B pair (`/dpucp/v1/pairs/GROUP/leader`): which member is active.
//!
//! The key holds the member's name and is bound to a lease. It is created only if absent (one
//! transaction comparing its create revision with 0), so of two members campaigning at once
//! exactly one wins. Its create revision is the pair's **epoch**: etcd revisions only grow, so
//! every new active has a larger epoch than every earlier one, and the DPUs put it on every
//! sync message and role change.
//!
//! A member whose lease still holds the key after a restart of its host agent adopts that
//! lease instead of waiting for it to expire: the active stays active across a host agent
//! restart, and no failover happens.

use etcd_client::{
    Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use flow_offload::model::Name;

use super::{keys, EtcdFailure, Store, StoreError};

/// The outcome of one campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Campaign {
    /// This member holds the key under `lease`.
    Won {
        /// The lease to keep alive.
        lease: i64,
        /// The key's create revision.
        epoch: u64,
        /// The lease was already this member's (adopted after a host agent restart).
        adopted: bool,
    },
    /// Another member holds it.
    Held {
        /// Its name.
        holder: String,
        /// The key's create revision (the current epoch).
        epoch: u64,
        /// The store revision of the read, to watch from.
        revision: i64,
    },
}

/// What a keep-alive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The lease lives; its TTL restarted when etcd received the request.
    Alive,
    /// The lease is gone (expired or revoked): the key is gone with it.
    Gone,
}

fn epoch_of(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

impl Store {
    /// Campaigns for `group`'s leader key as `member`, with a new lease of `ttl` seconds if
    /// the key is free.
    pub async fn campaign(
        &self,
        group: &Name,
        member: &str,
        ttl: i64,
    ) -> Result<Campaign, StoreError> {
        let key = keys::pair_leader_key(group);
        let mut kv = self.client.kv_client();
        // Adopt our own lease first (a restarted host agent finds its member still active).
        let got = self
            .bounded("leader read", kv.get(key.as_str(), None))
            .await?;
        if let Some(cur) = got.kvs().first() {
            let holder = String::from_utf8_lossy(cur.value()).into_owned();
            let revision = got.header().map_or(0, |h| h.revision());
            if holder == member && cur.lease() != 0 {
                return Ok(Campaign::Won {
                    lease: cur.lease(),
                    epoch: epoch_of(cur.create_revision()),
                    adopted: true,
                });
            }
            return Ok(Campaign::Held {
                holder,
                epoch: epoch_of(cur.create_revision()),
                revision,
            });
        }
        let mut lc = self.client.lease_client();
        let lease = self
            .bounded("leader lease grant", lc.grant(ttl.max(1), None))
            .await?
            .id();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                member,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let resp = match self.bounded("leader campaign", kv.txn(txn)).await {
            Ok(r) => r,
            Err(e) => {
                let _ = self.bounded("lease revoke", lc.revoke(lease)).await;
                return Err(e);
            }
        };
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            // The put created the key at this revision.
            return Ok(Campaign::Won {
                lease,
                epoch: epoch_of(revision),
                adopted: false,
            });
        }
        let _ = self.bounded("lease revoke", lc.revoke(lease)).await;
        for r in resp.op_responses() {
            if let TxnOpResponse::Get(g) = r {
                if let Some(cur) = g.kvs().first() {
                    return Ok(Campaign::Held {
                        holder: String::from_utf8_lossy(cur.value()).into_owned(),
                        epoch: epoch_of(cur.create_revision()),
                        revision,
                    });
                }
            }
        }
        // Deleted between the compare and the get: the caller campaigns again.
        Ok(Campaign::Held {
            holder: String::new(),
            epoch: 0,
            revision,
        })
    }

    /// Who holds `group`'s leader key now, and its epoch.
    pub async fn leader(&self, group: &Name) -> Result<Option<(String, u64)>, StoreError> {
        let key = keys::pair_leader_key(group);
        let mut kv = self.client.kv_client();
        let got = self
            .bounded("leader read", kv.get(key.as_str(), None))
            .await?;
        Ok(got.kvs().first().map(|kv| {
            (
                String::from_utf8_lossy(kv.value()).into_owned(),
                epoch_of(kv.create_revision()),
            )
        }))
    }

    /// One keep-alive of `lease`. (The client sends one request and reads its answer; a TTL of
    /// 0 in it comes back as an error saying the lease is not found.)
    pub async fn renew(&self, lease: i64) -> Result<Renewal, StoreError> {
        let mut lc = self.client.lease_client();
        match tokio::time::timeout(self.timeout, lc.keep_alive(lease)).await {
            Ok(Ok(_)) => Ok(Renewal::Alive),
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                Ok(Renewal::Gone)
            }
            Ok(Err(e)) => Err(StoreError::unavailable("lease keep-alive", e)),
            Err(_) => Err(StoreError::unavailable(
                "lease keep-alive",
                EtcdFailure::Timeout(self.timeout),
            )),
        }
    }

    /// Gives the key up now (revokes its lease): the other member can take it at once.
    pub async fn resign(&self, lease: i64) -> Result<(), StoreError> {
        let mut lc = self.client.lease_client();
        self.bounded("lease revoke", lc.revoke(lease)).await?;
        Ok(())
    }

    /// Returns once `group`'s leader key is deleted (its holder's lease ended) after
    /// `revision`, or with an error when the watch fails (the caller campaigns again).
    pub async fn leader_gone(&self, group: &Name, revision: i64) -> Result<(), StoreError> {
        let key = keys::pair_leader_key(group);
        let mut wc = self.client.watch_client();
        let opts = WatchOptions::new().with_start_revision(revision.saturating_add(1));
        let mut stream = self
            .bounded("leader watch", wc.watch(key.as_str(), Some(opts)))
            .await?;
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() {
                        return Err(StoreError::unavailable(
                            "leader watch",
                            EtcdFailure::Canceled,
                        ));
                    }
                    if resp
                        .events()
                        .iter()
                        .any(|e| e.event_type() == EventType::Delete)
                    {
                        return Ok(());
                    }
                }
                Ok(None) => {
                    return Err(StoreError::unavailable(
                        "leader watch",
                        EtcdFailure::Canceled,
                    ))
                }
                Err(e) => return Err(StoreError::unavailable("leader watch", e)),
            }
        }
    }
}
