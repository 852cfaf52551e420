//! TLS on the API port (gRPC, gRPC-Web, HTTP/JSON and the playground share it), terminated with
//! rustls on each accepted connection (see [`super::conn`]), and mutual TLS.
//!
//! - `--tls-cert` / `--tls-key`: PEM certificate chain and private key; the API port speaks TLS
//!   only (ALPN `h2` and `http/1.1`). The admin listener stays plaintext.
//! - `--tls-client-ca`: PEM bundle of the CAs whose client certificates are accepted; a client
//!   without one is refused during the handshake (mTLS). The client's identity is then its
//!   certificate's first subject alternative name (DNS, URI or e-mail), else its subject common
//!   name, unless the call carries a bearer token ([`super::layers`]).
//! - Rotation: before every handshake the files' metadata (modification time, size, inode) is
//!   compared with what was loaded; when it changed, the files are read again and the new rustls
//!   configuration replaces the old one atomically for the following handshakes (open connections
//!   keep theirs). A rotation that does not load (a half-written pair, a key that does not match)
//!   is logged and the previous configuration stays in use until the files are consistent.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

/// TLS flags of `stylealign serve` (flattened into [`super::config::ServeArgs`]).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM certificate chain for the API port (gRPC, gRPC-Web, HTTP/JSON): turns TLS on. Re-read
    /// when the file changes (mounted Secrets rotate).
    #[arg(long, env = "STYLEALIGN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "STYLEALIGN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of client CAs: clients must present a certificate one of them signed (mTLS);
    /// the certificate's SAN (else CN) becomes the caller's identity unless a bearer token is given.
    #[arg(long, env = "STYLEALIGN_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, loaded once to check them (errors name the flag); `None` without `--tls-cert`.
    pub fn files(&self) -> anyhow::Result<Option<TlsFiles>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() };
        files.load()?;
        Ok(Some(files))
    }
}

/// The PEM files of the API port's TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client CAs: mTLS when set.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the files and builds the rustls configuration; errors name the flag and the file.
    pub fn load(&self) -> anyhow::Result<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs(&self.cert).context("--tls-cert")?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.key.display()))
            .context("--tls-key: no PEM private key")?;
        let builder =
            ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs(ca).context("--tls-client-ca")? {
                    roots.add(c).with_context(|| format!("--tls-client-ca {}: not a usable CA certificate", ca.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .with_context(|| format!("--tls-client-ca {}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder
            .with_single_cert(certs, key)
            .with_context(|| format!("--tls-cert {} / --tls-key {}", self.cert.display(), self.key.display()))?;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(cfg)
    }

    fn stamp(&self) -> Stamp {
        let one = |p: &Path| {
            std::fs::metadata(p).ok().map(|m| {
                #[cfg(unix)]
                let ino = std::os::unix::fs::MetadataExt::ino(&m);
                #[cfg(not(unix))]
                let ino = 0;
                (m.modified().ok(), m.len(), ino)
            })
        };
        Stamp([Some(&self.cert), Some(&self.key), self.client_ca.as_ref()].map(|p| p.and_then(|p| one(p.as_path()))))
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no PEM certificate", path.display());
    }
    Ok(certs)
}

/// What the files looked like when they were loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp([Option<(Option<std::time::SystemTime>, u64, u64)>; 3]);

/// The current rustls configuration, reloaded when its files change.
pub struct TlsReloader {
    files: TlsFiles,
    current: Mutex<(Stamp, Arc<ServerConfig>)>,
}

impl TlsReloader {
    pub fn new(files: TlsFiles) -> anyhow::Result<Self> {
        let stamp = files.stamp();
        let cfg = Arc::new(files.load()?);
        Ok(Self { files, current: Mutex::new((stamp, cfg)) })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for the next handshake: reloaded first when the files changed.
    pub fn config(&self) -> Arc<ServerConfig> {
        let stamp = self.files.stamp();
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.0 != stamp {
            match self.files.load() {
                Ok(cfg) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed: reloaded");
                    *cur = (stamp, Arc::new(cfg));
                }
                Err(e) => {
                    // Keep the old configuration; the next handshake tries again.
                    tracing::warn!(error = %format!("{e:#}"), "TLS certificate files changed but do not load; keeping the previous certificate");
                }
            }
        }
        cur.1.clone()
    }
}

/// The identity a client certificate stands for: its first subject alternative name (DNS name,
/// URI or e-mail address), else its subject common name. `None` when the certificate has neither
/// (or is not parseable DER).
pub fn certificate_identity(der: &[u8]) -> Option<String> {
    let (tag, cert, _) = der_item(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der_item(cert)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let (tag, content, next) = der_item(rest)?;
        fields.push((tag, content));
        rest = next;
    }
    // [0] version (optional), serial, signature, issuer, validity, subject, spki, … [3] extensions.
    let plain: Vec<&[u8]> = fields.iter().filter(|(t, _)| *t == 0x30 || *t == 0x02).map(|(_, c)| *c).collect();
    // serial (INTEGER), signature, issuer, validity, subject: the subject is the 5th.
    let subject = plain.get(4).copied();
    let extensions = fields.iter().find(|(t, _)| *t == 0xA3).map(|(_, c)| *c);
    if let Some(name) = extensions.and_then(san_name) {
        return Some(name);
    }
    subject.and_then(common_name)
}

/// The first DNS name, URI or e-mail address of the subjectAltName extension.
fn san_name(explicit: &[u8]) -> Option<String> {
    const SAN: &[u8] = &[0x55, 0x1D, 0x11];
    let (_, mut exts, _) = der_item(explicit)?;
    while !exts.is_empty() {
        let (_, ext, next) = der_item(exts)?;
        exts = next;
        let (tag, oid, mut rest) = der_item(ext)?;
        if tag != 0x06 || oid != SAN {
            continue;
        }
        // Optional `critical` BOOLEAN, then the OCTET STRING.
        let (mut tag, mut value, after) = der_item(rest)?;
        if tag == 0x01 {
            rest = after;
            (tag, value, _) = der_item(rest)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (_, mut names, _) = der_item(value)?;
        while !names.is_empty() {
            let (tag, name, next) = der_item(names)?;
            names = next;
            // [1] rfc822Name, [2] dNSName, [6] uniformResourceIdentifier (IA5 strings).
            if matches!(tag, 0x81 | 0x82 | 0x86) {
                return printable(name);
            }
        }
        return None;
    }
    None
}

/// The subject's common name (OID 2.5.4.3).
fn common_name(subject: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    let mut sets = subject;
    while !sets.is_empty() {
        let (_, set, next) = der_item(sets)?;
        sets = next;
        let mut atvs = set;
        while !atvs.is_empty() {
            let (_, atv, next) = der_item(atvs)?;
            atvs = next;
            let (tag, oid, rest) = der_item(atv)?;
            if tag == 0x06 && oid == CN {
                let (tag, value, _) = der_item(rest)?;
                // UTF8String, PrintableString, IA5String, TeletexString.
                if matches!(tag, 0x0C | 0x13 | 0x16 | 0x14) {
                    return printable(value);
                }
            }
        }
    }
    None
}

fn printable(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?.trim();
    (!s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control)).then(|| s.to_string())
}

/// One DER item: (tag, content, what follows).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7F) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_items_are_bounded() {
        assert_eq!(der_item(&[0x30, 0x01, 0xAA, 0xBB]), Some((0x30, &[0xAA][..], &[0xBB][..])));
        assert_eq!(der_item(&[0x30, 0x82, 0x00, 0x01, 0xAA]), Some((0x30, &[0xAA][..], &[][..])));
        assert_eq!(der_item(&[0x30, 0x05, 0xAA]), None);
        assert_eq!(der_item(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(certificate_identity(&[0x30, 0x00]), None);
        assert_eq!(certificate_identity(b"garbage"), None);
    }
}
