//! `sitewire demo`: two sites in network namespaces, traffic between them, status of
//! both, then everything removed again (also on Ctrl-C).
//!
//! Topology (nothing touches the root namespace, neither namespace has a default route):
//! ```text
//!  swdemo-lab                                        swdemo-branch
//!  VM subnet 10.10.0.1/24 (lo)                       branch subnet 192.168.50.1/24 (lo)
//!  TUN swdemo-lab0 <- sitewire -> veth 198.18.0.1 == 198.18.0.2 veth <- sitewire -> TUN swdemo-br0
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::control::{self, Request, Response};
use crate::keys::{write_secret_file, PrivateKey};
use crate::netprobe::{PingResult, TransferResult};

const NS_LAB: &str = "swdemo-lab";
const NS_BRANCH: &str = "swdemo-branch";
const IF_LAB: &str = "swdemo-lab0";
const IF_BRANCH: &str = "swdemo-br0";
const UNDER_LAB: &str = "198.18.0.1";
const UNDER_BRANCH: &str = "198.18.0.2";
const HOST_LAB: &str = "10.10.0.1";
const HOST_BRANCH: &str = "192.168.50.1";

/// What the demo created, removed by `teardown` whatever happens.
#[derive(Default)]
struct World {
    namespaces: Vec<&'static str>,
    daemons: Vec<Child>,
    dir: Option<PathBuf>,
}

impl World {
    fn teardown(&mut self) {
        for d in &mut self.daemons {
            // Our own children, by PID.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for d in &mut self.daemons {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = d.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
        self.daemons.clear();
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn site_config(
    name: &str,
    iface: &str,
    peer: &str,
    peer_pub: &str,
    peer_endpoint: &str,
    local: &str,
    remote: &str,
) -> String {
    format!(
        r#"# written by `sitewire demo`
[site]
name = "{name}"
interface = "{iface}"
listen_port = 51820
private_key = "{name}.key"

[[tunnel]]
name = "{peer}"
peer_public_key = "{peer_pub}"
endpoint = ["{peer_endpoint}:51820"]
local_subnets = ["{local}"]
remote_subnets = ["{remote}"]
persistent_keepalive = "25s"
"#
    )
}

fn self_exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating the sitewire binary")
}

fn in_ns(ns: &str, args: &[&str]) -> Result<std::process::Output> {
    let exe = self_exe()?;
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running sitewire {} in {ns}", args.join(" ")))
}

fn status_of(iface: &str, rt: &tokio::runtime::Runtime) -> Result<crate::status::SiteStatus> {
    match rt.block_on(control::request(
        &control::control_socket_path(iface),
        &Request::Status,
    ))? {
        Response::Status(s) => Ok(*s),
        Response::Error(e) => bail!("{e}"),
        other => bail!("unexpected answer from the daemon: {other:?}"),
    }
}

pub fn run(keep: bool) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces and TUN devices: run it as root");
    }
    for ns in [NS_LAB, NS_BRANCH] {
        if Path::new("/run/netns").join(ns).exists() {
            bail!("network namespace {ns} already exists (a demo still running?); remove it with `ip netns delete {ns}`");
        }
    }
    let world = Arc::new(Mutex::new(World::default()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    {
        let world = world.clone();
        rt.spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            eprintln!("\ninterrupted: removing the demo's namespaces and daemons");
            world.lock().unwrap_or_else(|p| p.into_inner()).teardown();
            std::process::exit(130);
        });
    }
    let result = demo(&world, &rt, keep);
    if keep && result.is_ok() {
        println!("\n--keep: sites stay up; press Ctrl-C to remove them");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    world.lock().unwrap_or_else(|p| p.into_inner()).teardown();
    println!("demo cleaned up: namespaces, daemons, keys removed");
    result.map(|()| ExitCode::SUCCESS)
}

fn demo(world: &Arc<Mutex<World>>, rt: &tokio::runtime::Runtime, keep: bool) -> Result<()> {
    let w = || world.lock().unwrap_or_else(|p| p.into_inner());
    println!("== sitewire demo: lab (10.10.0.0/24) <== WireGuard ==> branch (192.168.50.0/24)");
    for ns in [NS_LAB, NS_BRANCH] {
        ip(&["netns", "add", ns])?;
        w().namespaces.push(ns);
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    ip(&[
        "-n",
        NS_LAB,
        "link",
        "add",
        "swdemo-v0",
        "type",
        "veth",
        "peer",
        "name",
        "swdemo-v1",
        "netns",
        NS_BRANCH,
    ])?;
    ip(&[
        "-n",
        NS_LAB,
        "addr",
        "add",
        &format!("{UNDER_LAB}/24"),
        "dev",
        "swdemo-v0",
    ])?;
    ip(&[
        "-n",
        NS_BRANCH,
        "addr",
        "add",
        &format!("{UNDER_BRANCH}/24"),
        "dev",
        "swdemo-v1",
    ])?;
    ip(&["-n", NS_LAB, "link", "set", "swdemo-v0", "up"])?;
    ip(&["-n", NS_BRANCH, "link", "set", "swdemo-v1", "up"])?;
    ip(&[
        "-n",
        NS_LAB,
        "addr",
        "add",
        &format!("{HOST_LAB}/24"),
        "dev",
        "lo",
    ])?;
    ip(&[
        "-n",
        NS_BRANCH,
        "addr",
        "add",
        &format!("{HOST_BRANCH}/24"),
        "dev",
        "lo",
    ])?;
    println!("namespaces {NS_LAB} and {NS_BRANCH} joined by a veth pair ({UNDER_LAB} <-> {UNDER_BRANCH})");

    let dir = std::env::temp_dir().join(format!("sitewire-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    w().dir = Some(dir.clone());
    let lab_key = PrivateKey::generate();
    let branch_key = PrivateKey::generate();
    write_secret_file(&dir.join("lab.key"), &lab_key.to_base64())?;
    write_secret_file(&dir.join("branch.key"), &branch_key.to_base64())?;
    let lab_cfg = dir.join("lab.toml");
    let branch_cfg = dir.join("branch.toml");
    std::fs::write(
        &lab_cfg,
        site_config(
            "lab",
            IF_LAB,
            "branch",
            &branch_key.public_key().to_base64(),
            UNDER_BRANCH,
            "10.10.0.0/24",
            "192.168.50.0/24",
        ),
    )?;
    std::fs::write(
        &branch_cfg,
        site_config(
            "branch",
            IF_BRANCH,
            "lab",
            &lab_key.public_key().to_base64(),
            UNDER_LAB,
            "192.168.50.0/24",
            "10.10.0.0/24",
        ),
    )?;
    println!("keys generated; configs in {}", dir.display());

    let exe = self_exe()?;
    for (ns, cfg, name) in [
        (NS_LAB, &lab_cfg, "lab"),
        (NS_BRANCH, &branch_cfg, "branch"),
    ] {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&exe)
            .arg("up")
            .arg("-c")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a site daemon")?;
        w().daemons.push(child);
    }

    // Wait for both control sockets and a completed handshake.
    let t0 = Instant::now();
    let up = loop {
        if let (Ok(a), Ok(b)) = (status_of(IF_LAB, rt), status_of(IF_BRANCH, rt)) {
            if a.tunnels.iter().chain(&b.tunnels).all(|t| t.state == "up") {
                break true;
            }
        }
        for d in &mut w().daemons {
            if let Ok(Some(st)) = d.try_wait() {
                let logs = std::fs::read_to_string(dir.join("lab.log")).unwrap_or_default()
                    + &std::fs::read_to_string(dir.join("branch.log")).unwrap_or_default();
                bail!("a site daemon exited ({st}):\n{logs}");
            }
        }
        if t0.elapsed() > Duration::from_secs(15) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !up {
        bail!(
            "tunnel did not come up within 15 s; logs in {}",
            dir.display()
        );
    }
    println!(
        "tunnel up after {:.0} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );

    let out = in_ns(
        NS_LAB,
        &[
            "netprobe",
            "ping",
            "--from",
            HOST_LAB,
            "--to",
            HOST_BRANCH,
            "--count",
            "10",
        ],
    )?;
    let ping: PingResult = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ping probe: {}", String::from_utf8_lossy(&out.stderr)))?;
    let (min, avg, max) = rtt_summary(&ping.rtt_ms);
    println!(
        "ping {HOST_LAB} -> {HOST_BRANCH} through the tunnel: {}/{} replies, rtt min/avg/max {min:.3}/{avg:.3}/{max:.3} ms",
        ping.received, ping.sent
    );

    let sink_addr = format!("{HOST_BRANCH}:5201");
    let sink = Command::new("ip")
        .args(["netns", "exec", NS_BRANCH])
        .arg(&exe)
        .args(["netprobe", "sink", "--listen", &sink_addr])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(200));
    let sent = in_ns(
        NS_LAB,
        &[
            "netprobe", "send", "--from", HOST_LAB, "--to", &sink_addr, "--secs", "3",
        ],
    )?;
    let received = sink.wait_with_output()?;
    let sent: TransferResult = serde_json::from_slice(&sent.stdout)
        .with_context(|| format!("tcp sender: {}", String::from_utf8_lossy(&sent.stderr)))?;
    let received: TransferResult = serde_json::from_slice(&received.stdout).context("tcp sink")?;
    println!(
        "TCP {HOST_LAB} -> {sink_addr}: {:.1} MB in {:.1} s = {:.0} Mbit/s (received {:.1} MB)",
        sent.bytes as f64 / 1e6,
        sent.secs,
        sent.bytes as f64 * 8.0 / sent.secs / 1e6,
        received.bytes as f64 / 1e6
    );

    println!();
    for iface in [IF_LAB, IF_BRANCH] {
        print!("{}", status_of(iface, rt)?.render());
        println!();
    }
    if ping.received == 0 || received.bytes == 0 {
        bail!(
            "no traffic made it through the tunnel; logs in {}",
            dir.display()
        );
    }
    if !keep {
        println!("stopping both sites");
    }
    Ok(())
}

fn rtt_summary(v: &[f64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(0.0, f64::max);
    (min, v.iter().sum::<f64>() / v.len() as f64, max)
}
