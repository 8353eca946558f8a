//! nightjar: scheduled batch ETL from Salesforce (Bulk API 2.0) into warehouses.
//!
//! Each pipeline stage is a module that owns its types: `config` (files,
//! compiled into job plans), `salesforce` (the client and its page stream),
//! `transform` (mapping), `load` (targets and the merge), `state` (run
//! history and watermarks), `run` (the pipeline and the scheduler), `alert`
//! (emails), and `sandbox` (the local Salesforce emulator). The leaves
//! `schema`, `outcome`, `window`, `backoff` and `hooks` are shared by the
//! stages without tying them to each other. `commands` holds what the CLI
//! prints; `demo` is the guided tour.

pub mod alert;
pub mod backoff;
pub mod commands;
pub mod config;
pub mod demo;
pub mod fuzzing;
pub mod hooks;
pub mod load;
pub mod outcome;
pub mod run;
pub mod salesforce;
pub mod sandbox;
pub mod schema;
pub mod state;
pub mod transform;
pub mod window;
