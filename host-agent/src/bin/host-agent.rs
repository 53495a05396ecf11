//! `host-agent --config FILE`: the host daemon (etcd desired state, gRPC API, DPU links, FRR
//! over FPM, Prometheus metrics). SIGTERM or SIGINT stop it cleanly.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use host_agent::daemon::{run, Config};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

#[derive(Debug, Parser)]
#[command(version, about = "dpucp host agent")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("host-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tx, rx) = watch::channel(false);
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("host-agent: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    match run(config, rx).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("host-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
