//! nightjar: scheduled batch ETL from Salesforce (Bulk API 2.0) into warehouses.
//!
//! Each pipeline stage is a module that owns its types: `config` (files),
//! `salesforce` (the client), `transform` (mapping), `load` (targets),
//! `state` (run history and watermarks), `run` (the pipeline), and
//! `sandbox` (the local Salesforce emulator). `commands` holds what the CLI
//! prints; `demo` is the guided tour.

pub mod alert;
pub mod commands;
pub mod config;
pub mod demo;
pub mod load;
pub mod run;
pub mod salesforce;
pub mod sandbox;
pub mod state;
pub mod transform;
