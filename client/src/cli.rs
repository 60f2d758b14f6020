//! Command-line flags for how a tool connects securely (feature `cli`),
//! shared by the admin CLI and the load generator so both speak the same
//! flags.

use crate::{ClientConfig, ClientError, ClientTls, Secret};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// File holding the shared secret of a server that requires authentication.
    #[arg(long, env = "SHARDSTORE_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Connect with TLS, trusting the CA certificate(s) in this PEM file.
    #[arg(long)]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for servers that verify clients.
    /// Needs --tls-ca-file: without it the connection is plain TCP, so a
    /// certificate alone is refused rather than silently unused.
    #[arg(long, requires = "tls_key_file", requires = "tls_ca_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert-file.
    #[arg(long, requires = "tls_cert_file", requires = "tls_ca_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Name to verify the server certificate against (default: the address's host).
    #[arg(long)]
    pub tls_server_name: Option<String>,
}

impl SecurityArgs {
    /// Loads the secret and TLS files into `cfg`.
    pub fn apply(&self, cfg: &mut ClientConfig) -> Result<(), ClientError> {
        if let Some(p) = &self.secret_file {
            cfg.secret = Some(Secret::from_file(p).map_err(|e| ClientError::Auth(e.to_string()))?);
        }
        if let Some(ca) = &self.tls_ca_file {
            let identity = self
                .tls_cert_file
                .as_deref()
                .zip(self.tls_key_file.as_deref());
            cfg.tls = Some(ClientTls::from_pem_files(
                ca,
                identity,
                self.tls_server_name.clone(),
            )?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Tool {
        #[command(flatten)]
        security: SecurityArgs,
    }

    fn parse(args: &[&str]) -> Result<SecurityArgs, clap::Error> {
        Tool::try_parse_from(std::iter::once("tool").chain(args.iter().copied()))
            .map(|t| t.security)
    }

    /// A client certificate without a CA file would connect in plain text
    /// and never present it: refused at parse time instead.
    #[test]
    fn client_identity_needs_the_ca_file() {
        let identity = ["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"];
        let e = parse(&identity).unwrap_err();
        assert_eq!(
            e.kind(),
            clap::error::ErrorKind::MissingRequiredArgument,
            "{e}"
        );
        assert!(e.to_string().contains("--tls-ca-file"), "{e}");
        for one in [&identity[..2], &identity[2..]] {
            assert!(parse(one).is_err(), "{one:?} was accepted");
        }
        let mut all = identity.to_vec();
        all.extend(["--tls-ca-file", "ca.pem"]);
        let a = parse(&all).unwrap();
        assert!(a.tls_ca_file.is_some() && a.tls_cert_file.is_some() && a.tls_key_file.is_some());
        assert!(parse(&["--tls-ca-file", "ca.pem"]).is_ok());
    }
}
