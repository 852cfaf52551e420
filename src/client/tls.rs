//! TLS of the client: `--tls-ca`, `--tls-cert` / `--tls-key` (mTLS), `--tls-domain`, and
//! `https://` targets.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::serve::pb::style_align_client::StyleAlignClient;

/// Client TLS flags (flattened into the subcommands that call a server).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM CA bundle to verify the server's certificate with: turns TLS on. Without it, an
    /// `https://` target is verified against the public web roots.
    #[arg(long, env = "STYLEALIGN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for servers that require one (mTLS).
    #[arg(long, env = "STYLEALIGN_CLIENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "STYLEALIGN_CLIENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name to verify the server's certificate for (default: the target's host).
    #[arg(long, env = "STYLEALIGN_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl TlsArgs {
    /// Whether any TLS option is given.
    pub fn any(&self) -> bool {
        self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_domain.is_some()
    }

    /// The tonic TLS configuration; `None` when TLS is off.
    pub fn config(&self, url: &str) -> anyhow::Result<Option<ClientTlsConfig>> {
        if !self.any() && !url.starts_with("https://") {
            return Ok(None);
        }
        let mut cfg = ClientTlsConfig::new();
        match &self.tls_ca {
            Some(ca) => {
                let pem = std::fs::read(ca).with_context(|| format!("--tls-ca {}", ca.display()))?;
                cfg = cfg.ca_certificate(Certificate::from_pem(pem));
            }
            None => cfg = cfg.with_webpki_roots(),
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let cert = std::fs::read(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
            let key = std::fs::read(key).with_context(|| format!("--tls-key {}", key.display()))?;
            cfg = cfg.identity(Identity::from_pem(cert, key));
        }
        if let Some(d) = &self.tls_domain {
            cfg = cfg.domain_name(d.clone());
        }
        Ok(Some(cfg))
    }
}

/// Connects to `server` (`host:port`, `http://…` or `https://…`) with `tls`: TLS when a TLS
/// option is given (a bare `host:port` then means `https://host:port`) or the target is `https://`.
pub async fn connect_with(server: &str, tls: &TlsArgs) -> anyhow::Result<StyleAlignClient<Channel>> {
    let url = if server.contains("://") {
        server.to_string()
    } else if tls.any() {
        format!("https://{server}")
    } else {
        format!("http://{server}")
    };
    if tls.any() && url.starts_with("http://") {
        anyhow::bail!("{server}: TLS options given for an http:// target (use https:// or host:port)");
    }
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad server address {server:?}"))?
        .connect_timeout(Duration::from_secs(10));
    if let Some(cfg) = tls.config(&url)? {
        endpoint = endpoint.tls_config(cfg).context("TLS configuration")?;
    }
    let channel = endpoint.connect().await.with_context(|| format!("connecting to {url}"))?;
    Ok(StyleAlignClient::new(channel).max_decoding_message_size(256 << 20))
}
