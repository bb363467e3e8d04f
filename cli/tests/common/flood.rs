//! A flood of requests that should cost a server nothing: unsigned, signed by an unmined
//! identity, validly signed but replayed, and badly signed — from its own loopback address
//! (127.0.0.2), as an attacker elsewhere on the network would be.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shardfarm_core::identity::{Identity, NodeId, random_signing_key};
use shardfarm_proto::pb::{self as proto, agent_client, coordinator_client};
use shardfarm_proto::{Signer, methods};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

/// The source address of the flood.
pub const FLOOD_FROM: &str = "127.0.0.2";

/// What the flood got back, by status code.
pub type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

/// A TLS channel from `from` to `peer` at `addr`, proving `key` (the flooder's own).
async fn channel(addr: &str, from: IpAddr, peer: NodeId, key: &Signer) -> Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let endpoint = endpoint.timeout(Duration::from_secs(5));
    shardfarm_proto::tls::connect_from(endpoint, Some(from), peer, key.key(), key.security())
        .await
        .unwrap()
}

fn count(tally: &Tally, r: Result<(), tonic::Status>) {
    let k = match r {
        Ok(()) => format!("{:?}", Code::Ok),
        Err(s) => format!("{:?}", s.code()),
    };
    *tally.lock().unwrap().entry(k).or_default() += 1;
}

/// Floods every agent in `agents` and the coordinator at `coordinator` for `length`, with
/// `per_target` concurrent request loops each, from address `from`. Returns what the servers
/// answered.
pub fn flood(
    from: &str,
    agents: &[(String, NodeId)],
    coordinator: &str,
    pool: NodeId,
    length: Duration,
    per_target: usize,
) -> Tally {
    let from: IpAddr = from.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let rt = rt.unwrap();
    let tally: Tally = Arc::default();
    // An identity below any pool's difficulty, and a valid one whose one request is replayed.
    let unmined = std::iter::repeat_with(|| Identity::from_parts(random_signing_key(), 0))
        .find(|i| i.difficulty() < 4)
        .unwrap();
    let unmined = Arc::new(Signer::identity(&unmined));
    let (mined, _) = Identity::generate(8, 1, &|_| {}).unwrap();
    let mined = Signer::identity(&mined);
    // A mined credential, signed with a key that is not its own.
    let forged = Arc::new(Signer::raw(
        Identity::generate(8, 1, &|_| {}).unwrap().0.credential(),
        random_signing_key(),
    ));
    let until = Instant::now() + length;
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (addr, node) in agents {
            let node = *node;
            // One valid request for this agent, replayed over and over.
            let replayed =
                mined.request(node, methods::INFO, proto::InfoRequest {}).metadata().clone();
            let ch = channel(addr, from, node, &unmined).await;
            for i in 0..per_target {
                let (ch, tally) = (ch.clone(), tally.clone());
                let (unmined, forged, replayed) =
                    (unmined.clone(), forged.clone(), replayed.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = agent_client::AgentClient::new(ch);
                    let mut turn = i;
                    while Instant::now() < until {
                        turn += 1;
                        let req = match turn % 4 {
                            0 => Request::new(proto::InfoRequest {}),
                            1 => unmined.request(node, methods::INFO, proto::InfoRequest {}),
                            2 => forged.request(node, methods::INFO, proto::InfoRequest {}),
                            _ => {
                                let mut r = Request::new(proto::InfoRequest {});
                                *r.metadata_mut() = replayed.clone();
                                r
                            }
                        };
                        count(&tally, c.info(req).await.map(|_| ()));
                    }
                }));
            }
        }
        let ch = channel(coordinator, from, pool, &unmined).await;
        for i in 0..per_target {
            let (ch, tally, unmined) = (ch.clone(), tally.clone(), unmined.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = coordinator_client::CoordinatorClient::new(ch);
                let mut turn = i;
                while Instant::now() < until {
                    turn += 1;
                    let req = proto::ReportRequest::default();
                    let req = if turn % 2 == 0 {
                        Request::new(req)
                    } else {
                        unmined.request(pool, methods::REPORT, req)
                    };
                    count(&tally, c.report(req).await.map(|_| ()));
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    tally
}

/// The number of answers with `code`.
pub fn answered(tally: &Tally, code: Code) -> u64 {
    tally.lock().unwrap().get(&format!("{code:?}")).copied().unwrap_or(0)
}
