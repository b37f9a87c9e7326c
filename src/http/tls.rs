//! TLS listeners' certificates: read from their PEM files at start and again on reload (SIGHUP,
//! `POST /api/v1/reload`), swapped under the acceptor so that new handshakes get the new
//! certificate while open connections keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// A listener's certificate chain and key, with the files they come from.
#[derive(Debug)]
pub struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl CertFiles {
    /// Reads the files; the key must match the certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertFiles>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let current = read(cert, key, &provider)?;
        Ok(Arc::new(CertFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: parking_lot::RwLock::new(current),
        }))
    }

    /// Reads the files again; on any problem the certificate in use stays and the error says
    /// what is wrong.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = read(&self.cert, &self.key, &self.provider)?;
        *self.current.write() = fresh;
        Ok(())
    }

    /// The certificate file (for reports).
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// An acceptor serving this certificate (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn acceptor(self: &Arc<Self>) -> Result<tokio_rustls::TlsAcceptor, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn read(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, String> {
    let open = |path: &Path, what: &str| {
        std::fs::File::open(path)
            .map(std::io::BufReader::new)
            .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
    };
    let chain = rustls_pemfile::certs(&mut open(cert, "tls_cert")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate in {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let private = rustls_pemfile::private_key(&mut open(key, "tls_key")?)
        .map_err(|e| format!("bad key in {}: {e}", key.display()))?
        .ok_or_else(|| format!("no private key in {}", key.display()))?;
    let certified = CertifiedKey::from_der(chain, private, provider).map_err(|e| {
        format!(
            "certificate and key do not match ({} and {}): {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(certified))
}
