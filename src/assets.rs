//! `sitewire generate-assets --out DIR` (hidden): the man pages and shell completions
//! the Debian package ships, generated from the clap definition so they never drift
//! from the binary. Output is deterministic (no dates, sorted by clap's own order).
//!
//! Layout under DIR (mirrors where the package installs them):
//! `man/sitewire.1`, `man/sitewire-<subcommand>.1`, `completions/sitewire.bash`,
//! `completions/_sitewire` (zsh), `completions/sitewire.fish`.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

pub fn generate(out: &Path) -> Result<Vec<std::path::PathBuf>> {
    let man = out.join("man");
    let comp = out.join("completions");
    for d in [&man, &comp] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cmd = crate::cli::Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = cmd.clone();
        written.push(
            clap_complete::generate_to(shell, &mut cmd, "sitewire", &comp)
                .with_context(|| format!("writing {shell} completions"))?,
        );
    }
    let mut pages: Vec<_> = std::fs::read_dir(&man)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    pages.sort();
    written.extend(pages);
    Ok(written)
}
