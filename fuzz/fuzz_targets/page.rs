#![no_main]
//! See `nightjar::fuzzing::page` for the input format and the properties.
libfuzzer_sys::fuzz_target!(|data: &[u8]| nightjar::fuzzing::page(data));
