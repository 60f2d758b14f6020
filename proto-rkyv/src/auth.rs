//! Shared-secret authentication: a mutual HMAC-SHA256 challenge-response.
//!
//! 1. client -> HELLO; server -> `HelloReply { auth_required, server_nonce }`
//! 2. client -> `AuthRequest { client_nonce, proof }` with
//!    `proof = HMAC(secret, "shardstore-auth-v1 client" || server_nonce || client_nonce)`
//! 3. server checks the proof in constant time; on success it answers
//!    `AuthReply { server_proof }` with
//!    `server_proof = HMAC(secret, "shardstore-auth-v1 server" || client_nonce || server_nonce)`,
//!    which the client checks, so a client holding a secret never talks to an
//!    impostor. On failure the server answers UNAUTHORIZED and closes.
//!
//! Both nonces are 32 random bytes, so neither side can replay an old
//! exchange. The secret itself never crosses the wire.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest secret accepted (bytes).
pub const MIN_SECRET_LEN: usize = 16;
/// Longest secret accepted (bytes).
pub const MAX_SECRET_LEN: usize = 4096;

const CLIENT_LABEL: &[u8] = b"shardstore-auth-v1 client";
const SERVER_LABEL: &[u8] = b"shardstore-auth-v1 server";

fn mac(secret: &[u8], label: &[u8], a: &[u8; 32], b: &[u8; 32]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(a);
    m.update(b);
    m
}

pub fn client_proof(secret: &[u8], server_nonce: &[u8; 32], client_nonce: &[u8; 32]) -> [u8; 32] {
    mac(secret, CLIENT_LABEL, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .into()
}

pub fn server_proof(secret: &[u8], server_nonce: &[u8; 32], client_nonce: &[u8; 32]) -> [u8; 32] {
    mac(secret, SERVER_LABEL, client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Constant-time check of a client's proof.
pub fn verify_client(
    secret: &[u8],
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 32],
    proof: &[u8; 32],
) -> bool {
    mac(secret, CLIENT_LABEL, server_nonce, client_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Constant-time check of a server's proof.
pub fn verify_server(
    secret: &[u8],
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 32],
    proof: &[u8; 32],
) -> bool {
    mac(secret, SERVER_LABEL, client_nonce, server_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Why a secret file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading secret file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "secret file {path} holds {len} bytes; a secret needs {MIN_SECRET_LEN}..={MAX_SECRET_LEN}"
    )]
    Length { path: String, len: usize },
}

/// Reads a secret from a file (never from the command line): the file's
/// bytes with trailing whitespace (a final newline) removed.
pub fn read_secret_file(path: &std::path::Path) -> Result<Vec<u8>, SecretError> {
    let p = path.display().to_string();
    let mut bytes = std::fs::read(path).map_err(|source| SecretError::Read {
        path: p.clone(),
        source,
    })?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if !(MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&bytes.len()) {
        return Err(SecretError::Length {
            path: p,
            len: bytes.len(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_and_nonces() {
        let (s, sn, cn) = (b"0123456789abcdef-secret", [1u8; 32], [2u8; 32]);
        let p = client_proof(s, &sn, &cn);
        assert!(verify_client(s, &sn, &cn, &p));
        assert!(!verify_client(b"0123456789abcdef-other!", &sn, &cn, &p));
        assert!(
            !verify_client(s, &[9u8; 32], &cn, &p),
            "old server nonce must not verify"
        );
        assert!(
            !verify_client(s, &sn, &cn, &server_proof(s, &sn, &cn)),
            "roles are distinct"
        );
        let sp = server_proof(s, &sn, &cn);
        assert!(verify_server(s, &sn, &cn, &sp));
        assert!(!verify_server(s, &sn, &[3u8; 32], &sp));
    }

    #[test]
    fn secret_files_are_trimmed_and_length_checked() {
        let dir = std::env::temp_dir().join(format!("ss-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s");
        std::fs::write(&f, b"a-long-enough-secret\n").unwrap();
        assert_eq!(read_secret_file(&f).unwrap(), b"a-long-enough-secret");
        std::fs::write(&f, b"short\n").unwrap();
        assert!(matches!(
            read_secret_file(&f),
            Err(SecretError::Length { len: 5, .. })
        ));
        assert!(matches!(
            read_secret_file(&dir.join("missing")),
            Err(SecretError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
