//! The `berth` binary: the command line lives in `berth::cli`.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    berth::cli::main()
}
