//! GetTree: the `Directory` messages of a tree, breadth first, in pages, over
//! any CAS tree (each one read and verified through `get`).
//!
//! A call streams the whole tree, each distinct directory once, in pages of at
//! most `page_size` directories and [`PAGE_BYTES`] (what common clients accept
//! in one message). Directories missing from the CAS are left out, as REAPI
//! asks; a missing root is NOT_FOUND. The page token is the number of
//! directories walked so far in this deterministic order: paging needs no
//! state on the server (a restart or another server behind a balancer
//! continues the walk), and a resumed call walks that far again without
//! sending it. One call sends at most `ServerConfig::max_tree_directories_per_call`
//! directories, which bounds its work and time; its last page's token
//! continues the walk.

use super::cas::parse_digest_in;
use super::{digest_function, Shared};
use blob_access::proto::{Directory, GetTreeRequest, GetTreeResponse};
use blob_access::{util, Code, Digest, ReadRange};
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use std::collections::{HashSet, VecDeque};
use tonic::Status;

/// Directories per page when the client leaves `page_size` at 0.
const DEFAULT_PAGE: usize = 1_000;
/// Bytes of directories per page: under the 4 MiB message limit of most clients.
pub(super) const PAGE_BYTES: u64 = (4 << 20) - (64 << 10);
/// Directory blobs read at once.
const CONCURRENCY: usize = 16;

type Pages = BoxStream<'static, Result<GetTreeResponse, Status>>;

pub(super) fn get_tree(shared: Shared, req: GetTreeRequest) -> Result<Pages, Status> {
    let first = req.root_digest.as_ref().map(|d| d.hash.as_str());
    let function = digest_function(req.digest_function, first)?;
    let root = parse_digest_in(&req.instance_name, function, req.root_digest.as_ref())?;
    let skip = match req.page_token.as_str() {
        "" => 0,
        t => t.parse::<usize>().map_err(|_| {
            Status::invalid_argument(format!(
                "page_token {t:?} is not one this server gave (a number of directories)"
            ))
        })?,
    };
    let page_size = match req.page_size {
        n if n <= 0 => DEFAULT_PAGE,
        n => n as usize,
    };
    let walk = Walk {
        shared,
        root: root.clone(),
        pending: VecDeque::from([root.clone()]),
        queued: HashSet::from([root]),
        walked: 0,
        skip,
        sent: 0,
        page_size,
    };
    Ok(futures::stream::unfold(Some(walk), |walk| async move {
        let mut walk = walk?;
        match walk.next_page().await {
            Ok(page) => {
                let max = walk.shared.cfg.max_tree_directories_per_call;
                let more = !page.next_page_token.is_empty() && walk.sent < max;
                Some((Ok(page), more.then_some(walk)))
            }
            Err(s) => Some((Err(s), None)),
        }
    })
    .boxed())
}

struct Walk {
    shared: Shared,
    root: Digest,
    /// Directories to read, in breadth-first order.
    pending: VecDeque<Digest>,
    /// Every directory ever queued: each distinct one is walked once.
    queued: HashSet<Digest>,
    /// Directories walked (read, or found missing) since the root.
    walked: usize,
    /// Directories walked by earlier calls, not to be sent again.
    skip: usize,
    sent: usize,
    page_size: usize,
}

impl Walk {
    async fn next_page(&mut self) -> Result<GetTreeResponse, Status> {
        let mut directories = Vec::new();
        let mut bytes = 0u64;
        while directories.len() < self.page_size && !self.pending.is_empty() {
            // The next directories that fit in the page (at least one, however large).
            let mut batch = Vec::new();
            while let Some(d) = self.pending.front() {
                let sending = self.walked + batch.len() >= self.skip;
                let fits = bytes + d.size_bytes() <= PAGE_BYTES || bytes == 0;
                let room = directories.len() + batch.len() < self.page_size;
                if batch.len() == CONCURRENCY || (sending && (!fits || !room)) {
                    break;
                }
                if sending {
                    bytes += d.size_bytes();
                }
                batch.extend(self.pending.pop_front());
            }
            if batch.is_empty() {
                break;
            }
            let shared = self.shared.clone();
            let reads = batch
                .clone()
                .into_iter()
                .map(move |d| read(shared.clone(), d));
            let read: Vec<_> = futures::stream::iter(reads)
                .buffered(CONCURRENCY)
                .collect()
                .await;
            for (d, dir) in batch.iter().zip(read) {
                self.walked += 1;
                let dir = match dir {
                    Ok(dir) => dir,
                    // REAPI: the missing parts of a tree are left out; only the root must be there.
                    Err(s) if s.code() == Code::NotFound && *d != self.root => continue,
                    Err(s) => return Err(s),
                };
                for child in &dir.directories {
                    let c = parse_digest_in(d.instance_name(), d.function(), child.digest.as_ref())
                        .map_err(|s| {
                            Status::failed_precondition(format!(
                                "directory {d}: subdirectory {:?}: {}",
                                child.name,
                                s.message()
                            ))
                        })?;
                    if self.queued.insert(c.clone()) {
                        self.pending.push_back(c);
                    }
                }
                if self.walked > self.skip {
                    directories.push(dir);
                }
            }
        }
        self.sent += directories.len();
        let next_page_token = match self.pending.is_empty() {
            true => String::new(),
            false => self.walked.to_string(),
        };
        Ok(GetTreeResponse {
            directories,
            next_page_token,
        })
    }
}

async fn read(shared: Shared, d: Digest) -> Result<Directory, Status> {
    let max = shared.cfg.max_message_size / 2;
    if d.size_bytes() > max as u64 {
        return Err(Status::failed_precondition(format!(
            "directory {d} is larger than {max} bytes"
        )));
    }
    let data = util::read_to_bytes(&*shared.backend, &d, ReadRange::FULL, max).await?;
    Directory::decode(data).map_err(|e| {
        Status::failed_precondition(format!("blob {d} is not a Directory message: {e}"))
    })
}
