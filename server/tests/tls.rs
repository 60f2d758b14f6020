//! TLS on every listener, with certificates generated at test time (rcgen):
//! server authentication, and optional client-certificate verification.

mod common;
use common::*;
use shardstore_client::{Client, ClientConfig, ClientError, ClientTls};
use shardstore_proto::{ChunkId, ShardId};
use std::path::{Path, PathBuf};

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

/// A CA, a server certificate for `names`, a client certificate, and an
/// unrelated CA.
fn make_pki(dir: &Path, names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let w = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client".into()])
        .unwrap()
        .signed_by(&client_key, &ca, &ca_key)
        .unwrap();
    let other_key = KeyPair::generate().unwrap();
    let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let other = other_params.self_signed(&other_key).unwrap();
    Pki {
        ca: w("ca.pem", ca.pem()),
        server_cert: w("server.pem", server.pem()),
        server_key: w("server.key", server_key.serialize_pem()),
        client_cert: w("client.pem", client.pem()),
        client_key: w("client.key", client_key.serialize_pem()),
        other_ca: w("other-ca.pem", other.pem()),
    }
}

fn tls_client(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientConfig {
    ClientConfig {
        tls: Some(ClientTls {
            config: shardstore_net::tls::client_config(ca, identity).unwrap(),
            server_name: Some("localhost".into()),
        }),
        ..ClientConfig::default()
    }
}

/// The sum over shards of `shardstore_tls_failures_total` at `maddr`.
async fn tls_failures_metric(maddr: &str) -> u64 {
    let maddr = maddr.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&maddr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.lines()
            .filter(|l| l.starts_with("shardstore_tls_failures_total{"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_server_and_client_certificates() {
    let dir = data_dir("tls");
    let pki = make_pki(&dir, &["localhost", "127.0.0.1"]);
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let (cert, key, ca) = (s(&pki.server_cert), s(&pki.server_key), s(&pki.ca));
    let key_mode = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pki.server_key, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    key_mode(0o644);
    let maddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let srv = TestServer::try_start(
        &dir,
        2,
        &[
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--metrics-addr",
            &maddr,
            "--metrics-interval-ms",
            "100",
        ],
    )
    .unwrap();
    let warning = "tls_key_file (the server's private key) is readable by every user";
    assert!(
        srv.log().contains(warning),
        "no warning about a world-readable key"
    );
    // Trusting the CA: every operation works on every shard connection.
    let c = Client::connect_with(&srv.addr, tls_client(&pki.ca, None))
        .await
        .unwrap();
    let data = pattern(5, 100_000);
    c.write(ChunkId(7), 0, data.clone()).await.unwrap();
    assert_eq!(
        &c.read(ChunkId(7), 0, 100_000).await.unwrap().data[..],
        &data[..]
    );
    for sh in 0..2 {
        c.ping_shard(ShardId(sh)).await.unwrap();
    }
    // Trusting another CA: the handshake fails with a typed error.
    let e = Client::connect_with(&srv.addr, tls_client(&pki.other_ca, None))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Tls(_)), "{e:?}");
    // Plain TCP to a TLS server gets nowhere and does not hurt it.
    assert!(Client::connect(&srv.addr).await.is_err());
    c.ping().await.unwrap();
    // The failed handshakes (each of those connects, its retry included)
    // are counted, in STATS and in /metrics, on whichever shard took each
    // connection.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut stats = 0;
        for sh in 0..2 {
            stats += c.stats(ShardId(sh)).await.unwrap().tls_failures;
        }
        let metrics = tls_failures_metric(&maddr).await;
        if stats >= 2 && metrics == stats {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "failed handshakes: {stats} in STATS, {metrics} in /metrics, 2 or more expected"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(srv);

    // Client certificates required.
    key_mode(0o600);
    let dir2 = data_dir("mtls");
    let srv = TestServer::try_start(
        &dir2,
        1,
        &[
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-client-ca-file",
            &ca,
        ],
    )
    .unwrap();
    let ok = Client::connect_with(
        &srv.addr,
        tls_client(&pki.ca, Some((&pki.client_cert, &pki.client_key))),
    )
    .await
    .unwrap();
    ok.write(ChunkId(8), 0, vec![1u8; 10]).await.unwrap();
    assert!(
        !srv.log().contains(warning),
        "a warning about a key only its owner reads"
    );
    let anon = Client::connect_with(&srv.addr, tls_client(&pki.ca, None)).await;
    assert!(anon.is_err(), "a client without a certificate was served");
    ok.ping().await.unwrap();
}

/// A certificate naming only the host the user typed: shard connections
/// (to the addresses the topology advertises, IPs) verify against that
/// name too, not against the advertised IP (they used to fail with `Tls`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_connections_verify_the_name_the_user_gave() {
    let dir = data_dir("tls-name");
    let pki = make_pki(&dir, &["localhost"]);
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let (cert, key) = (s(&pki.server_cert), s(&pki.server_key));
    let srv = TestServer::try_start(&dir, 2, &["--tls-cert-file", &cert, "--tls-key-file", &key])
        .unwrap();
    let port = srv.addr.rsplit_once(':').unwrap().1;
    let mut cfg = tls_client(&pki.ca, None);
    cfg.tls.as_mut().unwrap().server_name = None;
    let c = Client::connect_with(&format!("localhost:{port}"), cfg)
        .await
        .unwrap();
    assert!(c.config().route_direct);
    for sh in 0..2 {
        c.ping_shard(ShardId(sh)).await.unwrap();
    }
    let data = pattern(9, 5000);
    for chunk in 0..8 {
        c.write(ChunkId(chunk), 0, data.clone()).await.unwrap();
    }
}
