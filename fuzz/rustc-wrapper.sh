#!/bin/sh
# RUSTC_WRAPPER for the instrumented build: adds libFuzzer's coverage
# instrumentation (SanitizerCoverage) to nightjar and the fuzz targets only.
# Dependencies (Polars and the rest) compile as in any release build, so they
# are not recompiled for fuzzing; the fuzzer sees comparisons and branches in
# our code, which is the code under test.
rustc="$1"
shift
case "$CARGO_PKG_NAME" in
nightjar | nightjar-fuzz)
    case " $* " in
    *" --crate-name build_script_"*) ;;
    *)
        exec "$rustc" "$@" \
            -Cpasses=sancov-module \
            -Cllvm-args=-sanitizer-coverage-level=4 \
            -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
            -Cllvm-args=-sanitizer-coverage-pc-table \
            -Cllvm-args=-sanitizer-coverage-trace-compares \
            --cfg fuzzing
        ;;
    esac
    ;;
esac
exec "$rustc" "$@"
