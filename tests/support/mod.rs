//! Network-namespace harness for sitewire integration tests.
//!
//! Every [`Topo`] builds its own two-site world out of two fresh network namespaces joined by a
//! veth pair (created inside the namespaces, the root namespace is never touched) and tears it
//! down again in `Drop`, which also runs while a failing test unwinds. Names carry a unique short
//! prefix so tests can run in parallel.
//!
//! ```text
//!   ns "{p}a"                                            ns "{p}b"
//!   lo: host_a (subnet_a, "VM subnet")                    lo: host_b (subnet_b, "branch subnet")
//!   {p}va underlay_a/24  <------------ veth ------------>  {p}vb underlay_b/24
//! ```
//!
//! Rules the harness enforces: traffic only inside the namespaces it made, processes are stopped
//! by their own PID only (never by name), and a missing prerequisite fails the test under
//! `CI=true` and prints `SKIP: ...` otherwise (see [`prereq`]).
//!
//! If a test process is killed outright (SIGKILL, so no unwinding), its namespaces are left
//! behind; the next `Topo::new` sweeps them using the state files in [`STATE_DIR`].
#![allow(dead_code, unused_imports)]

pub mod site;
pub mod strongswan;
pub mod traffic;
pub mod wg;

pub use traffic::{answered_seqs, parse_ping, IperfResult, PingStats};
pub use wg::{parse_wg_dump, wg_genkey, within_connected, WgPeer};

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where wireguard-go, `wg` and sitewire keep UAPI sockets (shared by all namespaces).
pub const UAPI_DIR: &str = "/var/run/wireguard";
/// Where sitewire keeps its control sockets (`<interface>.sock`).
pub const CONTROL_DIR: &str = "/run/sitewire";
/// Per-topology state files (owner PID + spawned PIDs) used to sweep after a killed test run.
pub const STATE_DIR: &str = "/run/sitewire-tests";
/// Default timeout of [`Topo::exec`].
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);
/// Maximum Linux interface name length.
pub const IFNAMSIZ_MAX: usize = 15;

// ---------------------------------------------------------------------------------------------
// prerequisites
// ---------------------------------------------------------------------------------------------

/// True when the environment says we are running in CI (`CI=true` or `CI=1`).
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Ok("true") | Ok("1")
    )
}

/// A prerequisite is missing: panic under CI, otherwise print `SKIP: <why>` and return false.
/// Tests use it as `if !support::skip_or_fail("...") { return; }` for their own checks.
pub fn skip_or_fail(why: &str) -> bool {
    if in_ci() {
        panic!("missing test prerequisite (CI=true, so this is a failure): {why}");
    }
    eprintln!("SKIP: {why}");
    false
}

/// Checks root, usable `ip netns`, `/dev/net/tun` and each named binary on PATH.
/// Returns true when everything is there. Otherwise see [`skip_or_fail`].
///
/// ```ignore
/// if !support::prereq(&["ping", "wireguard-go", "wg"]) { return; }
/// ```
pub fn prereq(what: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (euid 0)".to_string());
    }
    if find_in_path("ip").is_none() {
        missing.push("binary `ip` (apt: iproute2)".to_string());
    } else {
        match Command::new("ip").args(["netns", "list"]).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => missing.push(format!(
                "`ip netns` usable ({})",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => missing.push(format!("`ip netns` usable ({e})")),
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_string());
    }
    for bin in what {
        if find_in_path(bin).is_none() {
            missing.push(format!(
                "binary `{bin}` on PATH (run scripts/install-test-deps.sh)"
            ));
        }
    }
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(&format!("needs {}", missing.join(", ")))
}

/// Full path of `bin` if it is an executable file in a PATH directory.
pub fn find_in_path(bin: &str) -> Option<PathBuf> {
    if bin.contains('/') {
        let p = PathBuf::from(bin);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(bin))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------------------------

/// Path of the `sitewire` binary cargo built for this integration test.
pub fn sitewire_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sitewire")
}

/// Polls `f` every `poll` until it returns true (-> true) or `timeout` passes (-> false).
/// `f` is always called at least once, and once more right at the deadline.
pub fn wait_until(timeout: Duration, poll: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(poll.min(deadline - now));
    }
}

/// Writes `contents` to `path` with mode 0600 (also fixing the mode of an existing file).
pub fn write_file_0600(path: impl AsRef<Path>, contents: impl AsRef<[u8]>) {
    let path = path.as_ref();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 0600 {}: {e}", path.display()));
    f.write_all(contents.as_ref())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A free TCP port on 127.0.0.1 right now (for loopback listeners such as /metrics).
pub fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Does the named network namespace exist (`/run/netns/NAME`)?
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Names of existing network namespaces starting with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

/// `ip netns exec NS cmd...` as a Command (not started).
pub fn netns_command(ns: &str, cmd: &[&str]) -> Command {
    assert!(!cmd.is_empty(), "empty command");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(cmd);
    c
}

/// Runs `c` with stdin closed, collecting stdout/stderr. Kills it (by its own PID) and returns
/// None if it has not exited after `timeout`.
pub fn output_with_timeout(mut c: Command, timeout: Duration) -> Option<Output> {
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {c:?}: {e}"));
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out_pipe.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err_pipe.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait for {c:?}: {e}"),
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs a command in the root namespace (only for things that send no traffic, like `wg genkey`)
/// and returns its stdout; panics with stderr on failure.
pub fn host_exec_ok(cmd: &[&str], stdin: Option<&str>) -> String {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin pipe")
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("write stdin of {cmd:?}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Start time of a process (field 22 of /proc/PID/stat, clock ticks since boot): with the PID it
/// identifies one process, so a recycled PID is never mistaken for ours.
pub fn proc_starttime(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may contain spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// processes
// ---------------------------------------------------------------------------------------------

/// A process started by the harness (usually inside a namespace via `ip netns exec`, which
/// execs the command, so `pid` is the command's own PID). All signals go to that PID only, and
/// only while the child has not been reaped (so a recycled PID is never signalled).
#[derive(Clone)]
pub struct Proc {
    pub pid: u32,
    pub name: String,
    pub log_path: PathBuf,
    child: Arc<Mutex<Child>>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Proc({} pid {})", self.name, self.pid)
    }
}

impl Proc {
    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of [`Proc::log`].
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Sends `sig` (libc::SIGTERM, SIGKILL, SIGSTOP, SIGCONT, SIGHUP, ...) to this process.
    /// Returns false if it has already exited (nothing is sent then).
    pub fn signal(&self, sig: i32) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        // SAFETY: kill(2) on the PID of our own unreaped child; the lock keeps it unreaped.
        unsafe { libc::kill(self.pid as libc::pid_t, sig) == 0 }
    }

    /// Waits up to `timeout` for the process to exit; its status, or None if still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
                match child.try_wait() {
                    Ok(Some(st)) => return Some(st),
                    Ok(None) => {}
                    Err(e) => panic!("wait for {self:?}: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Has the process not exited yet? (A SIGSTOPped process is alive.)
    pub fn alive(&self) -> bool {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        matches!(child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; returns the exit status.
    /// A stopped (SIGSTOP) process is continued first so it can handle SIGTERM.
    pub fn stop(&self, grace: Duration) -> ExitStatus {
        if self.signal(libc::SIGTERM) {
            self.signal(libc::SIGCONT);
        }
        if let Some(st) = self.wait_exit(grace) {
            return st;
        }
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{self:?} survived SIGKILL"))
    }
}

// ---------------------------------------------------------------------------------------------
// topology
// ---------------------------------------------------------------------------------------------

/// Which site of a [`Topo`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    A,
    B,
}

/// Two namespaces joined by a veth pair, each with a site subnet on `lo`. See the module docs.
pub struct Topo {
    /// Unique short prefix of every name this topology creates ("sw" + 4 hex digits).
    pub prefix: String,
    /// What the test called it (only for messages).
    pub tag: String,
    /// Unique number behind the prefix; also used for ports.
    pub id: u32,
    pub ns_a: String,
    pub ns_b: String,
    /// veth ends: `{p}va` in ns_a, `{p}vb` in ns_b.
    pub veth_a: String,
    pub veth_b: String,
    pub underlay_a: Ipv4Addr,
    pub underlay_b: Ipv4Addr,
    /// Site a "VM subnet" (on lo of ns_a), CIDR such as "10.213.1.0/24".
    pub subnet_a: String,
    /// Site b "branch subnet" (on lo of ns_b).
    pub subnet_b: String,
    /// The .1 address of subnet_a, configured on lo in ns_a.
    pub host_a: Ipv4Addr,
    /// The .1 address of subnet_b, configured on lo in ns_b.
    pub host_b: Ipv4Addr,
    /// Suggested tunnel (overlay) addresses, not configured: 10.X.3.1 / 10.X.3.2 in a /24.
    pub overlay_a: Ipv4Addr,
    pub overlay_b: Ipv4Addr,
    tempdir: PathBuf,
    state_file: PathBuf,
    procs: Mutex<Vec<Proc>>,
    spawn_seq: AtomicU32,
}

static TOPO_COUNTER: AtomicU32 = AtomicU32::new(0);

fn random_u64(salt: u32) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u32(salt);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.finish()
}

impl Topo {
    /// Builds the two-site topology. Panics (with the failing command) if it cannot; call
    /// [`prereq`] first so a machine without root/netns skips or fails cleanly.
    pub fn new(tag: &str) -> Topo {
        sweep_stale();
        let (prefix, id, state_file) = claim_prefix();
        let octet = 200 + (id % 50) as u8; // 10.200.x.x .. 10.249.x.x
        let tempdir = std::env::temp_dir().join(format!("sitewire-test-{prefix}"));
        let topo = Topo {
            ns_a: format!("{prefix}a"),
            ns_b: format!("{prefix}b"),
            veth_a: format!("{prefix}va"),
            veth_b: format!("{prefix}vb"),
            underlay_a: Ipv4Addr::new(10, octet, 0, 1),
            underlay_b: Ipv4Addr::new(10, octet, 0, 2),
            subnet_a: format!("10.{octet}.1.0/24"),
            subnet_b: format!("10.{octet}.2.0/24"),
            host_a: Ipv4Addr::new(10, octet, 1, 1),
            host_b: Ipv4Addr::new(10, octet, 2, 1),
            overlay_a: Ipv4Addr::new(10, octet, 3, 1),
            overlay_b: Ipv4Addr::new(10, octet, 3, 2),
            prefix,
            tag: tag.to_string(),
            id,
            tempdir,
            state_file,
            procs: Mutex::new(Vec::new()),
            spawn_seq: AtomicU32::new(0),
        };
        // From here on Drop cleans up whatever part got built.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&topo.tempdir)
            .unwrap_or_else(|e| panic!("create {}: {e}", topo.tempdir.display()));
        topo.setup();
        topo
    }

    fn setup(&self) {
        let (a, b) = (self.ns_a.as_str(), self.ns_b.as_str());
        for ns in [a, b] {
            host_run(&["ip", "netns", "add", ns]);
        }
        // Both veth ends are created inside the namespaces: the root namespace is never touched.
        host_run(&[
            "ip",
            "-n",
            a,
            "link",
            "add",
            &self.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &self.veth_b,
            "netns",
            b,
        ]);
        let sides = [
            (a, &self.veth_a, self.underlay_a, self.host_a),
            (b, &self.veth_b, self.underlay_b, self.host_b),
        ];
        for (ns, veth, ul, host) in sides {
            for key in ["all", "default"] {
                host_run(&[
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
                ]);
            }
            host_run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            host_run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{host}/24"),
                "dev",
                "lo",
            ]);
            host_run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ul}/24"),
                "dev",
                veth,
            ]);
            host_run(&["ip", "-n", ns, "link", "set", veth, "up"]);
        }
    }

    /// Namespace name of a site.
    pub fn ns(&self, site: Site) -> &str {
        match site {
            Site::A => &self.ns_a,
            Site::B => &self.ns_b,
        }
    }

    /// `prefix + suffix`, for interface names (UAPI sockets of all namespaces share one
    /// directory, so tunnel interfaces must carry the prefix). Panics past 15 characters.
    pub fn ifname(&self, suffix: &str) -> String {
        let n = format!("{}{}", self.prefix, suffix);
        assert!(
            n.len() <= IFNAMSIZ_MAX,
            "interface name {n:?} is longer than {IFNAMSIZ_MAX} characters"
        );
        n
    }

    /// A port unique to this topology (`n` < 16 picks one of its 16 ports).
    pub fn port(&self, n: u16) -> u16 {
        assert!(n < 16);
        20000 + ((self.id % 2500) as u16) * 16 + n
    }

    /// Per-topology temp dir (mode 0700), removed on drop (kept if SITEWIRE_KEEP_TEST_DIRS=1).
    pub fn tempdir(&self) -> PathBuf {
        self.tempdir.clone()
    }

    /// Starts `cmd` in `ns` (via `ip netns exec`), stdout+stderr to `<tempdir>/<name>.log`,
    /// registered for cleanup when the topology is dropped.
    pub fn spawn(&self, ns: &str, name: &str, cmd: &[&str]) -> Proc {
        self.spawn_env(ns, name, &[], cmd)
    }

    /// Like [`Topo::spawn`] with extra environment variables.
    pub fn spawn_env(&self, ns: &str, name: &str, env: &[(&str, &str)], cmd: &[&str]) -> Proc {
        let seq = self.spawn_seq.fetch_add(1, Ordering::Relaxed);
        let log_path = self.tempdir.join(format!("{seq:02}-{name}.log"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("dup log fd");
        let mut c = netns_command(ns, cmd);
        c.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = c
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}) in {ns}: {e}"));
        let proc = Proc {
            pid: child.id(),
            name: name.to_string(),
            log_path,
            child: Arc::new(Mutex::new(child)),
        };
        if let Some(st) = proc_starttime(proc.pid) {
            let _ = fs::OpenOptions::new()
                .append(true)
                .open(&self.state_file)
                .and_then(|mut f| writeln!(f, "child {} {st}", proc.pid));
        }
        self.procs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(proc.clone());
        proc
    }

    /// Runs `cmd` in `ns` and returns its output (panics if it runs longer than 120 s).
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        self.exec_timeout(ns, cmd, EXEC_TIMEOUT)
            .unwrap_or_else(|| panic!("{cmd:?} in {ns} still running after {EXEC_TIMEOUT:?}"))
    }

    /// Runs `cmd` in `ns`; None (after killing it) if it has not exited within `timeout`.
    pub fn exec_timeout(&self, ns: &str, cmd: &[&str], timeout: Duration) -> Option<Output> {
        output_with_timeout(netns_command(ns, cmd), timeout)
    }

    /// Runs `cmd` in `ns`, returns stdout; panics with stderr if it fails.
    pub fn exec_ok(&self, ns: &str, cmd: &[&str]) -> String {
        let out = self.exec(ns, cmd);
        if !out.status.success() {
            panic!(
                "{cmd:?} in {ns} failed ({}):\nstdout: {}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Processes registered so far.
    pub fn procs(&self) -> Vec<Proc> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn teardown(&mut self) {
        let panicking = std::thread::panicking();
        let procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|p| p.into_inner()));
        // SIGTERM everything first, then give all of them 3 s together.
        for p in &procs {
            if p.signal(libc::SIGTERM) {
                p.signal(libc::SIGCONT);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for p in &procs {
            let left = deadline.saturating_duration_since(Instant::now());
            if p.wait_exit(left).is_none() {
                eprintln!(
                    "topo {}: {p:?} ignored SIGTERM for 3 s, SIGKILL",
                    self.prefix
                );
                p.signal(libc::SIGKILL);
                let _ = p.wait_exit(Duration::from_secs(5));
            }
        }
        if panicking {
            for p in &procs {
                eprintln!(
                    "---- topo {} ({}) log of {p:?} ({}), last 40 lines ----\n{}",
                    self.prefix,
                    self.tag,
                    p.log_path.display(),
                    p.log_tail(40)
                );
            }
        }
        for ns in [&self.ns_a, &self.ns_b] {
            if netns_exists(ns) {
                // Processes we did not start (e.g. grandchildren of a registered one) are not
                // killed; they keep the namespace alive after `ip netns del`, so say so.
                if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                    let pids = String::from_utf8_lossy(&o.stdout).split_whitespace().fold(
                        String::new(),
                        |acc, pid| {
                            let comm =
                                fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                            format!("{acc} {pid}({})", comm.trim())
                        },
                    );
                    if !pids.is_empty() {
                        eprintln!(
                            "topo {}: unregistered processes left in {ns} (not killed):{pids}",
                            self.prefix
                        );
                    }
                }
                let out = Command::new("ip").args(["netns", "del", ns]).output();
                if let Ok(o) = out {
                    if !o.status.success() {
                        eprintln!(
                            "topo {}: ip netns del {ns}: {}",
                            self.prefix,
                            String::from_utf8_lossy(&o.stderr).trim()
                        );
                    }
                }
            }
        }
        remove_uapi_sockets(&self.prefix);
        if std::env::var_os("SITEWIRE_KEEP_TEST_DIRS").is_some() {
            eprintln!("topo {}: keeping {}", self.prefix, self.tempdir.display());
        } else {
            let _ = fs::remove_dir_all(&self.tempdir);
        }
        let _ = fs::remove_file(&self.state_file);
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl std::fmt::Debug for Topo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Topo({} {}: {} {}/{} <-> {} {}/{})",
            self.tag,
            self.prefix,
            self.ns_a,
            self.underlay_a,
            self.subnet_a,
            self.ns_b,
            self.underlay_b,
            self.subnet_b
        )
    }
}

/// Runs a setup command in the root namespace context (only `ip netns add/del`, `ip -n ...`,
/// which operate on our namespaces); panics with its stderr on failure.
fn host_run(cmd: &[&str]) {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{} failed ({}): {}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

/// Removes `<prefix>*.sock` from the UAPI and sitewire control socket directories (left behind
/// when a daemon is SIGKILLed; interface names carry the topology prefix).
fn remove_uapi_sockets(prefix: &str) {
    for dir in [UAPI_DIR, CONTROL_DIR] {
        let Ok(rd) = fs::read_dir(dir) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(prefix) && n.ends_with(".sock") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Picks an unused prefix and atomically claims it by creating its state file (O_EXCL).
fn claim_prefix() -> (String, u32, PathBuf) {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(STATE_DIR)
        .unwrap_or_else(|e| panic!("create {STATE_DIR}: {e}"));
    let me = std::process::id();
    let my_start = proc_starttime(me).unwrap_or(0);
    for _ in 0..1000 {
        let salt = TOPO_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = (random_u64(salt) & 0xffff) as u32;
        let prefix = format!("sw{id:04x}");
        let state_file = Path::new(STATE_DIR).join(format!("{prefix}.state"));
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&state_file);
        let Ok(mut f) = f else { continue };
        let busy = !netns_with_prefix(&prefix).is_empty()
            || fs::read_dir(UAPI_DIR)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                })
                .unwrap_or(false);
        if busy {
            // Something we do not own uses the name; leave it alone (and keep our claim file
            // out of the way).
            drop(f);
            let _ = fs::remove_file(&state_file);
            continue;
        }
        writeln!(f, "owner {me} {my_start}").expect("write state file");
        return (prefix, id, state_file);
    }
    panic!("could not find a free topology prefix in 1000 tries");
}

/// Removes what topologies of test processes that died without unwinding left behind: for each
/// state file whose owner process is gone, SIGKILL its recorded children (PID and start time must
/// both match, so only processes the harness started are hit), delete its namespaces, UAPI
/// sockets, temp dir and the state file.
pub fn sweep_stale() {
    let Ok(rd) = fs::read_dir(STATE_DIR) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let path = e.path();
        let Some(prefix) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".state"))
            .map(str::to_string)
        else {
            continue;
        };
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let mut owner_alive = false;
        let mut have_owner = false;
        let mut children = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 3 {
                continue;
            }
            let (Ok(pid), Ok(st)) = (f[1].parse::<u32>(), f[2].parse::<u64>()) else {
                continue;
            };
            match f[0] {
                "owner" => {
                    have_owner = true;
                    owner_alive = proc_starttime(pid) == Some(st);
                }
                "child" => children.push((pid, st)),
                _ => {}
            }
        }
        if owner_alive {
            continue;
        }
        if !have_owner {
            // Being claimed right now (owner line not written yet), or an empty leftover:
            // only sweep it once it is clearly old.
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60));
            if !old {
                continue;
            }
        }
        eprintln!("sweeping leftovers of dead test topology {prefix}");
        for (pid, st) in children {
            if proc_starttime(pid) == Some(st) {
                // SAFETY: kill(2) on a PID whose start time proves it is the process we started.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
        for ns in [format!("{prefix}a"), format!("{prefix}b")] {
            if netns_exists(&ns) {
                let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            }
        }
        remove_uapi_sockets(&prefix);
        let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("sitewire-test-{prefix}")));
        let _ = fs::remove_file(&path);
    }
}
