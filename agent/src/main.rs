//! `keyward-agent`: the daemon as its own binary (the same code as `keyward agent`).
//! Thin: parse arguments, call `keyward_agent::run`, report errors with their stable code.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "keyward-agent",
    version,
    about = "keyward signing agent (foreground)"
)]
struct Cli {
    /// keyward home (default: $KEYWARD_HOME, else ~/.keyward).
    #[arg(long, value_name = "DIR")]
    home: Option<std::path::PathBuf>,
    #[command(flatten)]
    opts: keyward_agent::Options,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = keyward_agent::run(cli.home, cli.opts) {
        eprintln!("error[{}]: {e}\n  hint: {}", e.code(), e.hint());
        std::process::exit(1);
    }
}
