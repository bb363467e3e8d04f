//! A hostile "agent" that answers only GetLayout, with whatever publication the test gives it
//! (an older genuine one, one signed by another key), over TLS under its own identity, like
//! an agent a client might be given as a seed. Every other call is refused.

use std::pin::Pin;

use futures::Stream;
use shardfarm_core::identity::Identity;
use shardfarm_proto::pb::agent_server::{Agent, AgentServer};
use shardfarm_proto::pb::{self as proto};
use tonic::{Request, Response, Status, Streaming};

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The running server; it stops with its runtime when dropped.
pub struct LayoutServer {
    pub addr: String,
    _rt: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct Service {
    publication: proto::SignedLayout,
}

fn refused<T>() -> Result<T, Status> {
    Err(Status::unimplemented("this node serves layouts only"))
}

#[tonic::async_trait]
impl Agent for Service {
    type GetShardStream = Stream2<proto::GetShardResponse>;
    type ListShardsStream = Stream2<proto::ShardEntry>;

    async fn put_shard(
        &self,
        _: Request<Streaming<proto::PutShardRequest>>,
    ) -> Result<Response<proto::PutShardResponse>, Status> {
        refused()
    }
    async fn get_shard(
        &self,
        _: Request<proto::GetShardRequest>,
    ) -> Result<Response<Self::GetShardStream>, Status> {
        refused()
    }
    async fn delete_shard(
        &self,
        _: Request<proto::DeleteShardRequest>,
    ) -> Result<Response<proto::DeleteShardResponse>, Status> {
        refused()
    }
    async fn delete_object(
        &self,
        _: Request<proto::DeleteObjectRequest>,
    ) -> Result<Response<proto::DeleteObjectResponse>, Status> {
        refused()
    }
    async fn list_tombstones(
        &self,
        _: Request<proto::ListTombstonesRequest>,
    ) -> Result<Response<proto::ListTombstonesResponse>, Status> {
        refused()
    }
    async fn list_shards(
        &self,
        _: Request<proto::ListShardsRequest>,
    ) -> Result<Response<Self::ListShardsStream>, Status> {
        refused()
    }
    async fn summarize_partitions(
        &self,
        _: Request<proto::SummarizePartitionsRequest>,
    ) -> Result<Response<proto::SummarizePartitionsResponse>, Status> {
        refused()
    }
    async fn audit(
        &self,
        _: Request<proto::AuditRequest>,
    ) -> Result<Response<proto::AuditResponse>, Status> {
        refused()
    }
    async fn info(
        &self,
        _: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        refused()
    }
    async fn prove_capacity(
        &self,
        _: Request<proto::CapacityChallenge>,
    ) -> Result<Response<proto::CapacityReport>, Status> {
        refused()
    }
    async fn get_layout(
        &self,
        _: Request<proto::GetLayoutRequest>,
    ) -> Result<Response<proto::SignedLayout>, Status> {
        Ok(Response::new(self.publication.clone()))
    }
}

impl LayoutServer {
    /// Serves `publication` on a fresh loopback port under a fresh identity.
    pub fn start(publication: proto::SignedLayout) -> LayoutServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (me, _) = Identity::generate(0, 1, &|_| {}).unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let svc = Service { publication };
        rt.spawn(async move {
            let incoming = shardfarm_proto::tls::incoming(
                listener,
                me.signing_key(),
                shardfarm_proto::Security::Tls,
            )
            .unwrap();
            tonic::transport::Server::builder()
                .add_service(AgentServer::new(svc))
                .serve_with_incoming(incoming)
                .await
        });
        LayoutServer { addr, _rt: rt }
    }
}
