//! The commit: what [`Transaction::commit`] does with the staged entries, in the steps the
//! module documentation of [`super`] numbers (plan, one route commit, new lines, publish,
//! retire), and the transaction that stages them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Backing, BackingError, CachedRoute, RouteKey};
use crate::irte::Irte;
use crate::path::{Line, Policy, Published};
use crate::port::{Gsi, RoutingBackend};
use crate::remap::FaultReason;
use crate::routes::RouteError;

/// What a staged entry will be.
#[derive(Debug, Clone, Copy)]
pub(super) enum NewState {
    Absent,
    Faulty(FaultReason),
    Live { key: RouteKey, policy: Policy },
}

/// What the commit does for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Publish a non-live state.
    Unpublish,
    /// Keep the route (maybe rewritten in place); publish the new requester check.
    Keep,
    /// Move to the line of another route (existing or created by this commit).
    Join,
}

/// What step 1 decided.
#[derive(Debug)]
struct Plan {
    /// Each staged entry and its step.
    entries: Vec<Planned>,
    /// Routes to create.
    creates: Vec<RouteKey>,
    /// Routes rewritten in place: (GSI, old key, new key).
    rewrites: Vec<(Gsi, RouteKey, RouteKey)>,
    /// Routes (of retired lines) to remove.
    prune: Vec<RouteKey>,
}

#[derive(Debug)]
pub(super) struct Planned {
    pub(super) index: u32,
    raw: [u64; 2],
    pub(super) state: NewState,
    step: Step,
}

/// The routes a plan touches, as they will be after it: key -> the GSI of its cached
/// route with a line (`None`: no such route yet), and its users after the commit. Routes
/// the staged entries do not touch keep their users and are not in it.
#[derive(Debug, Default)]
struct Sim(HashMap<RouteKey, (Option<Gsi>, i64)>);

impl Sim {
    /// `key`'s simulated route, starting from the cache.
    fn touch<B: RoutingBackend>(
        &mut self,
        backing: &Backing<B>,
        key: RouteKey,
    ) -> &mut (Option<Gsi>, i64) {
        self.0.entry(key).or_insert_with(|| {
            backing
                .cache
                .get(&key)
                .filter(|r| r.line.is_some())
                .map_or((None, 0), |r| (Some(r.gsi), i64::from(r.users)))
        })
    }

    /// Managed routes with users after the plan: the touched ones as simulated, the
    /// others as cached (a walk of the cache, made only when the plan creates routes).
    fn managed_routes_after<B: RoutingBackend>(&self, backing: &Backing<B>) -> usize {
        let touched = self
            .0
            .iter()
            .filter(|(k, (_, n))| k.managed && *n > 0)
            .count();
        let untouched = backing
            .cache
            .iter()
            .filter(|(k, r)| {
                k.managed && r.line.is_some() && r.users > 0 && !self.0.contains_key(k)
            })
            .count();
        touched + untouched
    }
}

impl<B: RoutingBackend> Backing<B> {
    fn decide(&self, raw: [u64; 2], managed: bool) -> NewState {
        match Irte::decode(raw, self.limits.eim) {
            Err(_) => NewState::Faulty(FaultReason::EntryReserved),
            Ok(e) if !e.present => NewState::Absent,
            Ok(e) => NewState::Live {
                key: RouteKey {
                    msg: e.target.to_msi(),
                    managed,
                },
                policy: Policy {
                    validation: e.validation,
                    fpd: e.fault_processing_disable,
                },
            },
        }
    }

    /// Applies `staged` in the five steps of the commit protocol (module documentation of
    /// [`super`]); a failure in steps 1-3 leaves everything as it was.
    /// Bound eventfds (`bound`) move in step 3b: before the route commit when it creates
    /// no route (their targets exist, or are rewritten in place under them), else after
    /// the new lines.
    fn apply(&mut self, staged: BTreeMap<u32, [u64; 2]>) -> Result<(), BackingError> {
        let plan = self.plan(&staged)?;
        let early = plan.creates.is_empty();
        let moves = if early {
            self.move_bound(&plan.entries, &plan.rewrites)?
        } else {
            Vec::new()
        };
        let created = match self.route_commit(&plan) {
            Ok(created) => created,
            Err(e) => {
                self.undo_moves(&moves);
                return Err(e);
            }
        };
        self.new_lines(&created)?;
        if !early {
            if let Err(e) = self.move_bound(&plan.entries, &[]) {
                // The new lines have no users yet: they retire, their routes go with the
                // next commit.
                self.retire_idle_lines();
                return Err(e);
            }
        }
        let mut emptied = self.publish(plan.entries);
        emptied.extend(created.iter().map(|(key, _)| *key));
        emptied.extend(plan.rewrites.iter().map(|(_, _, key)| *key));
        self.retire_lines_without_users(&emptied);
        Ok(())
    }

    /// 1. Plan: decode each staged entry and decide its step against a simulation of the
    ///    routes the staged entries touch (key -> existing GSI, users after); then which
    ///    routes the commit creates, rewrites in place or prunes; check the live-entry
    ///    quota and the route budget. The simulation holds only the touched routes, so a
    ///    retarget costs the same however many routes the cache has.
    fn plan(&self, staged: &BTreeMap<u32, [u64; 2]>) -> Result<Plan, BackingError> {
        let mut sim = Sim::default();
        let mut entries = Vec::with_capacity(staged.len());
        let mut live_after = i64::from(self.live);
        for (&index, &raw) in staged {
            let Some(&entry) = self.entries.get(index as usize) else {
                return Err(BackingError::IndexOutOfRange(index));
            };
            let managed = entry.owner.is_some_and(|o| o.managed);
            let state = self.decide(raw, managed);
            let step = match (entry.live, state) {
                (_, NewState::Absent | NewState::Faulty(_)) => Step::Unpublish,
                (Some(old), NewState::Live { key, .. }) if old == key => Step::Keep,
                (_, NewState::Live { key, .. }) => {
                    sim.touch(self, key).1 += 1;
                    Step::Join
                }
            };
            if let Some(old) = entry.live {
                if step != Step::Keep {
                    // Only a route with a line has users to lose.
                    if self.cache.get(&old).is_some_and(|r| r.line.is_some()) {
                        sim.touch(self, old).1 -= 1;
                    }
                    live_after -= 1;
                }
            }
            if step == Step::Join {
                live_after += 1;
            }
            entries.push(Planned {
                index,
                raw,
                state,
                step,
            });
        }
        if live_after > i64::from(self.limits.max_live) {
            return Err(BackingError::VmQuota(self.limits.max_live));
        }
        self.plan_routes(entries, &sim)
    }

    /// The route side of the plan: new routes for targets without one, unless every new
    /// route would serve one entry leaving a route it was the only user of (then those
    /// routes are rewritten in place: no new route, nothing left to fail after the
    /// commit); routes whose lines earlier transactions retired are pruned.
    fn plan_routes(&self, entries: Vec<Planned>, sim: &Sim) -> Result<Plan, BackingError> {
        let new_keys: Vec<RouteKey> = sim
            .0
            .iter()
            .filter(|(_, (gsi, n))| gsi.is_none() && *n > 0)
            .map(|(k, _)| *k)
            .collect();
        let mut rewrites: Vec<(Gsi, RouteKey, RouteKey)> = Vec::new();
        if !new_keys.is_empty() {
            let mut seen = HashSet::new();
            for p in &entries {
                let (NewState::Live { key, .. }, Step::Join) = (p.state, p.step) else {
                    continue;
                };
                let Some(old) = self.entries.get(p.index as usize).and_then(|e| e.live) else {
                    continue;
                };
                let fresh = sim
                    .0
                    .get(&key)
                    .is_some_and(|(gsi, n)| gsi.is_none() && *n == 1);
                let emptied = sim
                    .0
                    .get(&old)
                    .and_then(|(gsi, n)| (*n == 0).then_some(*gsi))
                    .flatten();
                if let (true, Some(gsi)) = (fresh, emptied) {
                    if old.managed == key.managed && seen.insert(old) {
                        rewrites.push((gsi, old, key));
                    }
                }
            }
            if rewrites.len() != new_keys.len() {
                rewrites.clear();
            }
        }
        let creates: Vec<RouteKey> = if rewrites.is_empty() {
            new_keys
        } else {
            Vec::new()
        };
        let prune: Vec<RouteKey> = if self.maybe_retired {
            self.cache
                .iter()
                .filter(|(_, r)| r.line.is_none())
                .map(|(k, _)| *k)
                .collect()
        } else {
            Vec::new()
        };
        let new_unmanaged = creates.iter().filter(|k| !k.managed).count();
        if new_unmanaged > 0 {
            let after =
                self.routes.staged_msi_routes() + creates.len() - prune.len() - self.orphans.len();
            let managed_after = sim.managed_routes_after(self);
            let unmanaged_after = after.saturating_sub(managed_after);
            if unmanaged_after + self.managed_allocated as usize > self.routes.capacity() {
                return Err(BackingError::RoutesExhausted);
            }
        }
        Ok(Plan {
            entries,
            creates,
            rewrites,
            prune,
        })
    }

    /// 2. One route commit: new routes, in-place rewrites, and the removal of routes
    ///    whose lines were retired. Returns the new routes' GSIs.
    fn route_commit(&mut self, plan: &Plan) -> Result<Vec<(RouteKey, Gsi)>, BackingError> {
        for gsi in self.orphans.iter().chain(
            plan.prune
                .iter()
                .filter_map(|k| self.cache.get(k).map(|r| &r.gsi)),
        ) {
            let _ = self.routes.remove(*gsi);
        }
        let mut created: Vec<(RouteKey, Gsi)> = Vec::with_capacity(plan.creates.len());
        for key in &plan.creates {
            match self.routes.allocate(key.msg) {
                Ok(gsi) => created.push((*key, gsi)),
                Err(e) => {
                    self.routes.rollback();
                    return Err(match e {
                        RouteError::Exhausted { .. } => BackingError::RoutesExhausted,
                        other => other.into(),
                    });
                }
            }
        }
        for (gsi, _, key) in &plan.rewrites {
            if let Err(e) = self.routes.update(*gsi, key.msg) {
                self.routes.rollback();
                return Err(e.into());
            }
        }
        self.routes.commit()?;
        self.orphans.clear();
        for key in &plan.prune {
            self.cache.remove(key);
        }
        // Every route without a line was pruned (new ones come only from here on).
        self.maybe_retired = false;
        for (gsi, old, key) in &plan.rewrites {
            if let Some(mut route) = self.cache.remove(old) {
                // Its one user rejoins under the new key when it is published.
                route.gsi = *gsi;
                route.users = 0;
                self.cache.insert(*key, route);
            }
        }
        Ok(created)
    }

    /// 3. Lines for the new routes (an irqfd needs its route first). On failure the lines
    ///    made are retired and the new routes stay in the cache without lines (removed by
    ///    the next commit).
    fn new_lines(&mut self, created: &[(RouteKey, Gsi)]) -> Result<(), BackingError> {
        let mut lines: Vec<(RouteKey, Arc<Line>)> = Vec::with_capacity(created.len());
        for (i, (key, gsi)) in created.iter().enumerate() {
            match self.new_line(*key, *gsi) {
                Ok(line) => lines.push((*key, line)),
                Err(e) => {
                    for (key, line) in lines {
                        self.retire_line(key, line);
                    }
                    self.orphans.extend(created.iter().skip(i).map(|(_, g)| *g));
                    for (key, gsi) in created.iter().take(i) {
                        self.cache.insert(
                            *key,
                            CachedRoute {
                                gsi: *gsi,
                                line: None,
                                users: 0,
                            },
                        );
                        self.maybe_retired = true;
                    }
                    return Err(e);
                }
            }
        }
        for (key, line) in lines {
            let gsi = line.gsi;
            self.cache.insert(
                key,
                CachedRoute {
                    gsi,
                    line: Some(line),
                    users: 0,
                },
            );
        }
        Ok(())
    }

    /// 4. Publish: swap every changed entry's slot, count users and live entries, and
    ///    write the table. Nothing fails from here on. Returns the routes that lost a
    ///    user.
    fn publish(&mut self, entries: Vec<Planned>) -> Vec<RouteKey> {
        let mut left = Vec::new();
        for p in entries {
            let Some(entry) = self.entries.get_mut(p.index as usize) else {
                continue;
            };
            let old = entry.live;
            let published = match (p.step, p.state) {
                (Step::Keep | Step::Join, NewState::Live { key, policy }) => {
                    let Some(route) = self.cache.get_mut(&key) else {
                        continue;
                    };
                    let Some(line) = route.line.clone() else {
                        continue;
                    };
                    if p.step == Step::Join || old != Some(key) {
                        route.users += 1;
                    }
                    entry.live = Some(key);
                    Published::Live { line, policy }
                }
                (_, NewState::Faulty(reason)) => {
                    entry.live = None;
                    Published::Faulty(reason)
                }
                _ => {
                    entry.live = None;
                    Published::Absent
                }
            };
            if let Some(slot) = self.path.slots.get(p.index as usize) {
                *slot.write().unwrap_or_else(PoisonError::into_inner) = published;
            }
            match (old, entry.live) {
                (Some(_), None) => self.live -= 1,
                (None, Some(_)) => self.live += 1,
                _ => {}
            }
            if let Some(old) = old.filter(|o| Some(*o) != entry.live) {
                // (A rewritten route is no longer under its old key.)
                if let Some(route) = self.cache.get_mut(&old) {
                    route.users = route.users.saturating_sub(1);
                    left.push(old);
                }
            }
            let _ = self.table.write(p.index, p.raw);
        }
        left
    }

    /// 5. (after a successful commit) Retires the lines of `keys` left without users:
    ///    only the routes the commit touched can have lost their last user.
    fn retire_lines_without_users(&mut self, keys: &[RouteKey]) {
        for key in keys {
            let idle = self
                .cache
                .get_mut(key)
                .filter(|r| r.users == 0)
                .and_then(|r| r.line.take());
            if let Some(line) = idle {
                self.maybe_retired = true;
                self.retire_line(*key, line);
            }
        }
    }

    /// 5. Retire lines left without users: detach their irqfds now; their routes go with
    ///    the next commit (the kernel wants irqfds gone before their route).
    fn retire_idle_lines(&mut self) {
        let idle: Vec<RouteKey> = self
            .cache
            .iter()
            .filter(|(_, r)| r.users == 0 && r.line.is_some())
            .map(|(k, _)| *k)
            .collect();
        for key in idle {
            if let Some(line) = self.cache.get_mut(&key).and_then(|r| r.line.take()) {
                self.maybe_retired = true;
                self.retire_line(key, line);
            }
        }
    }

    /// An eventfd (from the managed pool for a managed route) attached to `gsi`.
    fn new_line(&mut self, key: RouteKey, gsi: Gsi) -> Result<Arc<Line>, BackingError> {
        let reserved = if key.managed {
            self.managed_fds.pop()
        } else {
            None
        };
        let fd = match reserved {
            Some(fd) => fd,
            None => EventFd::new(EFD_NONBLOCK).map_err(BackingError::EventFd)?,
        };
        if let Err(e) = self.routes.attach_irqfd(&fd, gsi) {
            if key.managed {
                self.managed_fds.push(fd);
            }
            return Err(e.into());
        }
        Ok(Arc::new(Line { fd, gsi }))
    }

    fn retire_line(&mut self, key: RouteKey, line: Arc<Line>) {
        if self.routes.detach_irqfd(&line.fd, line.gsi).is_err() {
            self.stats.retire_errors += 1;
        }
        // Every slot that pointed here was swapped under its write lock, so this is the
        // last reference.
        if let Ok(line) = Arc::try_unwrap(line) {
            // Whatever count is left was injected when it was written.
            let _ = line.fd.read();
            if key.managed && self.managed_fds.len() < self.managed_allocated as usize {
                self.managed_fds.push(line.fd);
            }
        }
    }
}

/// Staged entry writes, applied together by [`Transaction::commit`].
#[derive(Debug)]
pub struct Transaction<'a, B: RoutingBackend> {
    pub(super) backing: &'a mut Backing<B>,
    pub(super) staged: BTreeMap<u32, [u64; 2]>,
}

impl<B: RoutingBackend> Transaction<'_, B> {
    /// Stages a raw entry (as a guest's table holds it; a malformed entry becomes a
    /// faulting one, not an error).
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`].
    pub fn write(&mut self, index: u32, raw: [u64; 2]) -> Result<(), BackingError> {
        if index >= self.backing.limits.table_size {
            return Err(BackingError::IndexOutOfRange(index));
        }
        self.staged.insert(index, raw);
        Ok(())
    }

    /// Stages `entry` at `index`.
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`].
    pub fn set(&mut self, index: u32, entry: &Irte) -> Result<(), BackingError> {
        let raw = entry.encode(self.backing.limits.eim);
        self.write(index, raw)
    }

    /// Stages clearing entry `index` (not present).
    ///
    /// # Errors
    /// [`BackingError::IndexOutOfRange`].
    pub fn clear(&mut self, index: u32) -> Result<(), BackingError> {
        self.write(index, [0, 0])
    }

    /// Entries staged.
    #[must_use]
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    /// Whether nothing is staged.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Applies every staged write with at most one route commit, or none of them.
    ///
    /// # Errors
    /// Any [`BackingError`]; the previous state is then intact and still delivering.
    pub fn commit(self) -> Result<(), BackingError> {
        let entries = self.staged.len();
        let result = self.backing.apply(self.staged);
        match &result {
            Ok(()) => {
                self.backing.stats.transactions += 1;
                tracing::info!(target: "irvm::routes", kind = "transaction", entries, ok = true);
            }
            Err(e) => {
                self.backing.stats.rollbacks += 1;
                crate::warn_limited!(
                    "remapping transaction refused ({e}); the previous state stays in force"
                );
                tracing::info!(
                    target: "irvm::routes",
                    kind = "transaction",
                    entries,
                    ok = false,
                    error = %e,
                );
            }
        }
        result
    }
}
