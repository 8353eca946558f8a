//! Integration tests: the sandbox over real HTTP on loopback, real SQLite
//! files, and the real `nightjar` binary. One test binary (modules below)
//! so the release build links once.

mod cli;
mod fixture;
mod pipeline;
