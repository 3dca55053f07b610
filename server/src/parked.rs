//! Uploads kept after their Write was cut, so that the client can go on.
//!
//! Proxies and load balancers cut long uploads as they cut reads. A client
//! that resumes asks QueryWriteStatus for the committed size and writes
//! from there; a server that forgets a cut upload at once answers 0, and a
//! large upload through a proxy that cuts every few hundred milliseconds
//! never completes. So a cut upload's session (its backend `put` still open
//! with the bytes received) is kept for a window, bounded in count and in
//! bytes held; past the window it is discarded and nothing is stored. An
//! upload not kept because of the bounds is remembered as such, so that a
//! Write continuing it gets RESOURCE_EXHAUSTED rather than a puzzling offset
//! error.

use super::upload::Session;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Names of uploads dropped for the bounds, remembered for their Writes.
const DROPPED_REMEMBERED: usize = 10_000;

/// Bounds of the uploads kept after a cut.
#[derive(Clone, Copy, Debug)]
pub struct ParkingLimits {
    /// How long a cut upload is kept; zero keeps none.
    pub window: Duration,
    /// Cut uploads kept at once.
    pub max_uploads: usize,
    /// Bytes received by the cut uploads kept at once.
    pub max_bytes: u64,
}

impl Default for ParkingLimits {
    fn default() -> Self {
        ParkingLimits {
            window: Duration::from_secs(60),
            // A kept upload into a `disk` store holds one of the runtime's
            // blocking threads (512 by default) while it waits for its bytes.
            max_uploads: 256,
            max_bytes: 8 << 30,
        }
    }
}

struct Entry {
    session: Arc<Session>,
    /// When its Write was cut; `None` while a Write feeds it.
    parked: Option<(Instant, u64)>,
}

/// The uploads in progress by resource name, and those kept after a cut.
pub(super) struct Uploads {
    limits: ParkingLimits,
    entries: Mutex<HashMap<String, Entry>>,
    dropped: Mutex<lru::LruCache<String, ()>>,
    /// Numbers the Write calls, to tell an old owner of a session from a new one.
    next_owner: AtomicU64,
}

/// What a Write with a resource name finds.
pub(super) enum Found {
    /// A session to go on with, now owned by the caller (an older Write of
    /// it stops), and the bytes it has.
    Resume(Arc<Session>, u64),
    /// Not kept: the bounds were reached when it was cut.
    Dropped,
    None,
}

impl Uploads {
    pub(super) fn new(limits: ParkingLimits) -> Self {
        Uploads {
            limits,
            entries: Mutex::default(),
            dropped: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(DROPPED_REMEMBERED).expect("not zero"),
            )),
            next_owner: AtomicU64::new(1),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A number for a new Write call.
    pub(super) fn new_owner(&self) -> u64 {
        self.next_owner.fetch_add(1, Ordering::Relaxed)
    }

    /// The upload `name` for the Write `owner` starting at `offset`, if one
    /// is kept or running. A Write at 0 starts the upload again (a client
    /// that does not resume, or was told 0): what was kept of it is
    /// discarded, and it is no longer remembered as dropped.
    pub(super) async fn find(&self, name: &str, owner: u64, offset: i64) -> Found {
        let (session, restarted) = {
            let mut entries = self.entries();
            match entries.get_mut(name) {
                Some(e) if offset == 0 && !e.session.finishing() => {
                    (None, entries.remove(name).map(|e| e.session))
                }
                Some(e) => {
                    e.parked = None;
                    e.session.take_over(owner);
                    (Some(e.session.clone()), None)
                }
                None => (None, None),
            }
        };
        if let Some(old) = restarted {
            old.take_over(owner);
            old.discard("the upload was started again at 0").await;
        }
        match session {
            Some(s) => {
                let committed = s.committed().await;
                Found::Resume(s, committed as u64)
            }
            None if offset == 0 => {
                let mut dropped = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
                dropped.pop(name);
                Found::None
            }
            None if self.was_dropped(name) => Found::Dropped,
            None => Found::None,
        }
    }

    fn was_dropped(&self, name: &str) -> bool {
        let mut dropped = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
        dropped.get(name).is_some()
    }

    /// Registers a new upload fed by `owner`.
    pub(super) fn add(&self, name: &str, session: Arc<Session>, owner: u64) {
        session.take_over(owner);
        let entry = Entry {
            session,
            parked: None,
        };
        self.entries().insert(name.to_string(), entry);
    }

    /// Where an upload in progress or kept stands, if there is one: its
    /// bytes, or once it was finished whether the blob was stored.
    ///
    /// A client asks this when it believes its stream was cut, and then
    /// writes from the answer. The server may not have noticed the cut yet:
    /// the old stream's handler would go on taking the messages already
    /// buffered, and the committed size would move past the answer. So the
    /// session is taken from the Write feeding it (which stops at its next
    /// message) and kept as a cut one: the answer holds until the next Write.
    /// The answer also restarts the window, so that it holds for the Write
    /// that follows. A caller that may only read gets the answer and
    /// changes nothing.
    pub(super) async fn standing(
        self: &Arc<Self>,
        name: &str,
        may_write: bool,
    ) -> Option<Result<i64, bool>> {
        let owner = self.new_owner();
        let session = {
            let mut entries = self.entries();
            let entry = entries.get_mut(name)?;
            if may_write && !entry.session.finishing() {
                entry.session.take_over(owner);
                let now = Instant::now();
                entry.parked = Some((now, owner));
                self.expire_later(name, now, owner);
            }
            entry.session.clone()
        };
        if may_write {
            session.finish_if_whole().await;
        }
        Some(session.standing().await)
    }

    /// Discards `name` after the window if it is still parked since `since` by `owner`.
    fn expire_later(self: &Arc<Self>, name: &str, since: Instant, owner: u64) {
        let (this, name) = (self.clone(), name.to_string());
        let window = self.limits.window;
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            this.expire(&name, since, owner).await;
        });
    }

    /// Forgets `name` (stored, failed or discarded) if `owner` still has it.
    pub(super) fn remove(&self, name: &str, owner: u64) {
        let mut entries = self.entries();
        if entries.get(name).is_some_and(|e| e.session.owned_by(owner)) {
            entries.remove(name);
        }
    }

    /// The Write `owner` of `name` was cut: keeps its session for the
    /// window if the bounds allow, else discards it.
    pub(super) async fn park(self: &Arc<Self>, name: &str, owner: u64) {
        let now = Instant::now();
        let (session, kept) = {
            let mut entries = self.entries();
            let Some(entry) = entries.get(name) else {
                return;
            };
            if !entry.session.owned_by(owner) {
                return; // A newer Write has it.
            }
            let (count, bytes) = self.parked_totals(&entries);
            let received = entry.session.received_hint();
            let fits = !self.limits.window.is_zero()
                && count < self.limits.max_uploads
                && bytes + received <= self.limits.max_bytes;
            let session = entry.session.clone();
            if fits {
                entries.get_mut(name).expect("found above").parked = Some((now, owner));
            } else {
                entries.remove(name);
                if !self.limits.window.is_zero() {
                    // Under the entries' lock: a Write of it sees one or the other.
                    let mut dropped = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
                    dropped.put(name.to_string(), ());
                }
            }
            (session, fits)
        };
        if !kept {
            if !self.limits.window.is_zero() {
                tracing::warn!(
                    upload = name,
                    parked_uploads_max = self.limits.max_uploads,
                    parked_bytes_max = self.limits.max_bytes,
                    "a cut upload is not kept: the bounds of kept uploads are reached"
                );
            }
            session.discard("the upload was cut and is not kept").await;
            return;
        }
        tracing::debug!(
            upload = name,
            received = session.received_hint(),
            "keeping a cut upload"
        );
        self.expire_later(name, now, owner);
    }

    /// Discards `name` if it is still parked since `since` by `owner`.
    async fn expire(&self, name: &str, since: Instant, owner: u64) {
        let session = {
            let mut entries = self.entries();
            match entries.get(name) {
                Some(e) if e.parked == Some((since, owner)) => entries.remove(name),
                _ => None,
            }
        };
        if let Some(e) = session {
            tracing::debug!(upload = name, "a kept upload expired");
            e.session
                .discard("the upload was not resumed within the window")
                .await;
        }
    }

    /// Count and bytes of the parked uploads (bytes as of their parking).
    fn parked_totals(&self, entries: &HashMap<String, Entry>) -> (usize, u64) {
        let parked = entries.values().filter(|e| e.parked.is_some());
        let count = parked.clone().count();
        let bytes = parked.map(|e| e.session.received_hint()).sum::<u64>();
        (count, bytes)
    }
}
