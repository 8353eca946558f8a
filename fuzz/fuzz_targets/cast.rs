#![no_main]
//! See `nightjar::fuzzing::casts` for the input format and the properties.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nightjar::fuzzing::casts(data));
