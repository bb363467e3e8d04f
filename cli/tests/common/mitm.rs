//! A man in the middle between agents and the coordinator: a gRPC server the agents are
//! pointed at, which forwards every call to the real coordinator and, when told to, answers
//! WatchLayout with a forged layout that gives every slot to itself — with the pool's
//! signature kept over altered bytes, re-signed by its own key, unsigned, or a genuine but
//! older publication replayed.

#![allow(dead_code)]

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use prost::Message;
use shardfarm_core::identity::{Identity, NodeId};
use shardfarm_proto::pb::coordinator_client::CoordinatorClient as Raw;
use shardfarm_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use shardfarm_proto::pb::{self as proto};
use shardfarm_proto::{PublishedLayout, Security, tls, verify_layout};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

/// What the man in the middle does to layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forwards them as they are.
    Honest,
    /// Rewrites the publication (every slot to itself), keeps the pool's signature.
    Altered,
    /// Rewrites it and signs it with its own key.
    Impostor,
    /// Rewrites it and sends no signature.
    Unsigned,
    /// Replays the first genuine publication it saw.
    Replay,
}

/// The running proxy.
pub struct Mitm {
    pub addr: String,
    mode: watch::Sender<Mode>,
    rt: tokio::runtime::Runtime,
}

impl Mitm {
    /// Starts a proxy in front of the coordinator at `upstream` of the pool `pool`. Under TLS
    /// it terminates the agents' TLS with its own key (it cannot prove the pool's) and dials
    /// the coordinator as itself.
    pub fn start(upstream: &str, pool: NodeId, security: Security) -> Mitm {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (mode, modes) = watch::channel(Mode::Honest);
        let (evil, _) = Identity::generate(8, 1, &|_| {}).unwrap();
        let endpoint = Endpoint::from_shared(format!("http://{upstream}")).unwrap();
        let upstream = rt
            .block_on(tls::connect(endpoint, pool, evil.signing_key(), security))
            .expect("the proxy reaches the coordinator");
        let incoming = rt.block_on(async { tls::incoming(listener, evil.signing_key(), security) });
        let svc = Proxy {
            raw: Raw::new(upstream),
            modes,
            pool,
            evil: Arc::new(evil),
            addr: addr.clone(),
            first: Arc::default(),
        };
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(CoordinatorServer::new(svc))
                .serve_with_incoming(incoming.unwrap()),
        );
        Mitm { addr, mode, rt }
    }

    /// Switches what it does; open layout streams are cut so agents reconnect and see it.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

#[derive(Clone)]
struct Proxy {
    raw: Raw<Channel>,
    modes: watch::Receiver<Mode>,
    pool: NodeId,
    evil: Arc<Identity>,
    addr: String,
    first: Arc<Mutex<Option<proto::SignedLayout>>>,
}

fn forward<T>(r: Request<T>) -> Request<T> {
    let (md, ext, msg) = r.into_parts();
    Request::from_parts(md, ext, msg)
}

impl Proxy {
    /// What the agents get instead of `genuine`.
    fn tamper(&self, genuine: proto::SignedLayout) -> proto::SignedLayout {
        let mode = *self.modes.borrow();
        let mut first = self.first.lock().unwrap();
        if first.is_none() {
            *first = Some(genuine.clone());
        }
        if mode == Mode::Honest {
            return genuine;
        }
        if mode == Mode::Replay {
            return first.clone().unwrap();
        }
        // Every slot of every partition to the proxy, one layout version ahead.
        let real = verify_layout(&genuine, &self.pool).expect("the coordinator signs");
        let me = self.evil.id();
        let mut layout = real.layout.clone();
        layout.version += 1;
        for holders in &mut layout.partitions {
            holders.iter_mut().for_each(|h| *h = me);
        }
        let forged = PublishedLayout::new(layout, None, [(me, self.addr.clone())].into()).sign(
            &self.evil,
            real.sequence + 1,
            0,
        );
        let forged = (**forged.signed.as_ref().unwrap()).clone();
        match mode {
            Mode::Impostor => forged,
            Mode::Altered => {
                // The pool's key and signature over other bytes: the same forged layout,
                // claiming to be the pool's.
                let mut p = proto::LayoutPublication::decode(&forged.publication[..]).unwrap();
                p.pool_id = self.pool.0.to_vec().into();
                proto::SignedLayout { publication: p.encode_to_vec().into(), ..genuine }
            }
            Mode::Unsigned => proto::SignedLayout {
                signature: Default::default(),
                pool_key: Default::default(),
                ..forged
            },
            Mode::Honest | Mode::Replay => unreachable!(),
        }
    }
}

type Layouts = Pin<Box<dyn Stream<Item = Result<proto::SignedLayout, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Proxy {
    async fn challenge(
        &self,
        r: Request<proto::ChallengeRequest>,
    ) -> Result<Response<proto::ChallengeResponse>, Status> {
        self.raw.clone().challenge(forward(r)).await
    }

    async fn join(
        &self,
        r: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        self.raw.clone().join(forward(r)).await
    }

    async fn report(
        &self,
        r: Request<proto::ReportRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        self.raw.clone().report(forward(r)).await
    }

    async fn get_layout(
        &self,
        r: Request<proto::GetLayoutRequest>,
    ) -> Result<Response<proto::SignedLayout>, Status> {
        let genuine = self.raw.clone().get_layout(forward(r)).await?.into_inner();
        Ok(Response::new(self.tamper(genuine)))
    }

    type WatchLayoutStream = Layouts;

    async fn watch_layout(
        &self,
        r: Request<proto::WatchLayoutRequest>,
    ) -> Result<Response<Layouts>, Status> {
        let mut upstream = self.raw.clone().watch_layout(forward(r)).await?.into_inner();
        let mut modes = self.modes.clone();
        modes.mark_unchanged();
        let me = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // A new mode: end this stream so the agent reconnects and sees it.
                    _ = modes.changed() => return,
                    m = upstream.message() => {
                        let Ok(Some(m)) = m else { return };
                        if tx.send(Ok(me.tamper(m))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_nodes(
        &self,
        r: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        self.raw.clone().list_nodes(forward(r)).await
    }

    async fn get_pool(
        &self,
        r: Request<proto::GetPoolRequest>,
    ) -> Result<Response<proto::PoolInfo>, Status> {
        self.raw.clone().get_pool(forward(r)).await
    }
}
