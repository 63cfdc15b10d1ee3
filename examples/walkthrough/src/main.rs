//! `cargo run -p impersonation-walkthrough`: the terminal walkthrough of the
//! impersonation SDK on the in-memory store.

use std::io::IsTerminal;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let color = stdout.is_terminal();
    impersonation_walkthrough::run(&mut stdout.lock(), color).await
}
