//! Mutual TLS between the members of a cluster, and the identities certificates carry.
//!
//! Every certificate is signed by the cluster's CA and names exactly one identity, as a DNS
//! subject alternative name under the cluster's own domain:
//!
//! ```text
//!   node-<id>.<cluster id>.xdevice    a member, node <id>
//!   admin.<cluster id>.xdevice        an operator's tools (the `xdevice cluster` commands)
//! ```
//!
//! Both ends present a certificate. A client checks that the server's certificate chains to the
//! CA and names a member of this cluster (the very node it dialled, when it knows which); a
//! server checks the client's chain during the handshake, then holds the connection's `HELLO` to
//! the identity in the certificate (`Identity::hello_id`): a certificate for node 5 cannot speak
//! as node 2, and a certificate of another cluster names another domain and is signed by another
//! CA. Which requests an identity may send is the handler's decision (`rpc::Caller`).
//!
//! `create_dev` makes a development CA and certificates for a quick start. Production
//! certificates come from files (`TlsFiles`), issued by whatever CA the operator runs, as long as
//! they carry these names.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use uuid::Uuid;

/// The top of every name a certificate carries.
pub const DOMAIN: &str = "xdevice";

/// Who a certificate speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A member: node `id` of the cluster.
    Member(u64),
    /// An operator's tools: cluster commands, status.
    Admin,
}

impl Identity {
    /// The name this identity's certificate carries in `cluster`.
    pub fn name(&self, cluster: Uuid) -> String {
        match self {
            Identity::Member(id) => format!("node-{id}.{cluster}.{DOMAIN}"),
            Identity::Admin => format!("admin.{cluster}.{DOMAIN}"),
        }
    }

    /// The node id this identity sends in `HELLO`: a member's own, 0 for the admin.
    pub fn hello_id(&self) -> u64 {
        match self {
            Identity::Member(id) => *id,
            Identity::Admin => 0,
        }
    }

    /// The identity `name` stands for in `cluster`, if it is one of this cluster's names.
    pub fn parse(name: &str, cluster: Uuid) -> Option<Identity> {
        let suffix = format!(".{cluster}.{DOMAIN}");
        let label = name.strip_suffix(suffix.as_str())?;
        if label == "admin" {
            return Some(Identity::Admin);
        }
        let id: u64 = label.strip_prefix("node-")?.parse().ok()?;
        (id != 0 && id.to_string() == label["node-".len()..]).then_some(Identity::Member(id))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Member(id) => write!(f, "node {id}"),
            Identity::Admin => f.write_str("admin"),
        }
    }
}

/// The identity `cert` names in `cluster`: its one subject alternative name under the cluster's
/// domain. A certificate naming none, or more than one, names nobody.
pub fn identity_of(cert: &CertificateDer<'_>, cluster: Uuid) -> Result<Identity, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let names: Vec<String> = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("unreadable subject alternative names: {e}")),
    };
    let ours: Vec<Identity> = names.iter().filter_map(|n| Identity::parse(n, cluster)).collect();
    match ours.as_slice() {
        [one] => Ok(*one),
        [] => Err(format!(
            "the certificate names no identity of cluster {cluster} (its names: {})",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        )),
        _ => Err(format!("the certificate names {} identities of cluster {cluster}", ours.len())),
    }
}

/// Where one identity's CA, certificate and key are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `create_dev` writes for `identity` in `dir`: `ca.pem`, and `node-<id>.pem` and
    /// `.key` (or `admin.pem` and `.key`).
    pub fn in_dir(dir: &Path, identity: Identity) -> TlsFiles {
        let stem = match identity {
            Identity::Member(id) => format!("node-{id}"),
            Identity::Admin => "admin".to_string(),
        };
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        }
    }
}

/// One identity's TLS configuration in one cluster, for both ends of a connection.
#[derive(Clone)]
pub struct Tls {
    cluster: Uuid,
    identity: Identity,
    server: Arc<ServerConfig>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cluster", &self.cluster)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// ring's primitives (aws-lc-rs, rustls' default, builds its C with cmake: slower to build,
/// and one more tool to install, for no gain on a cluster's private links).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// Loads `files` for `identity` of `cluster`. Fails, naming the file and the problem, if a
    /// file is missing or unreadable, the certificate does not name `identity` of `cluster`, or
    /// it is not signed by the CA.
    pub fn load(files: &TlsFiles, cluster: Uuid, identity: Identity) -> Result<Tls, String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| format!("TLS file {}: {e}", path.display()))
        };
        let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, String> {
            let pem = read(path)?;
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
            let certs = certs.map_err(|e| format!("TLS file {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("TLS file {} holds no certificate", path.display()));
            }
            Ok(certs)
        };
        let ca = certs(&files.ca)?;
        let chain = certs(&files.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
            .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| format!("CA {}: {e}", files.ca.display()))?;
        }
        let named = identity_of(&chain[0], cluster)
            .map_err(|e| format!("certificate {}: {e}", files.cert.display()))?;
        if named != identity {
            return Err(format!(
                "certificate {} is for {named}, not {identity} of cluster {cluster}",
                files.cert.display()
            ));
        }
        Tls::new(cluster, identity, Arc::new(roots), chain, key).map_err(|e| {
            format!("certificate {} with CA {}: {e}", files.cert.display(), files.ca.display())
        })
    }

    fn new(
        cluster: Uuid,
        identity: Identity,
        roots: Arc<RootCertStore>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Tls, String> {
        let provider = provider();
        // Our own certificate must pass the check a peer makes of it: refused here, at start,
        // rather than by every peer later.
        let check = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(identity.name(cluster)).map_err(|e| e.to_string())?;
        check
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map_err(|e| format!("not valid under this CA: {e}"))?;
        let clients = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("key does not fit the certificate: {e}"))?;
        Ok(Tls {
            cluster,
            identity,
            server: Arc::new(server),
            roots,
            chain,
            key: Arc::new(key),
            provider,
        })
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    pub fn cluster(&self) -> Uuid {
        self.cluster
    }

    /// Accepts connections; a client without a certificate the CA signed is refused in the
    /// handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// Connects to a member of this cluster: node `peer` if given, any member otherwise.
    pub fn connector(&self, peer: Option<u64>) -> Result<tokio_rustls::TlsConnector, String> {
        let inner =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        let verifier = Arc::new(MemberVerifier { cluster: self.cluster, peer, inner });
        let config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| e.to_string())?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }

    /// The name a client puts in its handshake (SNI): the cluster's domain. Servers ignore it;
    /// `MemberVerifier` checks the certificate itself.
    pub fn server_name(&self) -> ServerName<'static> {
        ServerName::try_from(format!("{}.{DOMAIN}", self.cluster))
            .unwrap_or_else(|_| ServerName::try_from(DOMAIN).expect("a valid DNS name"))
    }
}

/// A client's check of a server certificate: signed by the cluster's CA (webpki's checks: chain,
/// validity, key usage) and naming a member of this cluster, the expected node when known.
#[derive(Debug)]
struct MemberVerifier {
    cluster: Uuid,
    peer: Option<u64>,
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refuse = |why: String| rustls::Error::General(why);
        let identity = identity_of(end_entity, self.cluster).map_err(refuse)?;
        match (identity, self.peer) {
            (Identity::Member(id), Some(want)) if id != want => {
                return Err(refuse(format!(
                    "the server's certificate is for node {id}, not {want}"
                )))
            }
            (Identity::Member(_), _) => {}
            (Identity::Admin, _) => {
                return Err(refuse("the server presented an admin certificate".to_string()))
            }
        }
        let name =
            ServerName::try_from(identity.name(self.cluster)).map_err(|e| refuse(e.to_string()))?;
        self.inner.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Where a process takes its TLS material from, before it knows its cluster id (a member reads
/// it from its store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSource {
    /// Clear text, unauthenticated (`--plaintext`).
    Plaintext,
    /// `ca.pem` and the identity's files in a directory (`TlsFiles::in_dir`).
    Dir(PathBuf),
    /// Files named one by one.
    Files(TlsFiles),
}

impl TlsSource {
    /// The connections' security for `identity` of `cluster`.
    pub fn security(&self, cluster: Uuid, identity: Identity) -> Result<super::Security, String> {
        let files = match self {
            TlsSource::Plaintext => return Ok(super::Security::Plaintext),
            TlsSource::Dir(dir) => TlsFiles::in_dir(dir, identity),
            TlsSource::Files(files) => files.clone(),
        };
        Ok(super::Security::Tls(Arc::new(Tls::load(&files, cluster, identity)?)))
    }
}

/// What `create_dev` did with each file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Made {
    Created(PathBuf),
    /// Already there; left as it was.
    Kept(PathBuf),
}

/// A development CA for `cluster` in `dir` (made unless `ca.pem` and `ca.key` are there), and a
/// certificate and key for each of `members` and for the admin, signed by it. Existing files are
/// kept, so members can be added later with the same CA. Keys are written readable by the owner
/// only. For tests and quick starts: the CA's key sits beside the certificates.
pub fn create_dev(dir: &Path, cluster: Uuid, members: &[u64]) -> Result<Vec<Made>, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let fail = |what: &str, e: &dyn fmt::Display| format!("{what}: {e}");
    std::fs::create_dir_all(dir).map_err(|e| fail(&dir.display().to_string(), &e))?;
    let mut made = Vec::new();
    let (ca_pem, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (ca, ca_keys) = if ca_pem.exists() && ca_key.exists() {
        let key_pem = std::fs::read_to_string(&ca_key).map_err(|e| fail("reading ca.key", &e))?;
        let keys = KeyPair::from_pem(&key_pem).map_err(|e| fail("ca.key", &e))?;
        let cert_pem = std::fs::read_to_string(&ca_pem).map_err(|e| fail("reading ca.pem", &e))?;
        let params =
            CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| fail("ca.pem", &e))?;
        // The same subject and key as the file's: what it signs verifies against ca.pem.
        let ca = params.self_signed(&keys).map_err(|e| fail("ca.pem", &e))?;
        made.push(Made::Kept(ca_pem.clone()));
        (ca, keys)
    } else {
        let keys = KeyPair::generate().map_err(|e| fail("CA key", &e))?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA", &e))?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, format!("xdevice development CA of cluster {cluster}"));
        let ca = params.self_signed(&keys).map_err(|e| fail("CA", &e))?;
        write_private(&ca_key, &keys.serialize_pem())?;
        std::fs::write(&ca_pem, ca.pem()).map_err(|e| fail(&ca_pem.display().to_string(), &e))?;
        made.push(Made::Created(ca_pem.clone()));
        (ca, keys)
    };
    let identities =
        members.iter().map(|id| Identity::Member(*id)).chain(std::iter::once(Identity::Admin));
    for identity in identities {
        if identity == Identity::Member(0) {
            return Err("node id 0 is not a member's id".to_string());
        }
        let files = TlsFiles::in_dir(dir, identity);
        if files.cert.exists() && files.key.exists() {
            made.push(Made::Kept(files.cert));
            continue;
        }
        let keys = KeyPair::generate().map_err(|e| fail("key", &e))?;
        let mut params =
            CertificateParams::new(vec![identity.name(cluster)]).map_err(|e| fail("params", &e))?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("xdevice {identity} of cluster {cluster}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&keys, &ca, &ca_keys).map_err(|e| fail("signing", &e))?;
        write_private(&files.key, &keys.serialize_pem())?;
        std::fs::write(&files.cert, cert.pem())
            .map_err(|e| fail(&files.cert.display().to_string(), &e))?;
        made.push(Made::Created(files.cert));
    }
    Ok(made)
}

/// Writes `text` to a new file at `path` readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_foreign_names_are_nobody() {
        let c = Uuid::from_u128(7);
        for id in [Identity::Member(1), Identity::Member(u64::MAX), Identity::Admin] {
            assert_eq!(Identity::parse(&id.name(c), c), Some(id));
            assert_eq!(Identity::parse(&id.name(c), Uuid::from_u128(8)), None);
        }
        for bad in ["node-0", "node-01", "node-x", "node-", "nodes-1", "admin2", ""] {
            assert_eq!(Identity::parse(&format!("{bad}.{c}.{DOMAIN}"), c), None, "{bad}");
        }
    }

    #[test]
    fn dev_certificates_load_for_their_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        let c = Uuid::from_u128(0x11);
        let made = create_dev(dir.path(), c, &[1, 2]).unwrap();
        assert_eq!(made.iter().filter(|m| matches!(m, Made::Created(_))).count(), 4);
        let one =
            Tls::load(&TlsFiles::in_dir(dir.path(), Identity::Member(1)), c, Identity::Member(1))
                .unwrap();
        assert_eq!(one.identity(), Identity::Member(1));
        Tls::load(&TlsFiles::in_dir(dir.path(), Identity::Admin), c, Identity::Admin).unwrap();
        // Node 2's files loaded as node 1: refused, naming both.
        let e =
            Tls::load(&TlsFiles::in_dir(dir.path(), Identity::Member(2)), c, Identity::Member(1))
                .unwrap_err();
        assert!(e.contains("is for node 2, not node 1"), "{e}");
        // Another cluster's id: the certificate names nobody there.
        let e = Tls::load(
            &TlsFiles::in_dir(dir.path(), Identity::Member(1)),
            Uuid::from_u128(0x12),
            Identity::Member(1),
        )
        .unwrap_err();
        assert!(e.contains("names no identity of cluster"), "{e}");
        // A member added later is signed by the same CA; the old files are kept.
        let again = create_dev(dir.path(), c, &[1, 3]).unwrap();
        assert!(again.contains(&Made::Kept(dir.path().join("node-1.pem"))));
        assert!(again.contains(&Made::Created(dir.path().join("node-3.pem"))));
        Tls::load(&TlsFiles::in_dir(dir.path(), Identity::Member(3)), c, Identity::Member(3))
            .unwrap();
        // A certificate from another CA with this CA's file: refused.
        let other = tempfile::tempdir().unwrap();
        create_dev(other.path(), c, &[1]).unwrap();
        let mut mixed = TlsFiles::in_dir(other.path(), Identity::Member(1));
        mixed.ca = dir.path().join("ca.pem");
        let e = Tls::load(&mixed, c, Identity::Member(1)).unwrap_err();
        assert!(e.contains("not valid under this CA"), "{e}");
        let key = std::fs::metadata(dir.path().join("node-1.key")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn missing_and_garbage_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = Uuid::from_u128(0x13);
        create_dev(dir.path(), c, &[1]).unwrap();
        let files = TlsFiles::in_dir(dir.path(), Identity::Member(1));
        std::fs::write(&files.cert, b"not a certificate").unwrap();
        let e = Tls::load(&files, c, Identity::Member(1)).unwrap_err();
        assert!(e.contains("node-1.pem") && e.contains("no certificate"), "{e}");
        let missing = TlsFiles::in_dir(dir.path(), Identity::Member(9));
        let e = Tls::load(&missing, c, Identity::Member(9)).unwrap_err();
        assert!(e.contains("node-9.pem"), "{e}");
    }
}
