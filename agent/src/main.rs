//! `shardfarm-agent`: the node daemon.
use clap::Parser;

/// Shardfarm node agent: stores encrypted, erasure-coded shards and serves them over gRPC to
/// signed requests only. Every option can also be set with its SHARDFARM_* environment
/// variable or in the --config TOML file.
#[derive(Parser)]
#[command(name = "shardfarm-agent", version)]
struct Cli {
    #[command(flatten)]
    args: shardfarm_agent::AgentArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(shardfarm_agent::run::run(cli.args))
}
