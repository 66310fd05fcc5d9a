//! The systemd units verify, and the Debian package goes through its whole life on this
//! machine: build (packaging/build-deb.sh: release build + cargo-deb), `dpkg -i`, the
//! installed binary and shipped config work, file modes are right, `dpkg --purge` leaves
//! nothing behind.
//!
//! Needs root, dpkg, cargo-deb and systemd-analyze (scripts/install-test-deps.sh installs
//! them); missing ones fail under CI=true and skip otherwise.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{find_in_path, sitewire_bin, skip_or_fail};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(bins: &[&str]) -> bool {
    let missing: Vec<&str> = bins
        .iter()
        .copied()
        .filter(|b| find_in_path(b).is_none())
        .collect();
    missing.is_empty()
        || skip_or_fail(&format!(
            "needs {} on PATH (run scripts/install-test-deps.sh)",
            missing.join(", ")
        ))
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sitewire-pkg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !have(&["systemd-analyze", "man"]) {
        return;
    }
    let dir = tempdir("units");
    // Man pages generated from the CLI, so that Documentation=man:sitewire(1) resolves.
    run_ok(Command::new(sitewire_bin()).args([
        "generate-assets",
        "--out",
        dir.join("assets").to_str().unwrap(),
    ]));
    let man1 = dir.join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    for e in std::fs::read_dir(dir.join("assets/man")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, man1.join(p.file_name().unwrap())).unwrap();
    }
    // The units as shipped, with ExecStart pointing at the binary under test (verify
    // checks that the executables exist).
    let units = dir.join("units");
    std::fs::create_dir_all(&units).unwrap();
    for (src, dst) in [
        ("sitewire.service", "sitewire.service"),
        ("sitewire@.service", "sitewire@.service"),
        ("sitewire@.service", "sitewire@example.service"),
    ] {
        let text = std::fs::read_to_string(root().join("packaging").join(src)).unwrap();
        std::fs::write(
            units.join(dst),
            text.replace("/usr/bin/sitewire", sitewire_bin()),
        )
        .unwrap();
    }
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "./sitewire.service", "./sitewire@example.service"])
        .current_dir(&units)
        .env("MANPATH", dir.join("man")));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );

    // The offline security score, as a guard against hardening regressions.
    for unit in ["./sitewire.service", "./sitewire@example.service"] {
        let out = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", unit])
            .current_dir(&units));
        let text = String::from_utf8_lossy(&out.stdout);
        let score: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        eprintln!("{unit}: systemd-analyze security exposure {score}");
        assert!(score <= 3.0, "{unit}: exposure {score} (was 2.4)");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs dpkg, waiting (up to 5 min) while another dpkg/apt holds the dpkg lock.
fn dpkg(args: &[&std::ffi::OsStr]) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let out = run(Command::new("dpkg").args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && err.contains("lock") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_secs(2));
            continue;
        }
        assert!(
            out.status.success(),
            "dpkg {args:?} failed ({}):\n{}\n{err}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        return String::from_utf8_lossy(&out.stdout).into_owned();
    }
}

/// Holds an exclusive lock so that two runs of this test on one machine (two checkouts,
/// two sessions) do not install and purge the package under each other.
struct MachineLock(#[allow(dead_code)] std::fs::File);

impl MachineLock {
    fn take() -> MachineLock {
        std::fs::create_dir_all(support::STATE_DIR).unwrap();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(support::STATE_DIR).join("packaging.lock"))
            .unwrap();
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor we own; blocks until the other holder is done.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        MachineLock(f)
    }
}

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "sitewire"]))
        .stdout
        .starts_with(b"install ok installed")
}

/// Purges the package if a failing test left it installed.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if std::thread::panicking() && installed() {
            let _ = run(Command::new("dpkg").args(["--purge", "sitewire"]));
        }
    }
}

fn mode(p: &str) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{p}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn deb_builds_installs_checks_and_purges_cleanly() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 && !skip_or_fail("installing a .deb needs root") {
        return;
    }
    if !have(&["dpkg", "dpkg-deb", "dpkg-shlibdeps", "dpkg-query"]) {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !run(Command::new(&cargo).args(["deb", "--version"]))
        .status
        .success()
        && !skip_or_fail("needs cargo-deb (cargo install cargo-deb --locked)")
    {
        return;
    }
    let _lock = MachineLock::take();
    if installed() {
        eprintln!("a sitewire package is installed (left by an earlier run?): purging it first");
        dpkg(&["--purge".as_ref(), "sitewire".as_ref()]);
    }

    // Build. Reuses target/ (the release build is incremental after the first time).
    let started = std::time::Instant::now();
    let out = run_ok(Command::new(root().join("packaging/build-deb.sh")).current_dir(root()));
    let deb = PathBuf::from(
        out.lines()
            .rev()
            .find(|l| l.trim().ends_with(".deb"))
            .unwrap_or_else(|| panic!("no .deb path in build output:\n{out}"))
            .trim(),
    );
    let deb = if deb.is_absolute() {
        deb
    } else {
        root().join(deb)
    };
    eprintln!("built {} in {:?}", deb.display(), started.elapsed());
    assert!(deb.exists(), "{}", deb.display());

    // Contents and metadata.
    let list = run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for want in [
        "./usr/bin/sitewire",
        "./lib/systemd/system/sitewire.service",
        "./lib/systemd/system/sitewire@.service",
        "./etc/sitewire/sitewire.toml",
        "./usr/share/man/man1/sitewire.1",
        "./usr/share/man/man1/sitewire-reload.1",
        "./usr/share/man/man1/sitewire-doctor.1",
        "./usr/share/bash-completion/completions/sitewire",
        "./usr/share/zsh/vendor-completions/_sitewire",
        "./usr/share/fish/vendor_completions.d/sitewire.fish",
        "./usr/share/doc/sitewire/examples/vm-lab-branch.toml",
        "./usr/share/doc/sitewire/examples/admin-laptop.wg-quick.conf",
    ] {
        assert!(list.contains(want), "{want} not in the package:\n{list}");
    }
    let conffiles = run_ok(
        Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"),
    );
    assert!(
        conffiles.contains("/etc/sitewire/sitewire.toml"),
        "{conffiles}"
    );
    let depends = run_ok(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"));
    assert!(depends.contains("libc6"), "Depends: {depends}");

    // Install.
    let _guard = PurgeOnDrop;
    let out = dpkg(&["-i".as_ref(), deb.as_os_str()]);
    assert!(
        out.contains("generated /etc/sitewire/keys/sitewire.key"),
        "{out}"
    );
    let version = run_ok(Command::new("/usr/bin/sitewire").arg("--version"));
    assert_eq!(
        version.trim(),
        format!("sitewire {}", env!("CARGO_PKG_VERSION"))
    );
    let check = run_ok(Command::new("/usr/bin/sitewire").args([
        "check",
        "-c",
        "/etc/sitewire/sitewire.toml",
    ]));
    assert!(check.contains("ok"), "{check}");
    assert!(
        check.contains("0 tunnels"),
        "the shipped config must be inert: {check}"
    );
    assert_eq!(mode("/etc/sitewire/keys"), 0o700);
    assert_eq!(mode("/etc/sitewire/keys/sitewire.key"), 0o600);
    assert_eq!(mode("/etc/sitewire/sitewire.toml"), 0o644);
    assert_eq!(mode("/usr/bin/sitewire"), 0o755);
    assert_eq!(mode("/lib/systemd/system/sitewire@.service"), 0o644);
    let man = run_ok(Command::new("dpkg").args(["-L", "sitewire"]));
    assert!(
        man.lines()
            .any(|l| l.starts_with("/usr/share/man/man1/sitewire.1")),
        "{man}"
    );
    // The installed man page renders.
    if find_in_path("man").is_some() {
        let page = run_ok(Command::new("man").args(["-P", "cat", "sitewire-reload"]));
        assert!(page.contains("reload"), "{page}");
    }
    // Reinstalling (an upgrade to the same version) keeps the generated key.
    let key = std::fs::read("/etc/sitewire/keys/sitewire.key").unwrap();
    dpkg(&["-i".as_ref(), deb.as_os_str()]);
    assert_eq!(
        std::fs::read("/etc/sitewire/keys/sitewire.key").unwrap(),
        key
    );

    // Purge: every file and directory of the package, the generated key, /etc/sitewire.
    let files: Vec<String> = man
        .lines()
        .filter(|l| l.contains("sitewire"))
        .map(str::to_string)
        .collect();
    dpkg(&["--purge".as_ref(), "sitewire".as_ref()]);
    assert!(!installed());
    let left: Vec<&String> = files.iter().filter(|f| Path::new(f).exists()).collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
    for p in ["/etc/sitewire", "/var/lib/sitewire", "/usr/bin/sitewire"] {
        assert!(!Path::new(p).exists(), "{p} left after purge");
    }
}
