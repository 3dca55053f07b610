//! ActionCache: GetActionResult and UpdateActionResult over the server's
//! action cache tree. Without one, both answer UNIMPLEMENTED (and the
//! capabilities say updates are disabled).

use super::cas::parse_digest;
use super::{digest_function, Permission, Shared};
use blob_access::action_cache::ActionCache;
use blob_access::proto::action_cache_server;
use blob_access::proto::{ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use blob_access::{Digest, DigestFunction};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub(super) struct ActionCacheService(pub(super) Shared);

impl ActionCacheService {
    fn tree(&self) -> Result<&Arc<dyn ActionCache>, Status> {
        self.0.action_cache.as_ref().ok_or_else(|| {
            Status::unimplemented(
                "this server has no action cache; give it an `action_cache:` tree in its config",
            )
        })
    }

    /// The tree a request goes to and its action's digest; UNIMPLEMENTED
    /// without a tree comes before any complaint about the request.
    fn target(
        &self,
        extensions: &tonic::Extensions,
        needed: Permission,
        instance_name: &str,
        function_value: i32,
        digest: Option<&blob_access::proto::Digest>,
    ) -> Result<(&Arc<dyn ActionCache>, Digest), Status> {
        let tree = self.tree()?;
        self.0.check_instance(instance_name, extensions, needed)?;
        let function = digest_function(function_value, digest.map(|d| d.hash.as_str()))?;
        let action = parse_digest(function, digest)
            .map_err(|s| Status::invalid_argument(format!("action_digest: {}", s.message())))?;
        Ok((tree, action.with_instance_name(instance_name)))
    }
}

/// Every digest an action result names must be well formed, or clients that
/// later read it would fail on our data.
fn check_digests(result: &ActionResult, function: DigestFunction) -> Result<(), Status> {
    let named = |field: String, d: Option<&blob_access::proto::Digest>| {
        parse_digest(function, d).map_err(|s| {
            Status::invalid_argument(format!("action_result.{field}: {}", s.message()))
        })
    };
    let relative = |field: String, path: &str| {
        if path.is_empty() || path.starts_with('/') {
            return Err(Status::invalid_argument(format!(
                "action_result.{field}: output paths are relative to the working directory, not {path:?}"
            )));
        }
        Ok(())
    };
    // Inlined bytes are served as they are: they must be what their digest says.
    let inlined = |field: String, data: &[u8], d: &blob_access::proto::Digest| {
        let digest = Digest::of_with(function, data);
        if !data.is_empty()
            && (digest.hash() != d.hash || digest.size_bytes() as i64 != d.size_bytes)
        {
            return Err(Status::invalid_argument(format!(
                "action_result.{field}: the inlined bytes are {digest}, not the digest given"
            )));
        }
        Ok(())
    };
    for (i, f) in result.output_files.iter().enumerate() {
        let at = format!("output_files[{i}] ({:?})", f.path);
        named(at.clone(), f.digest.as_ref())?;
        relative(at.clone(), &f.path)?;
        inlined(
            format!("{at}.contents"),
            &f.contents,
            f.digest.as_ref().unwrap_or(&Default::default()),
        )?;
    }
    #[allow(deprecated)] // Older clients (Bazel 4) still fill the split fields.
    let links = [
        &result.output_symlinks,
        &result.output_file_symlinks,
        &result.output_directory_symlinks,
    ];
    for (i, l) in links.into_iter().flatten().enumerate() {
        relative(format!("output symlink {i} ({:?})", l.path), &l.path)?;
    }
    for (i, d) in result.output_directories.iter().enumerate() {
        relative(format!("output_directories[{i}]"), &d.path)?;
    }
    for (i, d) in result.output_directories.iter().enumerate() {
        let at = format!("output_directories[{i}] ({:?})", d.path);
        // REAPI 2.3 results may name the directory by its root Directory instead of a Tree.
        let fields = [
            ("tree_digest", &d.tree_digest),
            ("root_directory_digest", &d.root_directory_digest),
        ];
        if fields.iter().all(|(_, d)| d.is_none()) {
            return Err(Status::invalid_argument(format!(
                "action_result.{at}: neither tree_digest nor root_directory_digest is set"
            )));
        }
        for (field, digest) in fields {
            if digest.is_some() {
                named(format!("{at}.{field}"), digest.as_ref())?;
            }
        }
    }
    for (field, d) in [
        ("stdout_digest", &result.stdout_digest),
        ("stderr_digest", &result.stderr_digest),
    ] {
        if d.is_some() {
            named(field.to_string(), d.as_ref())?;
        }
    }
    for (field, raw, d) in [
        ("stdout_raw", &result.stdout_raw, &result.stdout_digest),
        ("stderr_raw", &result.stderr_raw, &result.stderr_digest),
    ] {
        if let Some(d) = d {
            inlined(field.to_string(), raw, d)?;
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl action_cache_server::ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let (_, extensions, req) = request.into_parts();
        let digest = req.action_digest.as_ref();
        let (tree, action) = self.target(
            &extensions,
            Permission::Read,
            &req.instance_name,
            req.digest_function,
            digest,
        )?;
        // Inlining is optional (REAPI lets servers omit it); clients read outputs from the CAS.
        let result = tree.get_action_result(&action).await?;
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let (_, extensions, req) = request.into_parts();
        let digest = req.action_digest.as_ref();
        let (tree, action) = self.target(
            &extensions,
            Permission::Write,
            &req.instance_name,
            req.digest_function,
            digest,
        )?;
        if self.0.cfg.action_cache_read_only {
            return Err(Status::permission_denied(
                "this server's action cache is read-only",
            ));
        }
        let result = req
            .action_result
            .ok_or_else(|| Status::invalid_argument("action_result is missing"))?;
        check_digests(&result, action.function())?;
        tree.update_action_result(&action, &result).await?;
        Ok(Response::new(result))
    }
}
