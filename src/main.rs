//! The `keyward` binary: the operator CLI, and (`keyward agent`) the daemon itself.
//! The agent's modules are compiled in from agent/src so users need only this one binary.

#![forbid(unsafe_code)]

mod cli;

#[path = "../agent/src/lib.rs"]
#[allow(dead_code)]
mod keyward_agent;

fn main() -> std::process::ExitCode {
    cli::main()
}
