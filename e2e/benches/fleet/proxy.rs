//! A counting TCP proxy in front of the registry: the hub is given the proxy's address, so
//! every HTTP request it sends to the registry is seen and counted here, independently of
//! the hub's own `kmm_hub_registry_lookups_total`.
//!
//! Requests are counted from their request lines. The hub only sends bodiless GET/HEAD
//! requests to a registry, so every header block (`…\r\n\r\n`) starts a new request.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

pub struct CountingProxy {
    pub host: String,
    counts: Counts,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Listen on a free loopback port and forward every connection to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the registry proxy")?;
        let host = listener.local_addr()?.to_string();
        let counts: Counts = Arc::default();
        let c = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let counts = c.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        relay(client, server, counts).await;
                    }
                });
            }
        });
        Ok(Self { host, counts, task })
    }

    /// Requests seen so far, by `METHOD kind` (kind: `manifests`, `blobs`, `ping`, `other`).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn total(&self) -> u64 {
        self.counts().values().sum()
    }

    pub fn reset(&self) {
        if let Ok(mut c) = self.counts.lock() {
            c.clear();
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, counts: Counts) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            while let Some(end) = find(&pending, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_string();
                pending.drain(..end + 4);
                count(&counts, &head);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn count(counts: &Counts, head: &str) {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (Some(method), Some(path)) = (words.next(), words.next()) else {
        return;
    };
    let kind = if path == "/v2/" || path == "/v2" {
        "ping"
    } else if path.contains("/manifests/") {
        "manifests"
    } else if path.contains("/blobs/") {
        "blobs"
    } else {
        "other"
    };
    if let Ok(mut c) = counts.lock() {
        *c.entry(format!("{method} {kind}")).or_default() += 1;
    }
}
