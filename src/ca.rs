//! The bottle CA and the leaf certificates it signs on the fly.
//!
//! Each bottle gets its own CA (ECDSA P-256, `CA:true, pathlen:0`, key usage limited to
//! signing certificates), minted on first start and reused after. The agent trusts it;
//! every intercepted host gets a leaf minted for exactly that host.
//!
//! Leaves are built for speed and for strict verifiers (OpenSSL `-x509_strict`, Python
//! 3.13's default context): one ECDSA key is generated per process and reused for every
//! leaf, so minting is a single signature; each leaf carries an authority key identifier,
//! the host as its only subjectAltName, serverAuth, and a random serial. A finished
//! rustls `ServerConfig` is cached per host (bounded), sharing one session cache and one
//! ticketer so resumption works across tunnels, and re-minted before the leaf expires.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use prometheus_client::metrics::counter::Counter;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ResolvesServerCertUsingSni, ServerSessionMemoryCache};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use crate::routes::Host;

pub(crate) const CA_KEY_FILE: &str = "ca-key.pem";
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub(crate) const CA_BUNDLE_FILE: &str = "ca-bundle.pem";

/// How long a leaf is valid, and when the cache re-mints it.
const LEAF_LIFETIME: Duration = Duration::from_secs(48 * 3600);
const LEAF_RENEW_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Leaves are back-dated this much for clients whose clocks run a little slow.
const BACKDATE: Duration = Duration::from_secs(3600);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A CA failure, naming the file or step that failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("minting a certificate for {what}: {reason}")]
    Mint { what: String, reason: String },
}

fn file_err(path: &Path, reason: impl ToString) -> CaError {
    CaError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn mint_err(what: impl ToString, reason: impl ToString) -> CaError {
    CaError::Mint {
        what: what.to_string(),
        reason: reason.to_string(),
    }
}

/// The bottle's certificate authority.
pub struct BottleCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
}

impl std::fmt::Debug for BottleCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BottleCa(<key elided>)")
    }
}

/// What [`BottleCa::load_or_mint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaOrigin {
    Loaded,
    Minted,
}

impl BottleCa {
    /// Loads `ca-key.pem` and `ca-cert.pem` from `dir`, or mints and writes them when both
    /// are absent. One without the other, a key that other users can read, or a key that
    /// does not match the certificate is an error: never silently replaced.
    pub fn load_or_mint(dir: &Path) -> Result<(BottleCa, CaOrigin), CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => Ok((BottleCa::load(&key_path, &cert_path)?, CaOrigin::Loaded)),
            (false, false) => {
                let ca = BottleCa::mint()?;
                ca.write(dir, &key_path, &cert_path)?;
                Ok((ca, CaOrigin::Minted))
            }
            (true, false) => Err(file_err(
                &cert_path,
                format!(
                    "missing while {} exists; restore it or remove both",
                    key_path.display()
                ),
            )),
            (false, true) => Err(file_err(
                &key_path,
                format!(
                    "missing while {} exists; restore it or remove both",
                    cert_path.display()
                ),
            )),
        }
    }

    /// Loads the CA without minting (for `ca show`).
    pub fn load_existing(dir: &Path) -> Result<BottleCa, CaError> {
        BottleCa::load(&dir.join(CA_KEY_FILE), &dir.join(CA_CERT_FILE))
    }

    fn mint() -> Result<BottleCa, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| mint_err("the bottle CA", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "egress-proxy");
        dn.push(
            DnType::CommonName,
            format!("egress-proxy bottle CA {}", hex(&random_bytes::<6>()?)),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(|e| mint_err("the bottle CA", e))?;
        Ok(BottleCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    fn write(&self, dir: &Path, key_path: &Path, cert_path: &Path) -> Result<(), CaError> {
        fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let mut key_file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(key_path)
            .map_err(|e| file_err(key_path, e))?;
        key_file
            .write_all(self.issuer.key().serialize_pem().as_bytes())
            .and_then(|_| key_file.sync_all())
            .map_err(|e| file_err(key_path, e))?;
        write_public_file(cert_path, self.cert_pem.as_bytes())
    }

    fn load(key_path: &Path, cert_path: &Path) -> Result<BottleCa, CaError> {
        let meta = fs::metadata(key_path).map_err(|e| file_err(key_path, e))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(file_err(
                key_path,
                format!(
                    "private key is accessible to other users (mode {mode:04o}); run chmod 600 on it"
                ),
            ));
        }
        let key_pem = fs::read_to_string(key_path).map_err(|e| file_err(key_path, e))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| file_err(key_path, format!("not a PEM private key: {e}")))?;
        let cert_pem = fs::read_to_string(cert_path).map_err(|e| file_err(cert_path, e))?;
        let cert_der = <CertificateDer as rustls_pki_types::pem::PemObject>::from_pem_slice(
            cert_pem.as_bytes(),
        )
        .map_err(|e| file_err(cert_path, format!("not a PEM certificate: {e}")))?;
        check_ca_certificate(&cert_der).map_err(|e| file_err(cert_path, e))?;
        let provider = crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            )))
            .map_err(|e| file_err(key_path, e))?;
        CertifiedKey::new(vec![cert_der.clone()], signing_key)
            .keys_match()
            .map_err(|_| file_err(key_path, format!("does not match {}", cert_path.display())))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| file_err(cert_path, format!("cannot be used as an issuer: {e}")))?;
        Ok(BottleCa {
            issuer,
            cert_der,
            cert_pem,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The bottle CA followed by the public roots: for clients whose trust variable
    /// replaces the system store (`SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, …).
    pub fn bundle_pem(&self) -> String {
        let mut out = String::with_capacity(self.cert_pem.len() + 240 * 1024);
        out.push_str(&self.cert_pem);
        for root in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
            out.push_str(&pem_certificate(root));
        }
        out
    }

    /// Writes `ca-cert.pem` and the bundle ([`BottleCa::bundle_pem`]) into `dir` (the
    /// volume the agent mounts), each replaced atomically so an agent never reads half a
    /// file.
    pub fn export(&self, dir: &Path) -> Result<(), CaError> {
        fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        write_public_file(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes())?;
        write_public_file(&dir.join(CA_BUNDLE_FILE), self.bundle_pem().as_bytes())
    }

    /// Mints a leaf for `host` with `leaf_key`'s public key.
    fn mint_leaf(
        &self,
        host: &Host,
        leaf_key: &KeyPair,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let name = host.to_string();
        // A CN is at most 64 characters; a longer host goes in the SAN alone, which rcgen
        // then marks critical, as RFC 5280 asks for an empty subject.
        if name.len() <= 64 {
            dn.push(DnType::CommonName, name.clone());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![match host {
            Host::Ip(ip) => SanType::IpAddress(*ip),
            Host::Name(n) => SanType::DnsName(
                n.clone()
                    .try_into()
                    .map_err(|e| mint_err(&name, format!("not an IA5 name: {e}")))?,
            ),
        }];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let now = OffsetDateTime::from(now);
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        params
            .signed_by(leaf_key, &self.issuer)
            .map(|c| c.der().clone())
            .map_err(|e| mint_err(&name, e))
    }
}

/// Refuses a file that is not a usable CA certificate (not a CA, or expired).
fn check_ca_certificate(der: &CertificateDer<'_>) -> Result<(), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    if !cert.is_ca() {
        return Err("not a CA certificate (basicConstraints CA:false)".into());
    }
    if !cert.validity().is_valid() {
        return Err(format!(
            "CA certificate is not valid now (valid {} to {})",
            cert.validity().not_before,
            cert.validity().not_after
        ));
    }
    Ok(())
}

/// Writes a non-secret file with mode 0644 through a temporary file and a rename.
///
/// The directory may be a volume the agent can write to (`--ca-export`), so no name in it
/// is trusted: the temporary file gets a fresh random name and is opened only if it does
/// not exist yet and is not a symlink (`O_CREAT|O_EXCL|O_NOFOLLOW`), so a link planted
/// there is never written through; the rename then replaces whatever is at `path`, a
/// symlink included, rather than following it.
fn write_public_file(path: &Path, content: &[u8]) -> Result<(), CaError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| file_err(path, "not a file name"))?;
    let suffix = random_bytes::<8>()
        .map_err(|_| file_err(path, "no system randomness for a temporary name"))?;
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", hex(&suffix)));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    let result = (|| {
        f.write_all(content)?;
        // The umask may have narrowed the mode at creation; the agent must read the file.
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        // Ours (created just above), so removing it cannot touch anything else.
        let _ = fs::remove_file(&tmp);
        file_err(path, e)
    })
}

fn pem_certificate(der: &CertificateDer<'_>) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The rustls crypto provider used everywhere: aws-lc-rs, with the AES-128-GCM suites
/// (SHA-256) ahead of AES-256-GCM (SHA-384).
///
/// Why: the handshake's key schedule is HMAC over the suite's hash, and SHA-256 has CPU
/// instructions (SHA-NI) on current x86 and ARM while SHA-384 does not, so a handshake
/// keyed with SHA-384 costs visibly more (docs/decisions.md).
/// AES-128-GCM is also the cheaper cipher for bulk bytes, and a TLS 1.3 mandatory suite
/// at the 128-bit level the rest of the handshake (P-256, X25519) gives anyway. Our
/// server side applies this order (`ignore_client_order`, see [`LeafCache`]); as a
/// client it is the order offered to origins. Otherwise rustls' defaults are unchanged.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            // A stable sort keeps rustls' order within each group.
            provider
                .cipher_suites
                .sort_by_key(|suite| !is_aes_128_gcm(suite.suite()));
            Arc::new(provider)
        })
        .clone()
}

fn is_aes_128_gcm(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

fn random_bytes<const N: usize>() -> Result<[u8; N], CaError> {
    let mut buf = [0u8; N];
    crypto_provider()
        .secure_random
        .fill(&mut buf)
        .map_err(|_| mint_err("a serial number", "no system randomness"))?;
    Ok(buf)
}

/// 16 random bytes, positive (top bit clear) and non-zero.
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = random_bytes::<16>()?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct CachedLeaf {
    config: Arc<ServerConfig>,
    renew_at: SystemTime,
    last_used: u64,
}

/// Mints leaves and caches one `ServerConfig` per host.
pub struct LeafCache {
    ca: BottleCa,
    /// The one key every leaf certifies (rcgen side, to put its public key in the leaf).
    leaf_key: KeyPair,
    /// The same key for rustls to sign handshakes with.
    signing_key: Arc<dyn rustls::sign::SigningKey>,
    /// Every setting a leaf's TLS configuration has but its certificate: each host's
    /// configuration is a clone with its own resolver. Building one through rustls'
    /// builder each time also allocated a session cache only to replace it.
    base_config: ServerConfig,
    capacity: usize,
    entries: Mutex<(HashMap<Host, CachedLeaf>, u64)>,
    hits: Counter,
    misses: Counter,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    pub fn new(ca: BottleCa, capacity: usize) -> Result<LeafCache, CaError> {
        let provider = crypto_provider();
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| mint_err("the leaf key", e))?;
        let signing_key = provider
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                leaf_key.serialize_der(),
            )))
            .map_err(|e| mint_err("the leaf key", e))?;
        let ticketer =
            rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| mint_err("the ticketer", e))?;
        let mut base_config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| mint_err("the TLS configuration", e))?
            .with_no_client_auth()
            // Replaced in every clone (`build_config`); this one resolves nothing.
            .with_cert_resolver(Arc::new(ResolvesServerCertUsingSni::new()));
        base_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Our suite order (see `crypto_provider`), not the agent's.
        base_config.ignore_client_order = true;
        // Shared by every host's configuration, so resumption works across tunnels.
        base_config.session_storage = ServerSessionMemoryCache::new(4096);
        base_config.ticketer = ticketer;
        Ok(LeafCache {
            ca,
            leaf_key,
            signing_key,
            base_config,
            capacity: capacity.max(1),
            entries: Mutex::new((HashMap::new(), 0)),
            hits: Counter::default(),
            misses: Counter::default(),
        })
    }

    pub fn ca(&self) -> &BottleCa {
        &self.ca
    }

    pub fn hits(&self) -> u64 {
        self.hits.get()
    }

    pub fn misses(&self) -> u64 {
        self.misses.get()
    }

    /// The hit and miss counters, for the metrics registry.
    pub fn counters(&self) -> (Counter, Counter) {
        (self.hits.clone(), self.misses.clone())
    }

    /// The TLS server configuration presenting a leaf for exactly `host`.
    pub fn server_config(&self, host: &Host) -> Result<Arc<ServerConfig>, CaError> {
        let now = SystemTime::now();
        {
            let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let (map, tick) = &mut *guard;
            *tick += 1;
            let tick = *tick;
            if let Some(entry) = map.get_mut(host)
                && entry.renew_at > now
            {
                entry.last_used = tick;
                self.hits.inc();
                return Ok(entry.config.clone());
            }
        }
        self.misses.inc();
        // Minted outside the lock: a signature is the slow part, and tunnels to other
        // hosts must not wait for it.
        let config = self.build_config(host, now)?;
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (map, tick) = &mut *guard;
        if map.len() >= self.capacity && !map.contains_key(host) {
            let oldest = map
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(h, _)| h.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        map.insert(
            host.clone(),
            CachedLeaf {
                config: config.clone(),
                renew_at: now + LEAF_RENEW_AFTER,
                last_used: *tick,
            },
        );
        Ok(config)
    }

    fn build_config(&self, host: &Host, now: SystemTime) -> Result<Arc<ServerConfig>, CaError> {
        let leaf = self.ca.mint_leaf(host, &self.leaf_key, now)?;
        let certified = CertifiedKey::new(vec![leaf], self.signing_key.clone());
        let mut config = self.base_config.clone();
        config.cert_resolver = Arc::new(SingleCertAndKey::from(certified));
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_then_reload_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, origin) = BottleCa::load_or_mint(dir.path()).unwrap();
        assert_eq!(origin, CaOrigin::Minted);
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, origin) = BottleCa::load_or_mint(dir.path()).unwrap();
        assert_eq!(origin, CaOrigin::Loaded);
        assert_eq!(ca.cert_pem(), again.cert_pem());
    }

    #[test]
    fn refuses_readable_key_and_half_pairs() {
        let dir = tempfile::tempdir().unwrap();
        BottleCa::load_or_mint(dir.path()).unwrap();
        let key = dir.path().join(CA_KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = BottleCa::load_or_mint(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca-key.pem") && e.contains("0644"), "{e}");
        fs::remove_file(dir.path().join(CA_CERT_FILE)).unwrap();
        let e = BottleCa::load_or_mint(dir.path()).unwrap_err().to_string();
        assert!(e.contains("ca-cert.pem") && e.contains("missing"), "{e}");
    }

    #[test]
    fn leaves_verify_for_their_host_only() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = BottleCa::load_or_mint(dir.path()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crypto_provider(),
        )
        .build()
        .unwrap();
        let cache = LeafCache::new(ca, 2).unwrap();
        for host in ["api.example.com", "127.0.0.1", "::1"] {
            let h = Host::parse(host).unwrap();
            let leaf = cache
                .ca
                .mint_leaf(&h, &cache.leaf_key, SystemTime::now())
                .unwrap();
            let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
            use rustls::client::danger::ServerCertVerifier;
            verifier
                .verify_server_cert(&leaf, &[], &name, &[], rustls_pki_types::UnixTime::now())
                .unwrap();
            let other = rustls_pki_types::ServerName::try_from("other.example.com").unwrap();
            assert!(
                verifier
                    .verify_server_cert(&leaf, &[], &other, &[], rustls_pki_types::UnixTime::now())
                    .is_err()
            );
        }
    }

    #[test]
    fn cache_hits_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = BottleCa::load_or_mint(dir.path()).unwrap();
        let cache = LeafCache::new(ca, 2).unwrap();
        let a = Host::parse("a.example").unwrap();
        let first = cache.server_config(&a).unwrap();
        let second = cache.server_config(&a).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!((cache.hits(), cache.misses()), (1, 1));
        for h in ["b.example", "c.example", "d.example"] {
            cache.server_config(&Host::parse(h).unwrap()).unwrap();
        }
        assert_eq!(cache.entries.lock().unwrap().0.len(), 2);
    }

    #[test]
    fn our_suite_order_wins_over_the_clients() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = BottleCa::load_or_mint(dir.path()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let cache = LeafCache::new(ca, 2).unwrap();
        let server_config = cache
            .server_config(&Host::parse("api.example.com").unwrap())
            .unwrap();
        // A client that prefers AES-256-GCM (rustls' and OpenSSL's default order).
        let client_config = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        );
        assert_eq!(
            client_config.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let name = rustls_pki_types::ServerName::try_from("api.example.com").unwrap();
        let mut client = rustls::ClientConnection::new(client_config, name).unwrap();
        let mut server = rustls::ServerConnection::new(server_config).unwrap();
        for _ in 0..10 {
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        assert!(!client.is_handshaking(), "handshake did not complete");
        let suite = server.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }

    #[test]
    fn export_never_writes_through_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = BottleCa::load_or_mint(&dir.path().join("ca")).unwrap();
        let export = dir.path().join("export");
        fs::create_dir(&export).unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "victim").unwrap();
        for name in [
            "ca-cert.pem",
            "ca-bundle.pem",
            "ca-cert.pem.tmp",
            "ca-bundle.pem.tmp",
        ] {
            std::os::unix::fs::symlink(&victim, export.join(name)).unwrap();
        }
        ca.export(&export).unwrap();
        ca.export(&export).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "victim");
        for name in [CA_CERT_FILE, CA_BUNDLE_FILE] {
            let meta = fs::symlink_metadata(export.join(name)).unwrap();
            assert!(meta.file_type().is_file(), "{name}");
            assert_eq!(meta.permissions().mode() & 0o777, 0o644, "{name}");
        }
        assert_eq!(
            fs::read_to_string(export.join(CA_CERT_FILE)).unwrap(),
            ca.cert_pem()
        );
        // Nothing of ours is left behind but the two files (and the planted links).
        let left: Vec<_> = fs::read_dir(&export)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".tmp") && !n.starts_with("ca-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn bundle_has_ca_then_public_roots() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = BottleCa::load_or_mint(dir.path()).unwrap();
        let bundle = ca.bundle_pem();
        assert!(bundle.starts_with(ca.cert_pem()));
        let n = bundle.matches("BEGIN CERTIFICATE").count();
        assert_eq!(n, 1 + webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
        let parsed: Vec<_> =
            <CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(bundle.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(parsed.len(), n);
    }
}
