//! Rebalancing shared GPUs by measured load (issue 21: the balancer starts
//! migrations to drain a server and to rebalance). Shared leases of a whole
//! GPU that its server reports busy ([`REBALANCE_HOT`] or more) move, one at
//! a time, to a GPU of another server that is reported idle enough
//! ([`REBALANCE_COLD`] or less) and that they may join (room for their
//! percent and memory, tenants that may share their fate), or to a free
//! whole GPU; their sessions migrate as in a drain (`HeartbeatReply.
//! migrations`). A GPU that gave or took a lease waits [`COOLDOWN_MS`]
//! before it takes part again, so that its next busy reports show the move
//! before the next one is decided (no ping-pong).

use super::{LeaseClass, LeaseId, Move, Need, Pool};

/// Busy share (thousandths) from which a shared GPU gives a lease away.
pub const REBALANCE_HOT: u32 = 850;
/// Busy share (thousandths) up to which a GPU takes one.
pub const REBALANCE_COLD: u32 = 500;
/// Time a GPU sits out after a move, in milliseconds.
pub const COOLDOWN_MS: u64 = 60_000;

impl Pool {
    /// Moves up to `max_moves` shared leases off busy GPUs (see the module
    /// documentation); their sessions are ordered to migrate at their
    /// servers' next heartbeats ([`Pool::take_orders`]). Returns the leases
    /// moved.
    pub fn rebalance(&mut self, max_moves: usize, now_ms: u64) -> Vec<LeaseId> {
        self.advance(now_ms);
        if self.recovery_end.is_some() {
            return Vec::new();
        }
        self.cooldown.retain(|_, until| *until > now_ms);
        let busy_of = |pool: &Self, k: u32| {
            let inst = pool.instances.get(k);
            pool.servers.get(inst.server).gpu_busy.get(&inst.uuid).copied().unwrap_or(0)
        };
        // Hot shared GPUs, hottest first.
        let mut hot: Vec<(u32, u32)> = self
            .shared_hosts
            .iter()
            .copied()
            .filter(|k| !self.cooldown.contains_key(k))
            .filter(|&k| !self.servers.get(self.instances.get(k).server).draining)
            .filter(|&k| self.instances.get(k).shared.len() >= 2)
            .map(|k| (busy_of(self, k), k))
            .filter(|&(busy, _)| busy >= REBALANCE_HOT)
            .collect();
        hot.sort_by_key(|&(busy, k)| (std::cmp::Reverse(busy), k));
        let mut moved = Vec::new();
        for (_, from) in hot {
            if moved.len() >= max_moves {
                break;
            }
            // Its largest share that has somewhere to go.
            let mut leases: Vec<LeaseId> =
                self.instances.get(from).shared.iter().copied().filter(|id| !self.moves.contains_key(id)).collect();
            leases.sort_by_key(|id| (std::cmp::Reverse(self.leases[id].lease.compute_percent), *id));
            for id in leases {
                let Some(to) = self.cold_place(id, from, &busy_of) else { continue };
                let entry = &self.leases[&id];
                let from_server = self.servers.get(entry.server).spec.id.clone();
                let record = Move {
                    from_server: from_server.clone(),
                    from_instance: entry.lease.instance_uuid.clone(),
                    done: false,
                };
                self.move_lease(id, to);
                self.moves.insert(id, record);
                self.orders.entry(from_server).or_default().push(id);
                self.counters.rebalanced += 1;
                let until = now_ms.saturating_add(COOLDOWN_MS);
                self.cooldown.insert(from, until);
                self.cooldown.insert(to, until);
                moved.push(id);
                break;
            }
        }
        moved
    }

    /// Where shared lease `id` (now on instance `from`) may go: a cold GPU
    /// of another server it may join, else a free whole GPU there.
    fn cold_place(&self, id: LeaseId, from: u32, busy_of: &dyn Fn(&Self, u32) -> u32) -> Option<u32> {
        let lease = &self.leases[&id].lease;
        let need =
            Need { memory: lease.memory, percent: lease.compute_percent, profile: None, class: LeaseClass::Shared };
        let from_server = self.instances.get(from).server;
        let elsewhere = |k: u32| {
            self.instances.get(k).server != from_server
                && !self.cooldown.contains_key(&k)
                && busy_of(self, k) <= REBALANCE_COLD
        };
        let joined = self
            .shared_order
            .iter()
            .map(|&(.., k)| k)
            .find(|&k| elsewhere(k) && self.may_join(k, &need, &lease.tenant, false));
        joined.or_else(|| self.best_free(&need).filter(|&k| elsewhere(k)))
    }
}
