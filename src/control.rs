//! Local sockets: the control socket the CLI talks to, and the WireGuard UAPI socket
//! that `wg show` reads.
//!
//! Both are Unix sockets readable by root only. The control protocol is one JSON
//! request line and one JSON response line per connection.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::dataplane::Dataplane;
use crate::reload::{ReloadOutcome, ReloadRequest};
use crate::status::SiteStatus;

/// Directory of control sockets, one per interface.
pub const CONTROL_DIR: &str = "/run/sitewire";
/// Where WireGuard tools look for userspace implementations.
pub const UAPI_DIR: &str = "/var/run/wireguard";

pub fn control_socket_path(interface: &str) -> PathBuf {
    Path::new(CONTROL_DIR).join(format!("{interface}.sock"))
}

pub fn uapi_socket_path(interface: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{interface}.sock"))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Re-read the configuration (`config`: another file to read instead of the
    /// daemon's own) and apply the difference; see [`crate::reload`].
    Reload {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        config: Option<PathBuf>,
    },
    /// Rekey an IKE-keyed tunnel now: new CHILD SA, new WireGuard PSK.
    Rotate {
        tunnel: String,
    },
    /// Rotate the site's static key (held in Vault) now.
    RotateKey,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Status(Box<SiteStatus>),
    Reload(Box<ReloadOutcome>),
    Ok(String),
    Error(String),
}

/// Shared, read-only view the sockets serve from.
pub struct SiteView {
    pub site: String,
    pub interface: String,
    pub dataplane: Arc<Dataplane>,
    pub started: std::time::SystemTime,
    /// Where reload requests go (the daemon's main loop); None: reload not offered.
    pub reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
    /// The IKE driver's commands; None: no IKE-keyed tunnels.
    pub ike: Option<tokio::sync::mpsc::Sender<crate::ikewg::Command>>,
    /// The Vault task's commands; None: no keys in Vault.
    pub keys: Option<tokio::sync::mpsc::Sender<crate::rotation::Command>>,
}

impl SiteView {
    pub fn status(&self) -> SiteStatus {
        SiteStatus::of(&self.site, &self.interface, &self.dataplane, self.started)
    }
}

/// Bind a root-only Unix socket, replacing a stale one left by a crashed run.
pub fn bind_private(path: &Path, dir_mode: u32) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode))?;
        }
    }
    if path.exists() {
        // A live daemon answers; a dead one leaves a socket nobody listens on.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use: another daemon runs this interface",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve_control(listener: UnixListener, view: Arc<SiteView>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            if let Err(e) = control_conn(stream, &view).await {
                tracing::debug!(error = %e, "control connection failed");
            }
        });
    }
}

async fn control_conn(stream: UnixStream, view: &SiteView) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd.take(64 * 1024))
        .read_line(&mut line)
        .await?;
    let resp = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Status) => Response::Status(Box::new(view.status())),
        Ok(Request::Reload { config }) => reload_request(view, config).await,
        Ok(Request::Rotate { tunnel }) => rotate_request(view, tunnel).await,
        Ok(Request::RotateKey) => rotate_key_request(view).await,
        Err(e) => Response::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    Ok(())
}

async fn rotate_key_request(view: &SiteView) -> Response {
    let Some(tx) = &view.keys else {
        return Response::Error(
            "this site's key is not in Vault (site.private_key = \"vault:<path>\" enables rotation)"
                .into(),
        );
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx
        .send(crate::rotation::Command::RotateKey { reply })
        .await
        .is_err()
    {
        return Response::Error("the daemon is shutting down".into());
    }
    match answer.await {
        Ok(Ok(msg)) => Response::Ok(msg),
        Ok(Err(e)) => Response::Error(e),
        Err(_) => Response::Error("the daemon is shutting down".into()),
    }
}

async fn rotate_request(view: &SiteView, tunnel: String) -> Response {
    let Some(tx) = &view.ike else {
        return Response::Error(format!(
            "tunnel {tunnel}: this site has no IKE-keyed tunnels"
        ));
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    let name = tunnel.clone();
    if tx
        .send(crate::ikewg::Command::Rotate { tunnel, reply })
        .await
        .is_err()
    {
        return Response::Error("the daemon is shutting down".into());
    }
    match answer.await {
        Ok(Ok(())) => Response::Ok(format!("tunnel {name}: rekey started")),
        Ok(Err(e)) => Response::Error(e),
        Err(_) => Response::Error("the daemon is shutting down".into()),
    }
}

async fn reload_request(view: &SiteView, config: Option<PathBuf>) -> Response {
    let Some(tx) = &view.reload else {
        return Response::Error("this daemon does not support reload".into());
    };
    let (reply, answer) = tokio::sync::oneshot::channel();
    if tx.send(ReloadRequest { config, reply }).await.is_err() {
        return Response::Error("the daemon is shutting down".into());
    }
    match answer.await {
        Ok(outcome) => Response::Reload(Box::new(outcome)),
        Err(_) => Response::Error("the daemon is shutting down".into()),
    }
}

/// Send one request to a running daemon.
pub async fn request(path: &Path, req: &Request) -> Result<Response> {
    let stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("connecting to {} (is the daemon running?)", path.display()))?;
    let (rd, mut wr) = stream.into_split();
    let mut msg = serde_json::to_vec(req)?;
    msg.push(b'\n');
    wr.write_all(&msg).await?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    serde_json::from_str(&line).context("reading the daemon's answer")
}

// ---- WireGuard cross-platform UAPI (https://www.wireguard.com/xplatform/) ----

pub async fn serve_uapi(listener: UnixListener, view: Arc<SiteView>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let view = view.clone();
        tokio::spawn(async move {
            if let Err(e) = uapi_conn(stream, &view).await {
                tracing::debug!(error = %e, "uapi connection failed");
            }
        });
    }
}

async fn uapi_conn(stream: UnixStream, view: &SiteView) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd.take(1 << 20)).lines();
    while let Some(op) = lines.next_line().await? {
        // Each operation is a block of lines ended by an empty line.
        let mut body = Vec::new();
        while let Some(l) = lines.next_line().await? {
            if l.is_empty() {
                break;
            }
            body.push(l);
        }
        let reply = match op.as_str() {
            "get=1" => uapi_get(&view.dataplane),
            // Configuration comes from sitewire's own config file; refusing keeps
            // `wg set` from silently diverging from it.
            "set=1" => "errno=95\n\n".to_owned(),
            _ => "errno=22\n\n".to_owned(),
        };
        wr.write_all(reply.as_bytes()).await?;
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The `get=1` answer. Like every WireGuard implementation it includes the private key:
/// the socket is root-only, and `wg show` derives the public key from it.
pub fn uapi_get(dp: &Dataplane) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", hex(dp.private().as_bytes()));
    let _ = writeln!(s, "listen_port={}", dp.listen_port);
    for t in &dp.tunnels.load().list {
        let _ = writeln!(s, "public_key={}", hex(t.peer_public_key().as_bytes()));
        if let Some(psk) = t.current_psk() {
            let _ = writeln!(s, "preshared_key={}", hex(&psk[..]));
        }
        let _ = writeln!(s, "protocol_version=1");
        if let Some(ep) = t.endpoint() {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let (sec, nsec) = t.last_handshake();
        let _ = writeln!(s, "last_handshake_time_sec={sec}");
        let _ = writeln!(s, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(s, "tx_bytes={}", t.stats.tx_bytes.load(Relaxed));
        let _ = writeln!(s, "rx_bytes={}", t.stats.rx_bytes.load(Relaxed));
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            t.spec.persistent_keepalive.unwrap_or(0)
        );
        for net in t.allowed() {
            let _ = writeln!(s, "allowed_ip={net}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}
