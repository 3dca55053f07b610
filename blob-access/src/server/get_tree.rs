//! GetTree: the `Directory` messages of a tree, breadth first, in pages, over
//! any CAS tree (each one read and verified through `get`).
//!
//! The page token is the list of directories still to visit (`HASH/SIZE,...`),
//! so that paging needs no state on the server and survives a restart or a
//! load balancer. One call sends at most [`MAX_PER_CALL`] directories, however
//! large the tree: that bounds the work and memory one request may cause; the
//! last message's token continues where it stopped.

use super::cas::parse_digest;
use super::{check_digest_function, Shared};
use crate::proto::{Directory, GetTreeRequest, GetTreeResponse};
use crate::{util, Digest, ReadRange};
use futures::stream::BoxStream;
use futures::StreamExt;
use prost::Message;
use std::collections::{HashSet, VecDeque};
use tonic::Status;

/// Directories per page when the client leaves `page_size` at 0.
const DEFAULT_PAGE: usize = 1_000;
/// Directories one call sends at most, whatever `page_size` says.
pub(super) const MAX_PER_CALL: usize = 10_000;
/// Directory blobs read at once.
const CONCURRENCY: usize = 16;

type Pages = BoxStream<'static, Result<GetTreeResponse, Status>>;

pub(super) fn get_tree(shared: Shared, req: GetTreeRequest) -> Result<Pages, Status> {
    shared.check_instance(&req.instance_name)?;
    check_digest_function(req.digest_function)?;
    let root = parse_digest(req.root_digest.as_ref())?;
    let pending = if req.page_token.is_empty() {
        VecDeque::from([root])
    } else {
        parse_token(&req.page_token)?
    };
    let page_size = match req.page_size {
        n if n <= 0 => DEFAULT_PAGE,
        n => (n as usize).min(MAX_PER_CALL),
    };
    let walk = Walk {
        shared,
        pending,
        seen: HashSet::new(),
        sent: 0,
        page_size,
    };
    Ok(futures::stream::unfold(Some(walk), |walk| async move {
        let mut walk = walk?;
        match walk.next_page().await {
            Ok(page) => {
                let more = !page.next_page_token.is_empty() && walk.sent < MAX_PER_CALL;
                Some((Ok(page), more.then_some(walk)))
            }
            Err(s) => Some((Err(s), None)),
        }
    })
    .boxed())
}

struct Walk {
    shared: Shared,
    pending: VecDeque<Digest>,
    /// Directories sent by this call: a directory shared by several paths is sent once.
    seen: HashSet<Digest>,
    sent: usize,
    page_size: usize,
}

impl Walk {
    async fn next_page(&mut self) -> Result<GetTreeResponse, Status> {
        let mut directories = Vec::new();
        let mut bytes = 0usize;
        // Leave room in the message for the token.
        let max_bytes = self.shared.cfg.max_message_size / 2;
        while directories.len() < self.page_size && !self.pending.is_empty() {
            let want = (self.page_size - directories.len()).min(CONCURRENCY * 4);
            let batch: Vec<Digest> = std::iter::from_fn(|| self.pending.pop_front())
                .filter(|d| self.seen.insert(d.clone()))
                .take(want)
                .collect();
            let shared = self.shared.clone();
            let read = batch.into_iter().map(move |d| read(shared.clone(), d));
            let read: Vec<_> = futures::stream::iter(read)
                .buffered(CONCURRENCY)
                .collect()
                .await;
            for dir in read {
                let (dir, size) = dir?;
                for child in &dir.directories {
                    let d = parse_digest(child.digest.as_ref()).map_err(|s| {
                        Status::failed_precondition(format!(
                            "directory {:?} of the tree: {}",
                            child.name,
                            s.message()
                        ))
                    })?;
                    self.pending.push_back(d);
                }
                bytes += size;
                directories.push(dir);
            }
            if bytes >= max_bytes {
                break;
            }
        }
        self.sent += directories.len();
        let next_page_token = token(&self.pending);
        // A tree so wide that the directories still to visit do not fit in a message.
        if next_page_token.len() > max_bytes {
            return Err(Status::resource_exhausted(format!(
                "the tree is too wide to page: {} directories wait at one level",
                self.pending.len()
            )));
        }
        Ok(GetTreeResponse {
            directories,
            next_page_token,
        })
    }
}

async fn read(shared: Shared, d: Digest) -> Result<(Directory, usize), Status> {
    let max = shared.cfg.max_message_size / 2;
    if d.size_bytes() > max as u64 {
        return Err(Status::failed_precondition(format!(
            "directory {d} is larger than {max} bytes"
        )));
    }
    let data = util::read_to_bytes(&*shared.backend, &d, ReadRange::FULL, max).await?;
    let dir = Directory::decode(data).map_err(|e| {
        Status::failed_precondition(format!("blob {d} is not a Directory message: {e}"))
    })?;
    Ok((dir, d.size_bytes() as usize))
}

fn token(pending: &VecDeque<Digest>) -> String {
    let names: Vec<String> = pending.iter().map(Digest::to_string).collect();
    names.join(",")
}

fn parse_token(token: &str) -> Result<VecDeque<Digest>, Status> {
    token
        .split(',')
        .map(|d| {
            d.parse::<Digest>()
                .map_err(|e| Status::invalid_argument(format!("page_token: {e}")))
        })
        .collect()
}
