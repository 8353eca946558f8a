#![no_main]
//! See `nightjar::fuzzing::soql_where`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nightjar::fuzzing::soql_where(data, nightjar::config::check_condition));
