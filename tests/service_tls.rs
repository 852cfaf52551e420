//! TLS and mTLS on the API port, with certificates generated here (rcgen): a valid handshake and
//! a Generate over it; an expired server certificate, a wrong CA and (mTLS) a missing client
//! certificate refused; the client certificate's identity owning sessions; certificate rotation
//! by rewriting the files; the CLI's TLS flags.

mod service_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use service_common::*;
use stylealign::client::Identity;
use stylealign::client::tls::{TlsArgs, connect_with};
use stylealign::serve::pb;
use stylealign::serve::pb::style_align_client::StyleAlignClient;
use stylealign::serve::tls::TlsFiles;
use stylealign::serve::{ServeConfig, Server, Tokens};
use tonic::transport::Channel;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    Ca { issuer: Issuer::new(p, key), pem }
}

/// A leaf certificate signed by `ca`: (certificate PEM, key PEM).
fn leaf(ca: &Ca, sans: &[&str], cn: &str, expired: bool) -> (String, String) {
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A fresh folder for one test's files.
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stylealign-tls-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Writes the server's pair (and the client CA) and returns the config's TLS files.
fn server_files(dir: &Path, pair: &(String, String), client_ca: Option<&Ca>) -> TlsFiles {
    TlsFiles {
        cert: write(dir, "server.crt", &pair.0),
        key: write(dir, "server.key", &pair.1),
        client_ca: client_ca.map(|c| write(dir, "client-ca.crt", &c.pem)),
    }
}

fn client_args(dir: &Path, ca: &Ca, client: Option<(&str, &(String, String))>) -> TlsArgs {
    let mut a = TlsArgs { tls_ca: Some(write(dir, "trust.crt", &ca.pem)), tls_domain: Some("localhost".into()), ..Default::default() };
    if let Some((name, pair)) = client {
        a.tls_cert = Some(write(dir, &format!("{name}.crt"), &pair.0));
        a.tls_key = Some(write(dir, &format!("{name}.key"), &pair.1));
    }
    a
}

async fn tls_server(tls: TlsFiles, auth: Option<Tokens>) -> Server {
    start(ServeConfig { tls: Some(tls), auth, ..test_config() }).await
}

async fn connect_tls(s: &Server, args: &TlsArgs) -> anyhow::Result<StyleAlignClient<Channel>> {
    connect_with(&format!("https://{}", s.addr()), args).await
}

/// Connects and makes one call: the outcome of both.
async fn call(s: &Server, args: &TlsArgs) -> Result<pb::ListModelsResponse, String> {
    let mut c = connect_tls(s, args).await.map_err(|e| format!("{e:#}"))?;
    c.list_models(Identity::default().request(pb::ListModelsRequest {}, None)).await.map(|r| r.into_inner()).map_err(|e| format!("{e}"))
}

#[test]
fn valid_handshake_then_generate_and_plaintext_refused() {
    run(Duration::from_secs(120), || async {
        let d = dir("valid");
        let ca = ca("test CA");
        let server = tls_server(server_files(&d, &leaf(&ca, &["localhost"], "server", false), None), None).await;
        let args = client_args(&d, &ca, None);
        let t = Instant::now();
        let mut c = connect_tls(&server, &args).await.expect("TLS connect");
        println!("TLS connect (TCP + handshake) took {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        let who = Identity::client("tls-user");
        let s = session(&mut c, &who, default_patch()).await;
        let r = generate(&mut c, &who, request(&s, &["a red cube", "a blue cube"], 64, 2, 7)).await.expect("Generate over TLS");
        assert_eq!(r.images.len(), 2);
        // Ten more connections: handshake time.
        let t = Instant::now();
        for _ in 0..10 {
            call(&server, &args).await.expect("call");
        }
        println!("10 TLS connections with one call each: {:.2} ms per connection", t.elapsed().as_secs_f64() * 1e2);
        // A plaintext client gets no answer from the TLS port.
        let plain = async {
            let mut c = stylealign::client::connect(&server.addr().to_string()).await?;
            c.list_models(pb::ListModelsRequest {}).await.map_err(anyhow::Error::from)
        };
        assert!(tokio::time::timeout(Duration::from_secs(15), plain).await.expect("bounded").is_err());
        server.shutdown().await;
    });
}

#[test]
fn expired_server_certificate_is_refused_by_the_client() {
    run(Duration::from_secs(60), || async {
        let d = dir("expired");
        let ca = ca("test CA");
        let server = tls_server(server_files(&d, &leaf(&ca, &["localhost"], "server", true), None), None).await;
        let e = call(&server, &client_args(&d, &ca, None)).await.expect_err("an expired certificate is refused");
        println!("expired: {e}");
        server.shutdown().await;
    });
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    run(Duration::from_secs(60), || async {
        let d = dir("wrong-ca");
        let (ca, other) = (ca("test CA"), ca("another CA"));
        let server = tls_server(server_files(&d, &leaf(&ca, &["localhost"], "server", false), None), None).await;
        let e = call(&server, &client_args(&d, &other, None)).await.expect_err("a wrong CA is refused");
        println!("wrong CA: {e}");
        // The wrong name is refused too.
        let mut args = client_args(&d, &ca, None);
        args.tls_domain = Some("elsewhere.example".into());
        call(&server, &args).await.expect_err("a wrong name is refused");
        call(&server, &client_args(&d, &ca, None)).await.expect("the right CA and name");
        server.shutdown().await;
    });
}

#[test]
fn mtls_without_a_client_certificate_is_refused() {
    run(Duration::from_secs(60), || async {
        let d = dir("mtls-none");
        let (ca, clients, rogue) = (ca("server CA"), ca("client CA"), ca("rogue CA"));
        let server = tls_server(server_files(&d, &leaf(&ca, &["localhost"], "server", false), Some(&clients)), None).await;
        let e = call(&server, &client_args(&d, &ca, None)).await.expect_err("no client certificate");
        println!("mTLS without a client certificate: {e}");
        let rogue_pair = leaf(&rogue, &["client-a.example"], "a", false);
        call(&server, &client_args(&d, &ca, Some(("rogue", &rogue_pair)))).await.expect_err("a client certificate from another CA");
        let good = leaf(&clients, &["client-a.example"], "a", false);
        call(&server, &client_args(&d, &ca, Some(("good", &good)))).await.expect("a client certificate from the client CA");
        server.shutdown().await;
    });
}

#[test]
fn the_client_certificate_is_the_session_owner() {
    run(Duration::from_secs(60), || async {
        let d = dir("mtls-identity");
        let (ca, clients) = (ca("server CA"), ca("client CA"));
        let tokens = Tokens::parse("alice=tok-alice").unwrap();
        let server = tls_server(server_files(&d, &leaf(&ca, &["localhost"], "server", false), Some(&clients)), Some(tokens)).await;
        // A: SAN; B: no SAN, CN only.
        let a_pair = leaf(&clients, &["client-a.example"], "ignored-cn", false);
        let b_pair = leaf(&clients, &[], "client-b", false);
        let mut a = connect_tls(&server, &client_args(&d, &ca, Some(("a", &a_pair)))).await.unwrap();
        let mut b = connect_tls(&server, &client_args(&d, &ca, Some(("b", &b_pair)))).await.unwrap();
        // No token needed: the certificate authenticates (and x-client-id cannot claim another identity).
        let anon = Identity::default();
        let spoof = Identity::client("client-a.example");
        let sa = session(&mut a, &anon, default_patch()).await;
        let get = |id: &str| pb::GetSessionRequest { session_id: id.to_string() };
        a.get_session(anon.request(get(&sa), None)).await.expect("A reads its session");
        for who in [&anon, &spoof] {
            let e = b.get_session(who.request(get(&sa), None)).await.expect_err("B cannot read A's session");
            assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
        }
        let e = b.release_session(spoof.request(pb::ReleaseSessionRequest { session_id: sa.clone() }, None)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        // B's own session; over HTTP-free gRPC a generate works for its owner only.
        let sb = session(&mut b, &anon, default_patch()).await;
        generate(&mut b, &anon, request(&sb, &["x"], 64, 1, 1)).await.expect("B generates on its session");
        assert_eq!(generate(&mut a, &anon, request(&sb, &["x"], 64, 1, 1)).await.unwrap_err().code(), tonic::Code::NotFound);
        // A bearer token overrides the certificate: B with alice's token is alice.
        let alice = Identity { token: Some("tok-alice".into()), client_id: None };
        let s_alice = session(&mut b, &alice, default_patch()).await;
        b.get_session(alice.request(get(&s_alice), None)).await.expect("alice reads hers");
        assert_eq!(b.get_session(anon.request(get(&s_alice), None)).await.unwrap_err().code(), tonic::Code::NotFound);
        let bad = Identity { token: Some("nope".into()), client_id: None };
        assert_eq!(b.get_session(bad.request(get(&sb), None)).await.unwrap_err().code(), tonic::Code::Unauthenticated);
        server.shutdown().await;
    });
}

#[test]
fn rotated_certificate_files_serve_new_connections() {
    run(Duration::from_secs(60), || async {
        let d = dir("rotation");
        let (ca1, ca2) = (ca("CA one"), ca("CA two"));
        let files = server_files(&d, &leaf(&ca1, &["localhost"], "server-1", false), None);
        let server = tls_server(files.clone(), None).await;
        let (trust1, trust2) = (dir("rotation-c1"), dir("rotation-c2"));
        let (args1, args2) = (client_args(&trust1, &ca1, None), client_args(&trust2, &ca2, None));
        let mut old = connect_tls(&server, &args1).await.expect("before the rotation");
        call(&server, &args2).await.expect_err("CA two is not in use yet");
        // Rotate as Kubernetes does: new files renamed into place.
        let (cert, key) = leaf(&ca2, &["localhost"], "server-2", false);
        std::fs::write(d.join("new.crt"), cert).unwrap();
        std::fs::write(d.join("new.key"), key).unwrap();
        std::fs::rename(d.join("new.key"), &files.key).unwrap();
        std::fs::rename(d.join("new.crt"), &files.cert).unwrap();
        call(&server, &args2).await.expect("new connections see the new certificate");
        call(&server, &args1).await.expect_err("and no longer the old one");
        // The connection made before the rotation keeps working.
        old.list_models(pb::ListModelsRequest {}).await.expect("an open connection survives the rotation");
        // A half-written rotation (a key that does not match) keeps the current certificate.
        let (_, other_key) = leaf(&ca1, &["localhost"], "x", false);
        std::fs::write(&files.key, other_key).unwrap();
        call(&server, &args2).await.expect("a broken rotation keeps the last good certificate");
        server.shutdown().await;
    });
}

#[test]
fn the_cli_speaks_tls() {
    run(Duration::from_secs(120), || async {
        let d = dir("cli");
        let (ca, clients) = (ca("server CA"), ca("client CA"));
        let server = tls_server(server_files(&d, &leaf(&ca, &["localhost"], "server", false), Some(&clients)), None).await;
        let (cert, key) = leaf(&clients, &["cli.example"], "cli", false);
        let (cert, key) = (write(&d, "cli.crt", &cert), write(&d, "cli.key", &key));
        let ca_file = write(&d, "ca.crt", &ca.pem);
        let out = d.join("out");
        let target = format!("https://{}", server.addr());
        let base = [
            "generate",
            "--server",
            &target,
            "--tls-ca",
            ca_file.to_str().unwrap(),
            "--tls-domain",
            "localhost",
            "--prompt",
            "a cat",
            "--steps",
            "1",
            "--width",
            "64",
            "--height",
            "64",
            "--out",
            out.to_str().unwrap(),
        ];
        let cli = |extra: Vec<String>| {
            let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
            args.extend(extra);
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_stylealign")).args(&args).env_remove("STYLEALIGN_SERVER").output().unwrap()
            })
        };
        let o = cli(vec!["--tls-cert".into(), cert.display().to_string(), "--tls-key".into(), key.display().to_string()]).await.unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1, "one image written");
        let o = cli(vec![]).await.unwrap();
        assert!(!o.status.success(), "without a client certificate the CLI fails");
        server.shutdown().await;
    });
}

/// One HTTP/1.1 request over TLS with a client certificate: (status code, body).
async fn https(server: &Server, ca: &Ca, client: &(String, String), method: &str, path: &str, body: &str) -> (u16, String) {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring::default_provider};
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap()).unwrap();
    let chain = vec![CertificateDer::from_pem_slice(client.0.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(client.1.as_bytes()).unwrap();
    let cfg = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
fn http_json_over_mtls_takes_the_identity_from_the_certificate() {
    run(Duration::from_secs(60), || async {
        let d = dir("mtls-http");
        let (ca, clients) = (ca("server CA"), ca("client CA"));
        let server = tls_server(server_files(&d, &leaf(&ca, &["localhost"], "server", false), Some(&clients)), None).await;
        let a = leaf(&clients, &["spiffe://example.org/a"], "a", false);
        let b = leaf(&clients, &[], "client-b", false);
        let (code, body) = https(&server, &ca, &a, "POST", "/v1/sessions", r#"{"model":"tiny"}"#).await;
        assert_eq!(code, 200, "{body}");
        let session: serde_json::Value = serde_json::from_str(&body).unwrap();
        let id = session["sessionId"].as_str().unwrap().to_string();
        let path = format!("/v1/sessions/{id}");
        assert_eq!(https(&server, &ca, &a, "GET", &path, "").await.0, 200, "A reads its session over HTTP");
        let (code, body) = https(&server, &ca, &b, "GET", &path, "").await;
        assert_eq!(code, 404, "B cannot: {body}");
        assert!(body.contains("NOT_FOUND"), "{body}");
        // The same session over gRPC with A's certificate: one identity for both protocols.
        let mut grpc = connect_tls(&server, &client_args(&d, &ca, Some(("a", &a)))).await.unwrap();
        grpc.get_session(pb::GetSessionRequest { session_id: id }).await.expect("A's session over gRPC");
        server.shutdown().await;
    });
}

#[test]
fn the_load_generator_speaks_tls() {
    use stylealign::client::loadtest::{LoadConfig, Mix, load_test};
    use stylealign::sampling::sampler::SamplerKind;
    run(Duration::from_secs(120), || async {
        let d = dir("loadtest");
        let ca = ca("test CA");
        let server = tls_server(server_files(&d, &leaf(&ca, &["localhost"], "server", false), None), None).await;
        let cfg = LoadConfig {
            requests_per_client: Some(2),
            tls: client_args(&d, &ca, None),
            ..LoadConfig::new(vec![format!("https://{}", server.addr())], 2, Mix::fixed(SamplerKind::Ddim, 1, 2, 64))
        };
        let r = load_test(&cfg).await.expect("load over TLS");
        assert_eq!((r.requests, r.ok), (4, 4), "{:?}", r.codes);
        // Without the CA the servers' certificate is not trusted.
        let untrusted = LoadConfig { tls: TlsArgs::default(), ..cfg.clone() };
        assert!(load_test(&untrusted).await.is_err());
        server.shutdown().await;
    });
}
