//! The `berth` binary: the command line lives in `berth::cli`.

fn main() -> std::process::ExitCode {
    berth::cli::main()
}
