//! TLS configuration for TCP connections (rustls with the `ring` provider):
//! loading PEM files into server and client configurations. The handshake
//! itself runs over each side's runtime (futures-rustls on the server's
//! glommio streams, tokio-rustls in the client).

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in the PEM file")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: p.clone(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: p.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: p,
            what: "certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: p.clone(),
        source,
    })?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(file))
        .map_err(|source| TlsError::Read {
            path: p.clone(),
            source,
        })?
        .ok_or(TlsError::Empty {
            path: p,
            what: "private key",
        })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in read_certs(path)? {
        store
            .add(c)
            .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration from a certificate chain and its key; with
/// `client_ca`, clients must present a certificate signed by that CA.
pub fn server_config(
    cert_chain: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder
        .with_single_cert(read_certs(cert_chain)?, read_key(key)?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(cfg))
}

/// A client configuration trusting `ca`; with `identity` (certificate chain,
/// key) the client authenticates itself to servers that ask.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?);
    let cfg = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(read_certs(chain)?, read_key(key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_load_from_generated_pem_files() {
        let dir = std::env::temp_dir().join(format!("ss-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
        server_config(&dir.join("cert.pem"), &dir.join("key.pem"), None).unwrap();
        server_config(
            &dir.join("cert.pem"),
            &dir.join("key.pem"),
            Some(&dir.join("cert.pem")),
        )
        .unwrap();
        client_config(&dir.join("cert.pem"), None).unwrap();
        // A key file given as the certificate is a clear error, not a panic.
        let e = server_config(&dir.join("key.pem"), &dir.join("key.pem"), None).unwrap_err();
        assert!(
            matches!(
                e,
                TlsError::Empty {
                    what: "certificate",
                    ..
                }
            ),
            "{e}"
        );
        let e = client_config(&dir.join("missing.pem"), None).unwrap_err();
        assert!(matches!(e, TlsError::Read { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
