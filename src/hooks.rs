//! Points in a run where a test may step in: the crash tests stop a run
//! there (and kill the process), the pipeline tests make a stage panic.
//!
//! Production code calls [`Hooks::reached`] at each point; the default
//! [`NoHooks`] does nothing. Only tests inject anything else (through the
//! run's engine context); no environment variable or global turns a hook on.

use std::sync::Arc;

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    /// Page `n` was downloaded and decoded.
    PageDownloaded(u32),
    /// Page `n` was mapped.
    PageMapped(u32),
    /// Page `n` is in the target's staging.
    PageStaged(u32),
    /// Inside the target's commit, everything written, just before it is made visible.
    BeforeCommit,
}

pub trait Hooks: Send + Sync {
    fn reached(&self, point: HookPoint);
}

/// What production runs with.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn reached(&self, _point: HookPoint) {}
}

/// The hooks of a run: shared by its pipeline tasks and its target.
pub type SharedHooks = Arc<dyn Hooks>;

pub fn none() -> SharedHooks {
    Arc::new(NoHooks)
}
