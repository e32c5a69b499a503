//! Unix signals: SIGTERM/SIGINT start a graceful drain, SIGHUP reloads config and keys.
//! A reload that fails keeps the running configuration and logs why (with line/column).

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use super::dispatch::State;

pub async fn watch_signals(state: Arc<State>, shutdown: watch::Sender<bool>) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let st = state.clone();
                match tokio::task::spawn_blocking(move || st.reload()).await {
                    Ok(Ok(n)) => tracing::info!(keys = n, "reloaded on SIGHUP"),
                    Ok(Err(e)) => tracing::error!(code = e.code(), "reload failed, keeping the running configuration: {e}"),
                    Err(e) => tracing::error!("reload task failed: {e}"),
                }
            }
        }
    }
    tracing::info!("shutting down: draining in-flight requests");
    let _ = shutdown.send(true);
}
