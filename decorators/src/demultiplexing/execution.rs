//! `demultiplexing` in an execution tree: Execute goes to the backend of its
//! request's instance name; WaitExecution, GetOperation and CancelOperation,
//! which name only the operation, go to the backend that created it.
//!
//! Operation names are passed on unchanged (clients log them and users look
//! them up on the cluster's own pages). The node remembers which backend
//! created each of the last [`REMEMBERED`] operations; one it does not know
//! (created before a restart of `serve`) is looked up with GetOperation on
//! each backend in turn, and the first that knows it takes it.

use super::{Route, Routes};
use blob_access::execution::{
    ExecuteRequest, Execution, ExecutionCapabilities, ListOperationsRequest,
    ListOperationsResponse, Operation, OperationStream,
};
use blob_access::{Code, Error, NodeMetrics, Result};
use futures::StreamExt;
use std::sync::{Arc, Mutex};

/// Operations whose backend is remembered: far more than run at once.
pub const REMEMBERED: usize = 100_000;

/// See the module documentation.
pub struct DemultiplexingExecution {
    inner: Arc<Inner>,
}

struct Inner {
    routes: Routes<dyn Execution>,
    owners: Mutex<lru::LruCache<String, Arc<dyn Execution>>>,
}

impl DemultiplexingExecution {
    pub fn new(name: &str) -> Self {
        let cap = std::num::NonZeroUsize::new(REMEMBERED).expect("not zero");
        let inner = Inner {
            routes: Routes::new(name),
            owners: Mutex::new(lru::LruCache::new(cap)),
        };
        DemultiplexingExecution {
            inner: Arc::new(inner),
        }
    }

    /// As [`super::Demultiplexing::route`]; only while building.
    pub fn route(
        mut self,
        prefix: &str,
        backend: Arc<dyn Execution>,
        replacement: Option<&str>,
    ) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("routes are added before use");
        inner.routes.add(prefix, backend, replacement);
        self
    }

    fn instance(&self, instance: &str) -> Result<(&Route<dyn Execution>, String)> {
        let (route, renamed) = self.inner.routes.route_name(instance)?;
        Ok((route, renamed.unwrap_or_else(|| instance.to_string())))
    }
}

impl Inner {
    fn known(&self, name: &str) -> Option<Arc<dyn Execution>> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.get(name).cloned()
    }

    fn remember(&self, name: &str, backend: &Arc<dyn Execution>) {
        if name.is_empty() {
            return;
        }
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.get(name).is_none() {
            owners.put(name.to_string(), backend.clone());
        }
    }

    /// The backend that created operation `name`: remembered, or found by
    /// asking each backend; NOT_FOUND if none knows it.
    async fn owner(&self, name: &str) -> Result<Arc<dyn Execution>> {
        if let Some(backend) = self.known(name) {
            return Ok(backend);
        }
        let mut last = None;
        for r in &self.routes.routes {
            match r.backend.get_operation(name).await {
                Ok(_) => {
                    self.remember(name, &r.backend);
                    return Ok(r.backend.clone());
                }
                Err(e) if e.code() == Code::NotFound => {}
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::not_found(format!("no backend knows operation {name:?}"))
                .with_backend(&self.routes.name)
        }))
    }
}

fn failed(e: Error) -> OperationStream {
    futures::stream::once(async move { Err(e) }).boxed()
}

#[async_trait::async_trait]
impl Execution for DemultiplexingExecution {
    fn execute(&self, mut request: ExecuteRequest) -> OperationStream {
        let (route, instance) = match self.instance(&request.instance_name) {
            Ok(routed) => routed,
            Err(e) => return failed(e),
        };
        request.instance_name = instance;
        let (backend, inner) = (route.backend.clone(), self.inner.clone());
        let stream = backend.execute(request);
        stream
            .inspect(move |item| {
                if let Ok(op) = item {
                    inner.remember(&op.name, &backend);
                }
            })
            .boxed()
    }

    fn wait_execution(&self, name: &str) -> OperationStream {
        let (name, inner) = (name.to_string(), self.inner.clone());
        futures::stream::once(async move {
            match inner.owner(&name).await {
                Ok(backend) => backend.wait_execution(&name),
                Err(e) => failed(e),
            }
        })
        .flatten()
        .boxed()
    }

    async fn get_operation(&self, name: &str) -> Result<Operation> {
        self.inner.owner(name).await?.get_operation(name).await
    }

    async fn cancel_operation(&self, name: &str) -> Result<()> {
        self.inner.owner(name).await?.cancel_operation(name).await
    }

    async fn list_operations(
        &self,
        mut request: ListOperationsRequest,
    ) -> Result<ListOperationsResponse> {
        let (route, instance) = self.instance(&request.name)?;
        request.name = instance;
        route.backend.list_operations(request).await
    }

    async fn capabilities(&self, instance_name: &str) -> Result<Option<ExecutionCapabilities>> {
        let (route, instance) = self.instance(instance_name)?;
        route.backend.capabilities(&instance).await
    }

    fn metrics(&self, out: &mut Vec<NodeMetrics>) {
        for r in &self.inner.routes.routes {
            r.backend.metrics(out);
        }
    }
}
