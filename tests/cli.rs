//! CLI behaviour that needs no namespaces: key tools compatible with `wg`, `check`.

mod support;

use std::process::Command;

use support::{host_exec_ok, prereq, sitewire_bin, write_file_0600};

#[test]
fn keygen_and_pubkey_agree_with_wg() {
    if !prereq(&["wg"]) {
        return;
    }
    for _ in 0..5 {
        // sitewire's key, wg's public key for it.
        let k = host_exec_ok(&[sitewire_bin(), "keygen"], None);
        assert_eq!(k.trim().len(), 44);
        let ours = host_exec_ok(&[sitewire_bin(), "pubkey"], Some(&k));
        let theirs = host_exec_ok(&["wg", "pubkey"], Some(&k));
        assert_eq!(ours, theirs);
        // And the other way round.
        let k = host_exec_ok(&["wg", "genkey"], None);
        let ours = host_exec_ok(&[sitewire_bin(), "pubkey"], Some(&k));
        let theirs = host_exec_ok(&["wg", "pubkey"], Some(&k));
        assert_eq!(ours, theirs);
    }
}

#[test]
fn pubkey_rejects_garbage_without_echoing_it() {
    let out = Command::new(sitewire_bin())
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"c2VjcmV0LXNlY3JldC1zZWNyZXQ=\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("32 bytes"), "{err}");
    assert!(!err.contains("c2VjcmV0"), "{err}");
}

#[test]
fn check_lists_every_problem_and_fails() {
    let dir = std::env::temp_dir().join(format!("sitewire-cli-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = host_exec_ok(&[sitewire_bin(), "keygen"], None);
    write_file_0600(dir.join("site.key"), &key);
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        r#"[site]
name = "lab"
interface = "sw0"
listen_port = 0
private_key = "site.key"
colour = "blue"

[[tunnel]]
name = "branch"
peer_public_key = "not-a-key"
endpoint = ["198.51.100.7"]
remote_subnets = ["192.168.50.0/33"]
"#,
    )
    .unwrap();
    let out = Command::new(sitewire_bin())
        .args(["check", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for (needle, line) in [
        ("site.listen_port", "line 4"),
        ("colour", "line 6"),
        ("tunnel[0].peer_public_key", "line 10"),
        ("tunnel[0].endpoint[0]", "line 11"),
        ("tunnel[0].remote_subnets[0]", "line 12"),
    ] {
        let l = err
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no error for {needle}:\n{err}"));
        assert!(l.contains(line), "{needle} should be at {line}: {l}");
    }
    // A good config passes.
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[site]\nname = \"lab\"\ninterface = \"sw0\"\nlisten_port = 51820\nprivate_key = \"site.key\"\n",
    )
    .unwrap();
    let out = Command::new(sitewire_bin())
        .args(["check", "-c", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The file may also be named without -c, with the same verdicts; not both ways at once.
    let run = |args: &[&str]| Command::new(sitewire_bin()).args(args).output().unwrap();
    let (good, bad) = (good.to_str().unwrap(), cfg.to_str().unwrap());
    assert!(run(&["check", good]).status.success());
    let out = run(&["check", bad]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
    let out = run(&["check", "-c", good, bad]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
