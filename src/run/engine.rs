//! What every run of one process shares, passed down explicitly (no
//! process-wide statics): the Salesforce clients (one token and one set of
//! Bulk job slots per connection), where progress goes, and the hooks tests
//! step in with.

use std::sync::Arc;

use crate::hooks::{NoHooks, SharedHooks};
use crate::salesforce::Clients;

/// Receives `(job, pages, rows)` after each staged page. `nightjar run`
/// draws progress with it; `serve` sets none (history is its record).
pub type ProgressSink = dyn Fn(&str, u64, u64) + Send + Sync;

pub struct Engine {
    pub clients: Clients,
    pub progress: Option<Arc<ProgressSink>>,
    pub hooks: SharedHooks,
}

impl Default for Engine {
    fn default() -> Self {
        Engine { clients: Clients::new(), progress: None, hooks: Arc::new(NoHooks) }
    }
}

impl Engine {
    pub fn new() -> Engine {
        Engine::default()
    }

    pub fn with_progress(mut self, sink: Arc<ProgressSink>) -> Engine {
        self.progress = Some(sink);
        self
    }

    pub fn with_hooks(mut self, hooks: SharedHooks) -> Engine {
        self.hooks = hooks;
        self
    }

    pub fn with_clients(mut self, clients: Clients) -> Engine {
        self.clients = clients;
        self
    }
}
