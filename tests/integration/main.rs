//! Integration tests: the sandbox over real HTTP on loopback, real SQLite
//! files, and the real `nightjar` binary. One test binary (modules below)
//! so the release build links once.

mod alerts;
mod cli;
mod crash;
mod extract;
mod files;
mod fixture;
mod fuzz_corpus;
mod history;
mod hostile;
mod locks;
mod mapping;
mod pipeline;
mod postgres;
mod salesforce;
mod serve;
mod target_values;
mod validate;
