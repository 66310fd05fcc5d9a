//! Command-line interface.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;
use crate::control::{self, Request, Response};
use crate::keys::PrivateKey;

#[derive(Parser)]
#[command(
    name = "sitewire",
    version,
    about = "Site-to-site tunnels: WireGuard and IPsec, keyed by IKEv2, watched by Prometheus"
)]
pub struct Cli {
    /// Log format for daemon output.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human, env = "SITEWIRE_LOG_FORMAT")]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "sitewire=debug".
    #[arg(long, global = true, default_value = "info", env = "SITEWIRE_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum CpuLanes {
    Auto,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// A site's configuration file, given as `-c FILE` or as just `FILE`.
#[derive(clap::Args)]
struct ConfigFile {
    /// The site's configuration file.
    #[arg(short, long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The site's configuration file (the same as -c FILE).
    #[arg(
        value_name = "FILE",
        conflicts_with = "config",
        required_unless_present = "config"
    )]
    file: Option<PathBuf>,
}

impl ConfigFile {
    fn path(self) -> PathBuf {
        // clap makes sure one of the two is given.
        self.config.or(self.file).unwrap_or_default()
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a site in the foreground (SIGINT/SIGTERM stop it cleanly).
    Up {
        #[command(flatten)]
        config: ConfigFile,
        /// Per-CPU UDP lanes for light traffic: with "auto", one socket and pinned thread
        /// per CPU (2 to 8 CPUs), so an idle round trip stays on one CPU; "off": one socket.
        #[arg(long, value_enum, default_value_t = CpuLanes::Auto, env = "SITEWIRE_CPU_LANES")]
        cpu_lanes: CpuLanes,
    },
    /// Validate a configuration file and list every problem found.
    Check {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Print a new private key (base64), like `wg genkey`.
    Keygen,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
    /// Show the state of a running site.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The site's configuration (to find its interface).
        #[arg(short, long, conflicts_with = "interface")]
        config: Option<PathBuf>,
        /// The site's interface; default: every site running on this host.
        #[arg(short, long)]
        interface: Option<String>,
    },
    /// Make a running site re-read its configuration and apply the difference.
    ///
    /// The new configuration is validated first; a bad one is refused with every problem
    /// and the running configuration stays. Unchanged tunnels keep their sessions.
    /// Same as SIGHUP (`systemctl reload`), but waits for the outcome.
    Reload {
        /// Configuration file to load; the daemon is found by its [site] interface.
        /// Default: the daemon re-reads the file it runs from.
        #[arg(short, long, conflicts_with = "interface")]
        config: Option<PathBuf>,
        /// The site's interface; default: every site running on this host.
        #[arg(short, long)]
        interface: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rekey an IKE-keyed tunnel now (a fresh key exchange and a new WireGuard PSK), or
    /// with --key rotate the site's static key held in Vault; switched over without
    /// dropping packets.
    Rotate {
        /// The tunnel (its [[tunnel]] name).
        #[arg(long, required_unless_present = "key", conflicts_with = "key")]
        tunnel: Option<String>,
        /// Rotate the site's static key (site.private_key = "vault:<path>").
        #[arg(long)]
        key: bool,
        #[arg(short, long, conflicts_with = "interface")]
        config: Option<PathBuf>,
        /// The site's interface; default: the only site running on this host.
        #[arg(short, long)]
        interface: Option<String>,
    },
    /// Troubleshoot a site: config, TUN, port, keys, DNS, routes, MTU, clock; each check
    /// prints ok/warn/fail with a one-line fix. Exits non-zero if any check fails.
    Doctor {
        #[command(flatten)]
        config: ConfigFile,
    },
    /// Keys in Vault / OpenBao.
    Vault {
        #[command(subcommand)]
        command: VaultCommand,
    },
    /// Write the man pages and shell completions (used to build the Debian package).
    #[command(hide = true)]
    GenerateAssets {
        /// Output directory (man/ and completions/ are created in it).
        #[arg(long)]
        out: PathBuf,
    },
    /// Two sites in network namespaces, traffic between them, status of both; then cleanup.
    Demo {
        /// Leave the namespaces and daemons running until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Traffic helpers used by `demo` inside its namespaces.
    #[command(hide = true)]
    Netprobe {
        #[command(subcommand)]
        probe: crate::netprobe::Probe,
    },
}

#[derive(Subcommand)]
enum VaultCommand {
    /// Bootstrap the site in Vault: generate its key, write it with a check-and-set write
    /// (an existing key is never overwritten), publish its public key and print the
    /// policy the site needs.
    Init {
        #[arg(short, long)]
        config: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid --log-level {filter:?}"))?;
    // Colours only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Up { config, cpu_lanes } => {
            let config = config.path();
            let lanes = matches!(cpu_lanes, CpuLanes::Auto);
            init_logging(cli.log_format, &cli.log_level)?;
            // On a worker, not the main thread: the daemon's timers then fire where
            // tokio's driver runs, without waking the main thread and the driver again
            // for each of them (an idle daemon: 8 wake-ups a second instead of 27).
            runtime()?.block_on(async move {
                tokio::spawn(async move { crate::daemon::up(&config, lanes).await })
                    .await
                    .context("the daemon task failed")?
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => Ok(check(&config.path())),
        Command::Keygen => {
            let k = PrivateKey::generate();
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", &*k.to_base64())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pubkey => {
            let mut text = zeroize::Zeroizing::new(String::new());
            std::io::stdin().take(4096).read_to_string(&mut text)?;
            match PrivateKey::from_base64(&text) {
                Ok(k) => {
                    println!("{}", k.public_key());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Status {
            json,
            config,
            interface,
        } => runtime()?.block_on(status(json, config, interface)),
        Command::Reload {
            config,
            interface,
            json,
        } => runtime()?.block_on(reload(config, interface, json)),
        Command::Rotate {
            tunnel,
            key,
            config,
            interface,
        } => runtime()?.block_on(rotate(tunnel, key, config, interface)),
        Command::Doctor { config } => {
            let ok = runtime()?.block_on(crate::doctor::main(&config.path()));
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Vault {
            command: VaultCommand::Init { config },
        } => {
            let cfg = Config::load(&config).map_err(|e| anyhow!("{}:\n{e}", config.display()))?;
            let o = runtime()?.block_on(crate::vault::init(&cfg))?;
            println!(
                "site {:?}: key written to {} (version {}, check-and-set: an existing key is never overwritten)",
                cfg.site.name, o.private_path, o.version
            );
            println!("public key {} published at {}", o.public_key, o.public_path);
            println!("\npolicy for this site:\n");
            print!("{}", o.policy);
            Ok(ExitCode::SUCCESS)
        }
        Command::GenerateAssets { out } => {
            for p in crate::assets::generate(&out)? {
                println!("{}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { keep } => {
            init_logging(cli.log_format, &cli.log_level)?;
            crate::demo::run(keep)
        }
        Command::Netprobe { probe } => crate::netprobe::run(probe),
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(cfg) => {
            println!(
                "{}: ok (site {:?}, {} tunnel{})",
                path.display(),
                cfg.site.name,
                cfg.tunnels.len(),
                if cfg.tunnels.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!(
                "{}: {} problem{}:",
                path.display(),
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" }
            );
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The `[site] interface` of a config file, read leniently (so that a file with errors
/// still finds its daemon, which then reports the errors).
fn interface_of(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let iface = toml::from_str::<toml::Table>(&text).ok().and_then(|t| {
        t.get("site")?
            .get("interface")?
            .as_str()
            .map(str::to_string)
    });
    match iface {
        Some(i) => Ok(i),
        None => {
            let problems = match Config::load(path) {
                Err(e) => e.to_string(),
                Ok(_) => String::new(),
            };
            bail!(
                "{}: cannot tell which site to reload (no [site] interface):\n{problems}",
                path.display()
            )
        }
    }
}

fn running_sockets() -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(control::CONTROL_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    if v.is_empty() {
        bail!("no running sitewire site found in {}", control::CONTROL_DIR);
    }
    Ok(v)
}

/// One site's answer as a JSON object, several sites' as an array.
fn print_json<T: serde::Serialize>(answers: &[T]) -> Result<()> {
    let v = match answers {
        [one] => serde_json::to_string_pretty(one)?,
        all => serde_json::to_string_pretty(all)?,
    };
    println!("{v}");
    Ok(())
}

async fn reload(
    config: Option<PathBuf>,
    interface: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let (sockets, file) = match (config, interface) {
        (Some(c), _) => {
            let c = std::path::absolute(&c).unwrap_or(c);
            (
                vec![control::control_socket_path(&interface_of(&c)?)],
                Some(c),
            )
        }
        (None, Some(i)) => (vec![control::control_socket_path(&i)], None),
        (None, None) => (running_sockets()?, None),
    };
    let mut ok = true;
    let mut outcomes = Vec::new();
    for s in &sockets {
        let req = Request::Reload {
            config: file.clone(),
        };
        match control::request(s, &req).await? {
            Response::Reload(o) => {
                ok &= o.applied;
                if !json {
                    print!("{}", o.render());
                }
                outcomes.push(*o);
            }
            Response::Error(e) => bail!("daemon at {}: {e}", s.display()),
            other => bail!("daemon at {}: unexpected answer {other:?}", s.display()),
        }
    }
    if json {
        print_json(&outcomes)?;
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn rotate(
    tunnel: Option<String>,
    key: bool,
    config: Option<PathBuf>,
    interface: Option<String>,
) -> Result<ExitCode> {
    let socket = match (config, interface) {
        (Some(c), _) => control::control_socket_path(&interface_of(&c)?),
        (None, Some(i)) => control::control_socket_path(&i),
        (None, None) => match running_sockets()?.as_slice() {
            [one] => one.clone(),
            _ => bail!("several sites run here: name one with --interface or --config"),
        },
    };
    let req = match tunnel {
        Some(tunnel) if !key => Request::Rotate { tunnel },
        _ => Request::RotateKey,
    };
    match control::request(&socket, &req).await? {
        Response::Ok(msg) => {
            println!("{msg}");
            Ok(ExitCode::SUCCESS)
        }
        Response::Error(e) => bail!("{e}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

async fn status(
    json: bool,
    config: Option<PathBuf>,
    interface: Option<String>,
) -> Result<ExitCode> {
    let sockets: Vec<PathBuf> = if let Some(cfg) = config {
        let cfg = Config::load(&cfg).map_err(|e| anyhow::anyhow!("{}:\n{e}", cfg.display()))?;
        vec![control::control_socket_path(&cfg.site.interface)]
    } else if let Some(i) = interface {
        vec![control::control_socket_path(&i)]
    } else {
        let mut v: Vec<PathBuf> = std::fs::read_dir(control::CONTROL_DIR)
            .map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        if v.is_empty() {
            bail!("no running sitewire site found in {}", control::CONTROL_DIR);
        }
        v
    };
    let mut all = Vec::new();
    for s in &sockets {
        match control::request(s, &Request::Status).await? {
            Response::Status(st) => all.push(*st),
            Response::Error(e) => bail!("daemon at {}: {e}", s.display()),
            other => bail!("daemon at {}: unexpected answer {other:?}", s.display()),
        }
    }
    if json {
        print_json(&all)?;
    } else {
        for st in &all {
            print!("{}", st.render());
        }
    }
    Ok(ExitCode::SUCCESS)
}
