#![no_main]
//! See `nightjar::fuzzing::soql_where`. Registered in ../Cargo.toml once
//! `nightjar::config::check_condition` (the `validate` branch) is merged.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nightjar::fuzzing::soql_where(data, nightjar::config::check_condition));
