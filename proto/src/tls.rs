//! Transport security for every hop, in one place: TLS 1.3 through rustls (ring), where each
//! side presents its own ed25519 identity key as a raw public key (RFC 7250) instead of a
//! certificate. No certificate authority is involved:
//! - a caller pins the id of the node it means to reach (the id the signed layout names for
//!   that address, or the pool id for the coordinator), and the handshake fails unless the
//!   peer proves it holds that very key;
//! - a server learns the caller's key from the handshake ([`PeerInfo`]) and refuses a request
//!   signed by any other key ([`crate::verify_request`]), so a signed request cannot travel on
//!   somebody else's connection.
//!
//! Plaintext exists only as [`Security::InsecurePlaintext`], behind each binary's
//! `--insecure-plaintext` debugging flag.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};
use shardfarm_core::identity::NodeId;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::conns::{ConnState, Connections, HandshakeTurns, Held};

/// How long a caller may take to connect and finish the handshake before the dial fails.
pub const DIAL_DEADLINE: Duration = Duration::from_secs(5);
/// How long an accepted connection may take to finish the handshake before it is dropped;
/// well under [`DIAL_DEADLINE`], so honest callers outlast stalled handshakes.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);
/// Handshakes a server runs at once, from everyone.
pub const MAX_HANDSHAKES: usize = 1024;
/// Handshakes a server runs at once for one peer address: a peer that opens connections and
/// stalls them takes this many slots, not all of them.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 16;
/// Open connections a server keeps, from everyone (each holds a descriptor and buffers).
pub const MAX_CONNECTIONS: usize = 4096;
/// Open connections a server keeps for one peer address (a whole local farm shares
/// 127.0.0.1, so this is generous).
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 512;
/// Bytes read from the socket at once under TLS. rustls asks for ~4 KiB per read; without a
/// buffer underneath, a 16 KiB record costs four system calls and TLS ~30 % of get
/// throughput (`bench tls`).
const READ_BUFFER: usize = 64 << 10;
/// A read or write of at least this many bytes makes a connection busy (not idle): a shard's
/// stream moves chunks far larger, while pings and window updates, which cost an idler
/// nothing, are far smaller.
const BUSY_BYTES: usize = 4 << 10;
/// The name a caller sends; nothing checks it (the pinned key is the identity).
const SERVER_NAME: &str = "node.shardfarm.invalid";

/// Whether a hop is protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Security {
    /// TLS 1.3, both sides proving their identity keys.
    #[default]
    Tls,
    /// HTTP/2 without TLS: nobody's identity is checked on the connection and anyone on the
    /// path reads and rewrites everything. For debugging only.
    InsecurePlaintext,
}

impl Security {
    /// `InsecurePlaintext` if `insecure` (a binary's `--insecure-plaintext` flag), else `Tls`.
    pub fn from_flag(insecure: bool) -> Self {
        if insecure { Security::InsecurePlaintext } else { Security::Tls }
    }
}

/// What a server knows about the other end of a connection (a request extension).
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub addr: Option<SocketAddr>,
    /// The key the peer proved in the TLS handshake (`None` in plaintext).
    pub key: Option<VerifyingKey>,
    /// The connection's place among the server's connections (served over [`incoming`]):
    /// a handler reports verified requests on it ([`ConnState::note_request`]).
    pub conn: Option<Arc<ConnState>>,
}

impl PeerInfo {
    /// The peer of a request served over [`incoming`] (plaintext servers from elsewhere yield
    /// the address tonic recorded, and no key).
    pub fn of<T>(request: &tonic::Request<T>) -> PeerInfo {
        request.extensions().get::<PeerInfo>().cloned().unwrap_or_else(|| PeerInfo {
            addr: request.remote_addr(),
            key: None,
            conn: None,
        })
    }

    /// Records a verified request of owner `root` on this connection (see [`crate::conns`]).
    pub fn note_request(&self, root: &[u8; 32], member: bool, shares: u32) {
        if let Some(c) = &self.conn {
            c.note_request(root, member, shares);
        }
    }

    /// Records a request on this connection that failed authentication (see
    /// [`ConnState::note_failure`]).
    pub fn note_failure(&self) {
        if let Some(c) = &self.conn {
            c.note_failure();
        }
    }

    /// Records that the caller's owner root was refused for one of its shares (see
    /// [`ConnState::pause_root`]).
    pub fn pause_root(&self) {
        if let Some(c) = &self.conn {
            c.pause_root();
        }
    }

    /// The id of the key the peer proved, if any.
    pub fn id(&self) -> Option<NodeId> {
        self.key.as_ref().map(NodeId::of)
    }
}

/// ring, TLS 1.3 suites only, AES-128-GCM first (ring's VAES code runs it ~12 % faster than
/// AES-256-GCM here: 12.2 vs 10.9 GB/s per core), then AES-256-GCM, then ChaCha20-Poly1305.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::{cipher_suite, default_provider};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cipher_suite::TLS13_AES_128_GCM_SHA256,
                    cipher_suite::TLS13_AES_256_GCM_SHA384,
                    cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                ],
                ..default_provider()
            })
        })
        .clone()
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// `key` as what rustls presents: its public half as a raw public key, and a signer.
fn certified_key(key: &SigningKey) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let encoding = |e: &dyn std::fmt::Display| rustls::Error::General(format!("identity key: {e}"));
    let spki = key.verifying_key().to_public_key_der().map_err(|e| encoding(&e))?;
    let pkcs8 = key.to_pkcs8_der().map_err(|e| encoding(&e))?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()));
    let signer = provider().key_provider.load_private_key(der)?;
    Ok(Arc::new(CertifiedKey::new(vec![CertificateDer::from(spki.as_bytes().to_vec())], signer)))
}

/// The ed25519 key in a raw public key, refusing anything else.
fn peer_key(spki: &[u8]) -> Result<VerifyingKey, rustls::Error> {
    let key = VerifyingKey::from_public_key_der(spki).map_err(|_| {
        rustls::Error::General("the peer's key is not an ed25519 identity key".into())
    })?;
    if key.is_weak() {
        return Err(rustls::Error::General("the peer's key is a weak ed25519 point".into()));
    }
    Ok(key)
}

fn verify_signature(
    message: &[u8],
    key: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    let spki = SubjectPublicKeyInfoDer::from(key.as_ref());
    rustls::crypto::verify_tls13_signature_with_raw_key(message, &spki, dss, &algorithms())
}

/// The handshake-signature half of both verifiers: TLS 1.3 only, ed25519 raw public keys
/// only, the signature checked against the key the peer presented.
macro_rules! raw_ed25519_handshake {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }

        fn requires_raw_public_keys(&self) -> bool {
            true
        }
    };
}

/// Caller side: the server must prove the key of the node the caller pinned. Unpinned
/// (`expected: None`, a seed address whose node is not known yet) any peer that proves an
/// ed25519 key is accepted; either way the id it proved is recorded in `seen`. Unpinned
/// connections are only for calls whose answer verifies on its own (a layout publication the
/// pool key signed), never for shards or deletes.
#[derive(Debug)]
struct PinnedPeer {
    expected: Option<NodeId>,
    seen: Arc<std::sync::Mutex<Option<NodeId>>>,
}

impl ServerCertVerifier for PinnedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = NodeId::of(&peer_key(end_entity.as_ref())?);
        if let Some(expected) = self.expected
            && got != expected
        {
            return Err(rustls::Error::General(format!(
                "the peer at this address is node {got}, not node {expected}: refusing it (an \
                 impostor, or a stale address)"
            )));
        }
        *self.seen.lock().unwrap() = Some(got);
        Ok(ServerCertVerified::assertion())
    }

    raw_ed25519_handshake!();
}

/// Server side: every caller proves an ed25519 key; which keys may do what is decided per
/// request by the envelope policy, which also checks the envelope's key is this one.
#[derive(Debug)]
struct AnyIdentity;

impl ClientCertVerifier for AnyIdentity {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        peer_key(end_entity.as_ref())?;
        Ok(ClientCertVerified::assertion())
    }

    raw_ed25519_handshake!();
}

/// A server's TLS configuration: presents `key`, demands an ed25519 key from every caller.
pub fn server_config(key: &SigningKey) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyIdentity))
        .with_cert_resolver(Arc::new(rustls::server::AlwaysResolvesServerRawPublicKeys::new(
            certified_key(key)?,
        )));
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: every connection proves its key afresh.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A caller's TLS configuration: presents `key`, accepts only the node `peer`.
pub fn client_config(key: &SigningKey, peer: NodeId) -> Result<Arc<ClientConfig>, rustls::Error> {
    verifying_config(key, PinnedPeer { expected: Some(peer), seen: Arc::default() })
}

fn verifying_config(
    key: &SigningKey,
    verifier: PinnedPeer,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified_key(key)?),
        ));
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Opens a channel on `endpoint` to whichever node answers there, and returns the id it
/// proved in the handshake (`None` in plaintext, where nothing is proved). For seed
/// addresses only: what comes back on this channel must verify on its own.
pub async fn connect_discover(
    endpoint: Endpoint,
    key: &SigningKey,
    security: Security,
) -> Result<(Channel, Option<NodeId>), tonic::transport::Error> {
    if security == Security::InsecurePlaintext {
        let c = endpoint.connect_timeout(DIAL_DEADLINE).connect().await?;
        return Ok((c, None));
    }
    let seen = Arc::new(std::sync::Mutex::new(None));
    let config = verifying_config(key, PinnedPeer { expected: None, seen: seen.clone() });
    let connector = config.map(TlsConnector::from);
    let dial = tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        async move { dial(&uri, None, connector.map_err(io::Error::other)?).await }
    });
    let channel = endpoint.connect_with_connector(dial).await?;
    let id = *seen.lock().unwrap();
    Ok((channel, id))
}

/// Why a dial failed, with every cause (tonic's own message is only "transport error"; the
/// reason — a peer that is not the node pinned, a handshake that timed out — is underneath).
pub fn why(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Opens a channel on `endpoint` (an `http://host:port` endpoint with the caller's HTTP/2
/// settings) to the node `peer`, proving `key`. Under TLS the dial, handshake included, fails
/// after [`DIAL_DEADLINE`], and fails at once if the peer is not `peer`.
pub async fn connect(
    endpoint: Endpoint,
    peer: NodeId,
    key: &SigningKey,
    security: Security,
) -> Result<Channel, tonic::transport::Error> {
    connect_from(endpoint, None, peer, key, security).await
}

/// [`connect`] from the local address `from` (`None`: the system's choice).
pub async fn connect_from(
    endpoint: Endpoint,
    from: Option<IpAddr>,
    peer: NodeId,
    key: &SigningKey,
    security: Security,
) -> Result<Channel, tonic::transport::Error> {
    if security == Security::InsecurePlaintext {
        return endpoint.local_address(from).connect_timeout(DIAL_DEADLINE).connect().await;
    }
    let connector = client_config(key, peer).map(TlsConnector::from);
    let dial = tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        async move { dial(&uri, from, connector.map_err(io::Error::other)?).await }
    });
    endpoint.connect_with_connector(dial).await
}

async fn dial(
    uri: &Uri,
    from: Option<IpAddr>,
    connector: TlsConnector,
) -> io::Result<TokioIo<TlsStream>> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad address {uri}"));
    let host = uri.host().ok_or_else(invalid)?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().ok_or_else(invalid)?;
    let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    let handshake = async {
        let tcp = match from {
            None => TcpStream::connect((host.as_str(), port)).await?,
            Some(ip) => {
                let to = tokio::net::lookup_host((host.as_str(), port)).await?.next();
                let to = to.ok_or_else(invalid)?;
                let socket = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(to).await?
            }
        };
        tcp.set_nodelay(true)?;
        connector.connect(name, BufReader::with_capacity(READ_BUFFER, tcp)).await
    };
    let tls = tokio::time::timeout(DIAL_DEADLINE, handshake).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{host}:{port} did not finish a TLS handshake within {DIAL_DEADLINE:?}"),
        )
    })??;
    Ok(TokioIo::new(tls))
}

type TlsStream = tokio_rustls::client::TlsStream<BufReader<TcpStream>>;

/// Serves connections accepted on `listener`: under TLS each is handshaken in its own task
/// within [`HANDSHAKE_DEADLINE`], so a peer that connects and stalls holds up nobody else.
/// Admission is bounded: a connection beyond [`MAX_HANDSHAKES`] handshaking (or
/// [`MAX_HANDSHAKES_PER_ADDRESS`] from its address), or beyond [`MAX_CONNECTIONS`] open (or
/// [`MAX_CONNECTIONS_PER_ADDRESS`]), is closed at once rather than queued. Accepting stops
/// when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    key: &SigningKey,
    security: Security,
) -> Result<ReceiverStream<io::Result<Conn>>, rustls::Error> {
    incoming_tracked(listener, key, security, Connections::default())
}

/// [`incoming`], keeping its connections in `conns` (see [`crate::conns`]): if it is
/// [`Connections::enforcing`], the server closes connections that carry no request, an owner
/// root's excess ones, and idle strangers' ones to admit new callers when full.
pub fn incoming_tracked(
    listener: TcpListener,
    key: &SigningKey,
    security: Security,
    conns: Connections,
) -> Result<ReceiverStream<io::Result<Conn>>, rustls::Error> {
    let acceptor = match security {
        Security::Tls => Some(TlsAcceptor::from(server_config(key)?)),
        Security::InsecurePlaintext => {
            tracing::warn!(
                "serving PLAINTEXT (--insecure-plaintext): no caller's identity is checked on \
                 the connection and anyone on the path can read and rewrite traffic"
            );
            None
        }
    };
    let (tx, rx) = mpsc::channel(64);
    // Connections that carried no request in time are closed, checked every second.
    let (reaper, closed) = (conns.clone(), tx.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => reaper.reap(),
                () = closed.closed() => return,
            }
        }
    });
    tokio::spawn(accept_loop(listener, acceptor, tx, conns));
    Ok(ReceiverStream::new(rx))
}

/// Counts what each peer address holds (handshakes or connections) against a per-address
/// and a total limit; a [`Slot`] gives its place back when dropped.
#[derive(Clone)]
struct Quota {
    inner: Arc<std::sync::Mutex<QuotaState>>,
    total: usize,
    per_address: usize,
}

#[derive(Default)]
struct QuotaState {
    used: usize,
    by_address: std::collections::HashMap<IpAddr, usize>,
}

struct Slot {
    quota: Quota,
    ip: IpAddr,
}

/// Whether a connection was admitted beyond a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Over {
    No,
    /// Beyond the total.
    Total,
    /// Beyond its address's share.
    Address,
}

impl Quota {
    fn new(total: usize, per_address: usize) -> Self {
        Quota { inner: Arc::default(), total, per_address }
    }

    /// A place for `ip`, or none when the limits are reached.
    fn take(&self, ip: IpAddr) -> Option<Slot> {
        match self.take_or(ip, |_| false) {
            Some((slot, Over::No)) => Some(slot),
            _ => None,
        }
    }

    /// A place for `ip`; when there is none, `make_room(ip_only)` may close another holder's
    /// (of `ip` only if `ip_only`: the address is at its limit) and the place is given at
    /// once, the closing one giving its own back when it ends. If nothing could be closed,
    /// the place is given beyond the limit (never beyond twice it), marked [`Over`], for the
    /// newcomer to make room once it has proved more than a TCP connect.
    fn take_or(&self, ip: IpAddr, make_room: impl FnOnce(bool) -> bool) -> Option<(Slot, Over)> {
        let mut st = self.inner.lock().unwrap();
        let mine = st.by_address.get(&ip).copied().unwrap_or(0);
        let address_full = mine >= self.per_address;
        let mut over = Over::No;
        if st.used >= self.total || address_full {
            // Never more than twice the limits while closing connections end; a silent
            // connection is still closed, so the next caller finds room.
            if st.used >= 2 * self.total || mine >= 2 * self.per_address {
                drop(st);
                make_room(mine >= 2 * self.per_address);
                return None;
            }
            drop(st);
            if !make_room(address_full) {
                over = if address_full { Over::Address } else { Over::Total };
            }
            st = self.inner.lock().unwrap();
        }
        st.used += 1;
        *st.by_address.entry(ip).or_default() += 1;
        Some((Slot { quota: self.clone(), ip }, over))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut st = self.quota.inner.lock().unwrap();
        st.used -= 1;
        if let Some(n) = st.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.by_address.remove(&self.ip);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    tx: mpsc::Sender<io::Result<Conn>>,
    conns: Connections,
) {
    let handshakes = Quota::new(MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDRESS);
    let connections = Quota::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS);
    let mut turns = HandshakeTurns::new(conns.handshakes_per_address());
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        // Over a limit: a connection that never carried a request is closed to make room.
        // If there is none, the newcomer is admitted beyond the limit (at most twice it) and
        // closes an idle stranger's connection only once it has sent a verified request: a
        // bare TCP connect (or a TLS handshake, which costs no work) can close nobody who
        // proved an identity. Past twice the limit the new one is closed at once, never
        // queued behind stalled peers.
        let ip = addr.ip();
        let room = |ip_only: bool| conns.evict_silent_for(ip_only.then_some(ip));
        let Some((slot, over)) = connections.take_or(ip, room) else {
            tracing::debug!(peer = %addr, "connection refused: too many open connections");
            continue;
        };
        let over = match over {
            Over::No => None,
            Over::Total => Some(None),
            Over::Address => Some(Some(ip)),
        };
        // serve_with_incoming ignores the builder's tcp_nodelay (LIMITS.md: 8 ms per RPC).
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = acceptor.clone() else {
            let held = conns.open_admitted(ip, over);
            let info = PeerInfo { addr: Some(addr), key: None, conn: Some(held.state.clone()) };
            let conn = Conn {
                io: ConnIo::Plain(tcp),
                info,
                _slot: slot,
                held,
                pause: None,
                unread_since: None,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            continue;
        };
        let Some(handshake) = handshakes.take(addr.ip()) else {
            tracing::debug!(peer = %addr, "connection refused: too many handshakes in progress");
            continue;
        };
        // Under load, each address handshakes at its rate, in turn (crate::conns).
        let now = std::time::Instant::now();
        turns.charge(conns.take_churn(), now);
        let Some(wait) = turns.turn(addr.ip(), now) else {
            tracing::debug!(peer = %addr, "connection refused: its address is past its handshake rate");
            conns.note_handshake_refused();
            continue;
        };
        let (tx, conns) = (tx.clone(), conns.clone());
        tokio::spawn(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let tcp = BufReader::with_capacity(READ_BUFFER, tcp);
            let tls = tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await;
            drop(handshake);
            let tls = match tls {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "TLS handshake timed out");
                    return;
                }
            };
            // The verifier accepted an ed25519 key; a connection without one is closed rather
            // than served with no identity to bind requests to.
            let key = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let Some(key) = key.and_then(|k| peer_key(k.as_ref()).ok()) else { return };
            let held = conns.open_admitted(addr.ip(), over);
            let info =
                PeerInfo { addr: Some(addr), key: Some(key), conn: Some(held.state.clone()) };
            let conn = Conn {
                io: ConnIo::Tls(Box::new(tls)),
                info,
                _slot: slot,
                held,
                pause: None,
                unread_since: None,
            };
            let _ = tx.send(Ok(conn)).await;
        });
    }
}

/// An accepted connection, and who is on the other end.
pub struct Conn {
    io: ConnIo,
    info: PeerInfo,
    /// Its place among the server's open connections, given back when it closes.
    _slot: Slot,
    /// Who it is to admission; closed when admission evicts it.
    held: Held,
    /// While its owner root is past its request rate, the timer its reads wait on, and since
    /// when it has not been read.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    unread_since: Option<std::time::Instant>,
}

impl Conn {
    /// An evicted connection fails its next read or write, which ends its session.
    fn check_evicted(&self, cx: &Context<'_>) -> Option<io::Error> {
        let state = &self.held.state;
        if state.is_evicted() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed to make room for other callers",
            ));
        }
        state.register(cx.waker());
        None
    }
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<BufReader<TcpStream>>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.check_evicted(cx) {
            return Poll::Ready(Err(e));
        }
        let this = self.get_mut();
        // Its owner root sent more than its rate: nothing more is read until it is back
        // within it (what it sends waits in its socket; crate::conns).
        // Each connection is still read once per MAX_PAUSE, whatever its root's other
        // connections spend: its keepalive answers and uploads go on (slowly).
        let paused = this.held.state.paused_until();
        let now = std::time::Instant::now();
        let since = *this.unread_since.get_or_insert(now);
        if paused.is_none() || now.duration_since(since) >= crate::conns::MAX_PAUSE {
            this.unread_since = None;
        } else if let Some(until) = paused {
            let until = tokio::time::Instant::from_std(until.min(since + crate::conns::MAX_PAUSE));
            let sleep = this.pause.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            if sleep.deadline() != until {
                sleep.as_mut().reset(until);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let before = buf.filled().len();
        let r = match &mut this.io {
            ConnIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if buf.filled().len() >= before + BUSY_BYTES {
            this.held.state.note_io();
        }
        r
    }
}

impl Conn {
    /// Notes bytes written (a connection moving bytes is busy, not idle).
    fn wrote(&self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = &r
            && *n >= BUSY_BYTES
        {
            self.held.state.note_io();
        }
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.check_evicted(cx) {
            return Poll::Ready(Err(e));
        }
        let this = self.get_mut();
        let r = match &mut this.io {
            ConnIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        this.wrote(r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.check_evicted(cx) {
            return Poll::Ready(Err(e));
        }
        let this = self.get_mut();
        let r = match &mut this.io {
            ConnIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        this.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardfarm_core::identity::random_signing_key;

    #[test]
    fn an_identity_key_round_trips_through_its_raw_public_key() {
        let key = random_signing_key();
        let ck = certified_key(&key).unwrap();
        assert_eq!(peer_key(ck.cert[0].as_ref()).unwrap(), key.verifying_key());
    }

    #[test]
    fn a_key_that_is_not_ed25519_is_refused() {
        assert!(peer_key(b"\x30\x03\x02\x01\x00").is_err());
        assert!(peer_key(&[]).is_err());
    }
}
