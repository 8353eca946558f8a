#![no_main]
//! See `nightjar::fuzzing::sql` for the input format and the properties.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nightjar::fuzzing::sql(data));
