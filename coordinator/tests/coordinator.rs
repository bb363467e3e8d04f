//! The coordinator over real gRPC on loopback: admission and its refusals, heartbeats, layouts
//! as nodes come and go, rewards per epoch into the signed ledger.

use std::sync::Arc;
use std::time::Duration;

use shardfarm_coordinator::economics::Standing;
use shardfarm_coordinator::ledger::Ledger;
use shardfarm_coordinator::{AdmissionRule, Coordinator, PoolConfig};
use shardfarm_core::capacity::{CapacityReport, Machine};
use shardfarm_core::identity::{Delegation, Identity, random_signing_key};
use shardfarm_proto::pb as proto;
use shardfarm_proto::{CoordinatorClient, Signer};
use tokio_util::sync::CancellationToken;
use tonic::Code;

const D: u8 = 8;

struct Running {
    c: Arc<Coordinator>,
    addr: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(cfg: PoolConfig) -> Running {
    let (root, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    start_as(cfg, root).await
}

/// A coordinator with an empty state dir, signing as `root`.
async fn start_as(cfg: PoolConfig, root: Identity) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::open(cfg, dir.path(), root).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    tokio::spawn(c.clone().run(stop.clone()));
    tokio::spawn(shardfarm_coordinator::service::serve(listener, c.clone(), stop.clone()));
    Running { c, addr, stop, _dir: dir }
}

/// The farm whose agents the tests' nodes are (unless a test makes an outsider).
fn farm() -> Identity {
    Identity::from_parts(ed25519_dalek::SigningKey::from_bytes(&[7; 32]), 0)
}

/// A grant of the test farm for `id` in the pool `r` runs.
fn grant(r: &Running, id: &Identity) -> Vec<u8> {
    let expires = shardfarm_core::auth::now_ms() / 1000 + 3_600;
    shardfarm_core::grant::FarmGrant::issue(&farm(), id.public_key(), r.c.identity().id(), expires)
        .to_bytes()
}

fn pool() -> PoolConfig {
    PoolConfig {
        farms: [(farm().id().to_hex(), Default::default())].into(),
        pool: "test".into(),
        min_difficulty: D,
        capacity_difficulty: D,
        heartbeat_ms: 100,
        grace_ms: 1_000,
        max_delegated_per_root: 2,
        ..PoolConfig::default()
    }
}

fn machine() -> Machine {
    Machine {
        processors: 1,
        cores_per_processor: 2,
        overhead: 1.0,
        space_reported: 10 << 30,
        space_taken: 0,
    }
}

async fn client(r: &Running, signer: Signer) -> CoordinatorClient {
    CoordinatorClient::connect(&r.addr, Arc::new(signer), r.c.identity().id()).await.unwrap()
}

fn join_req(zone: &str, port: u16, report: Vec<u8>) -> proto::JoinRequest {
    proto::JoinRequest {
        grpc_address: format!("127.0.0.1:{port}"),
        http_address: format!("127.0.0.1:{}", port + 1),
        labels: [("zone".to_string(), zone.to_string())].into(),
        capacity_report: report.into(),
        last_layout: None,
        farm_grant: Default::default(),
    }
}

/// `id` proves capacity for a fresh challenge and joins, presenting `last` as its layout.
async fn join_again(
    r: &Running,
    id: &Identity,
    zone: &str,
    port: u16,
    last: Option<proto::SignedLayout>,
) -> Result<proto::JoinResponse, tonic::Status> {
    let mut c = client(r, Signer::identity(id)).await;
    let ch = c.challenge().await.unwrap();
    let report = CapacityReport::prove(id, &ch.challenge, ch.difficulty as u8, machine()).unwrap();
    let mut req = join_req(zone, port, report.encode());
    req.last_layout = last;
    req.farm_grant = grant(r, id).into();
    c.join(req).await
}

/// Mines a node, proves capacity for a fresh challenge and joins.
async fn join(
    r: &Running,
    zone: &str,
    port: u16,
) -> (Identity, Result<proto::JoinResponse, tonic::Status>) {
    let (id, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    let mut c = client(r, Signer::identity(&id)).await;
    let ch = c.challenge().await.unwrap();
    let report = CapacityReport::prove(&id, &ch.challenge, ch.difficulty as u8, machine()).unwrap();
    let mut req = join_req(zone, port, report.encode());
    req.farm_grant = grant(r, &id).into();
    let r = c.join(req).await;
    (id, r)
}

#[tokio::test]
async fn joins_are_rate_limited_per_identity() {
    let r = start(pool()).await;
    let (id, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    let mut c = client(&r, Signer::identity(&id)).await;
    let ch = c.challenge().await.unwrap();
    let proof = CapacityReport::prove(&id, &ch.challenge, D, machine()).unwrap();
    let mut forged = proof.encode();
    forged[40] ^= 1;
    let mut codes = Vec::new();
    let mut first_refused = None;
    for _ in 0..12 {
        let code = c.join(join_req("z0", 9000, forged.clone())).await.unwrap_err().code();
        if code == Code::ResourceExhausted {
            first_refused.get_or_insert_with(std::time::Instant::now);
        }
        codes.push(code);
    }
    // The burst is spent on refused joins too; then even a valid join must wait: refused,
    // or (its root's connection unread for a while after each refusal) admitted only after
    // that wait.
    assert_eq!(codes[..10], [Code::InvalidArgument; 10]);
    assert_eq!(codes[10..], [Code::ResourceExhausted; 2]);
    match c.join(join_req("z0", 9000, proof.encode())).await {
        Err(s) => {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s}");
            assert!(s.message().contains("retry in"), "{s}");
            assert!(r.c.members().is_empty());
        }
        Ok(_) => {
            let waited = first_refused.unwrap().elapsed();
            assert!(waited >= shardfarm_proto::conns::REFUSED_PAUSE * 2, "{waited:?}");
            assert_eq!(r.c.members().len(), 1);
        }
    }
    // Another identity is not affected.
    let (other, res) = join(&r, "z1", 9010).await;
    res.unwrap();
    assert!(r.c.members().iter().any(|m| m.id == other.id()));
}

#[tokio::test]
async fn join_refusals_say_why_and_admit_nothing() {
    let r = start(pool()).await;
    // An identity mined below the pool's difficulty.
    let weak = loop {
        let (id, _) = Identity::generate(0, 0, &|_| {}).unwrap();
        if id.difficulty() < u32::from(D) {
            break id;
        }
    };
    let mut c = client(&r, Signer::identity(&weak)).await;
    let s = c.challenge().await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s}");

    let (id, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    let mut c = client(&r, Signer::identity(&id)).await;
    let ch = c.challenge().await.unwrap();
    let good = CapacityReport::prove(&id, &ch.challenge, ch.difficulty as u8, machine()).unwrap();

    // A forged proof: one byte of the signed report changed.
    let mut forged = good.encode();
    forged[40] ^= 1;
    let s = c.join(join_req("z0", 9000, forged)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s}");
    assert!(s.message().contains("capacity proof refused"), "{s}");

    // A valid proof, but by another key than the caller's.
    let (other, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    let ch2 = c.challenge().await.unwrap();
    let theirs = CapacityReport::prove(&other, &ch2.challenge, D, machine()).unwrap();
    let s = c.join(join_req("z0", 9000, theirs.encode())).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s}");
    assert!(s.message().contains("another key"), "{s}");

    // A proof for a challenge the coordinator never issued.
    let own = CapacityReport::prove(&id, b"made-up challenge 0123", D, machine()).unwrap();
    let s = c.join(join_req("z0", 9000, own.encode())).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s}");
    assert!(s.message().contains("did not issue"), "{s}");

    // A bad address.
    let ch4 = c.challenge().await.unwrap();
    let p = CapacityReport::prove(&id, &ch4.challenge, D, machine()).unwrap();
    let mut req = join_req("z0", 9000, p.encode());
    req.grpc_address = "nowhere".into();
    assert_eq!(c.join(req).await.unwrap_err().code(), Code::InvalidArgument);

    // A validly signed proof whose figure is negative (more space taken than offered) or
    // whose overhead is negative: refused before anything is stored.
    for (overhead, taken) in [(1.0, 1u64 << 50), (-1.0, 0)] {
        let ch = c.challenge().await.unwrap();
        let m = Machine { overhead, space_taken: taken, ..machine() };
        let p = CapacityReport::prove(&id, &ch.challenge, D, m).unwrap();
        let s = c.join(join_req("z0", 9000, p.encode())).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s}");
        assert!(s.message().contains("must not be negative"), "{s}");
    }

    // A challenge answers one join only: replaying the first proof is refused.
    let ok = c.join(join_req("z0", 9000, good.encode())).await.unwrap();
    assert_eq!(ok.standing, "active");
    let s = c.join(join_req("z0", 9000, good.encode())).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s}");

    // Only `id` was admitted.
    assert_eq!(r.c.members().len(), 1);
    // Reporting without joining.
    let mut stranger = client(&r, Signer::identity(&other)).await;
    let s = stranger.report(proto::ReportRequest::default()).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s}");
}

#[tokio::test]
async fn admission_rules_from_a_syndication_apply_to_joins() {
    let r = start(pool()).await;
    let (listed, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    r.c.set_admission(shardfarm_coordinator::Admission {
        rules: vec![AdmissionRule {
            name: "edge".into(),
            min_difficulty: D,
            allow: Some([listed.id()].into()),
        }],
        domains: [(listed.id(), "site-a".to_string())].into(),
    });
    // (Outsiders: the syndication's rules are for nodes no farm of the pool vouches for.)
    let stranger = Identity::generate(D, 0, &|_| {}).unwrap().0;
    let res = join_with(&r, &stranger, "edge", 9500, Vec::new(), &[]).await;
    let s = res.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s}");
    assert!(s.message().contains("not on the pool's allow list"), "{s}");
    let mut c = client(&r, Signer::identity(&listed)).await;
    let ch = c.challenge().await.unwrap();
    let p = CapacityReport::prove(&listed, &ch.challenge, D, machine()).unwrap();
    c.join(join_req("edge", 9502, p.encode())).await.unwrap();
    // The syndication's site is its domain, not the zone it claimed.
    let m = r.c.members().into_iter().find(|m| m.id == listed.id()).unwrap();
    assert_eq!((m.domain.as_str(), m.labels["zone"].as_str()), ("site-a", "site-a"));
    assert_eq!(m.domain_from, "syndication");
    // A higher difficulty than the pool's: an identity mined to exactly 8 bits is refused.
    r.c.set_admission(shardfarm_coordinator::Admission {
        rules: vec![AdmissionRule { name: "strict".into(), min_difficulty: 40, allow: None }],
        domains: Default::default(),
    });
    let res = join_with(&r, &stranger, "edge", 9504, Vec::new(), &[]).await;
    let s = res.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s}");
    assert!(s.message().contains("admission requires 40"), "{s}");
    assert_eq!(r.c.members().len(), 1);
    // Two syndications: either admits (they add ways in, they do not overwrite each other);
    // a node neither admits hears both reasons.
    let (other, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    r.c.set_admission(shardfarm_coordinator::Admission {
        rules: vec![
            AdmissionRule { name: "strict".into(), min_difficulty: 40, allow: None },
            AdmissionRule {
                name: "edge".into(),
                min_difficulty: D,
                allow: Some([other.id()].into()),
            },
        ],
        domains: Default::default(),
    });
    let s = join_with(&r, &stranger, "edge", 9504, Vec::new(), &[]).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s}");
    assert!(
        s.message().contains("strict: identity mined") && s.message().contains("edge: node"),
        "{s}"
    );
    join_with(&r, &other, "edge", 9506, Vec::new(), &[]).await.unwrap();
    assert_eq!(r.c.members().len(), 2);
}

#[tokio::test]
async fn delegated_nodes_are_limited_per_owner_root() {
    let r = start(pool()).await;
    let (root, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    let mut codes = Vec::new();
    for i in 0..3u16 {
        let key = random_signing_key();
        let cert = Delegation::issue(&root, key.verifying_key(), u64::MAX / 2000);
        let signer = Signer::delegated(cert, key.clone());
        let mut c = client(&r, signer).await;
        let ch = c.challenge().await.unwrap();
        // The capacity proof is signed by the delegated key itself.
        let id = Identity::from_parts(key, 0);
        let p = CapacityReport::prove(&id, &ch.challenge, D, machine()).unwrap();
        codes.push(
            c.join(join_req("z0", 9100 + 2 * i, p.encode()))
                .await
                .map(|_| ())
                .map_err(|s| s.code()),
        );
    }
    assert_eq!(codes, [Ok(()), Ok(()), Err(Code::PermissionDenied)]);
    let members = r.c.members();
    assert_eq!(members.len(), 2);
    assert!(members.iter().all(|m| m.root == root.id() && m.delegated));
}

#[tokio::test]
async fn layouts_follow_membership_and_say_why_when_there_is_none() {
    let r = start(pool()).await;
    let mut ids = Vec::new();
    for i in 0..5u16 {
        let (id, res) = join(&r, &format!("zone-{}", i % 3), 9200 + 2 * i).await;
        res.unwrap();
        ids.push(id);
    }
    // Five nodes cannot hold RS(4,2): GetLayout says exactly why (once housekeeping has
    // tried, right after the joins).
    let mut c = client(&r, Signer::identity(&ids[0])).await;
    let mut s = c.get_layout().await.unwrap_err();
    for _ in 0..50 {
        if s.message().contains("needs") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = c.get_layout().await.unwrap_err();
    }
    assert_eq!(s.code(), Code::Unavailable);
    assert!(s.message().contains("RS(4,2) needs 6 nodes of distinct owners"), "{s}");

    let mut watch = c.watch_layout().await.unwrap();
    let (sixth, res) = join(&r, "zone-2", 9300).await;
    res.unwrap();
    ids.push(sixth);
    // Every publication is signed by the pool key and newer than the last.
    let mut guard = shardfarm_proto::LayoutGuard::new(r.c.identity().id());
    let first = watch.message().await.unwrap().unwrap();
    let first = guard.accept(&first).unwrap().expect("a new publication");
    assert_eq!(first.layout.version, 1);
    assert_eq!(first.layout.partitions.len(), 256);
    let layout = c.get_layout().await.unwrap();
    assert_eq!(layout.layout.version, 1);
    assert!(layout.previous.is_none());

    // A seventh joins: version 2, with version 1 as the readers' fallback until in sync.
    let (seventh, res) = join(&r, "zone-0", 9302).await;
    res.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let second = guard.accept(&second).unwrap().expect("a new publication");
    assert_eq!(second.layout.version, 2);
    assert!(second.sequence > first.sequence);
    assert_eq!(second.previous.as_ref().map(|p| p.version), Some(1));
    let l2 = c.get_layout().await.unwrap();
    assert!(!l2.layout.slots_of(&seventh.id()).is_empty());

    // Everyone reports synced for version 2: the fallback is dropped.
    let now = shardfarm_core::auth::now_ms();
    for id in ids.iter().chain([&seventh]) {
        let mut c = client(&r, Signer::identity(id)).await;
        c.report(proto::ReportRequest { synced_version: 2, ..Default::default() }).await.unwrap();
    }
    r.c.tick(now);
    // Their word is not enough for the nodes that gained slots (the seventh at least): the
    // fallback stays until the auditor has checked they hold what they gained (no agent
    // runs here to be asked, so the test records the checks' outcome).
    assert!(c.get_layout().await.unwrap().previous.is_some());
    let work = r.c.sync_work();
    let unchecked = work.nodes;
    assert_eq!(work.version, 2);
    assert!(unchecked.iter().any(|(n, gained)| *n == seventh.id() && !gained.is_empty()));
    for (node, _) in &unchecked {
        r.c.record_sync_check(node, 2, true);
    }
    r.c.tick(now);
    assert!(c.get_layout().await.unwrap().previous.is_none());

    // Silence beyond the grace period (1 s): the seventh is down and its slots are re-placed.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for id in &ids {
        let mut c = client(&r, Signer::identity(id)).await;
        c.report(proto::ReportRequest { synced_version: 2, ..Default::default() }).await.unwrap();
    }
    r.c.tick(shardfarm_core::auth::now_ms());
    let seventh_now = r.c.members().into_iter().find(|m| m.id == seventh.id()).unwrap();
    assert!(!seventh_now.up);
    let l3 = c.get_layout().await.unwrap();
    assert_eq!(l3.layout.version, 3);
    assert!(l3.layout.slots_of(&seventh.id()).is_empty());
    let nodes = c.list_nodes().await.unwrap();
    assert_eq!(nodes.nodes.len(), 7);
    assert_eq!(nodes.nodes.iter().filter(|n| !n.up).count(), 1);
}

#[tokio::test]
async fn each_epoch_records_rewards_in_the_signed_ledger() {
    let mut cfg = pool();
    cfg.rewards.epoch_seconds = 10;
    cfg.rewards.pool_reward = 1_000;
    cfg.rewards.pma = 1.0;
    cfg.rewards.pmb = 0.0;
    cfg.grace_ms = 1_000_000;
    let r = start(cfg).await;
    for i in 0..2u16 {
        join(&r, "zone-0", 9400 + 2 * i).await.1.unwrap();
    }
    let now = shardfarm_core::auth::now_ms();
    r.c.tick(now);
    // The next epoch begins: the one that ended is recorded, equal capacities share RW1 equally.
    r.c.tick(now + 10_000);
    let (by_node, by_farm) = r.c.reward_totals();
    assert_eq!(by_node.len(), 2);
    assert!(by_node.values().all(|t| t.rw1 == 500 && t.rw2 == 0 && t.epochs == 1), "{by_node:?}");
    assert_eq!(by_farm["zone-0"].rw1, 1_000);
    assert!(r.c.members().iter().all(|m| m.standing == Standing::Active));
    // The ledger on disk verifies with the coordinator's key.
    let dir = r._dir.path();
    let l = Ledger::open(&dir.join("ledger.jsonl"), &r.c.identity().public_key()).unwrap();
    assert_eq!(l.entries().len(), 2);
}

/// The per-node series name a node as Prometheus scrapes its agent (its `pod` label, kept for a
/// farm's own agents), carry its short id and farm, show its state (1 for the state it is in, 0
/// for the others) and its earnings of the last closed epoch beside its total; a node that
/// leaves the pool takes its series with it.
#[tokio::test]
async fn per_node_metrics_name_nodes_as_scraped_and_show_state_and_earnings() {
    let mut cfg = pool();
    cfg.rewards.epoch_seconds = 10;
    cfg.rewards.pool_reward = 1_000;
    cfg.rewards.pma = 1.0;
    cfg.rewards.pmb = 0.0;
    cfg.grace_ms = 5_000;
    let r = start(cfg).await;
    let mut ids = Vec::new();
    for i in 0..2u16 {
        let (id, _) = Identity::generate(D, 0, &|_| {}).unwrap();
        let mut c = client(&r, Signer::identity(&id)).await;
        let ch = c.challenge().await.unwrap();
        let report =
            CapacityReport::prove(&id, &ch.challenge, ch.difficulty as u8, machine()).unwrap();
        let mut req = join_req("zone-0", 9500 + 2 * i, report.encode());
        req.labels.insert("pod".into(), format!("alpha-{i}"));
        req.farm_grant = grant(&r, &id).into();
        c.join(req).await.unwrap();
        ids.push(id);
    }
    let now = shardfarm_core::auth::now_ms();
    r.c.tick(now);
    let short = ids[0].id().short();
    let labels = format!("farm=\"zone-0\",node=\"alpha-0\",node_id=\"{short}\"");
    let text = r.c.metrics.render();
    for want in [
        format!("shardfarm_coordinator_node_state{{{labels},state=\"active\"}} 1"),
        format!("shardfarm_coordinator_node_state{{{labels},state=\"active_down\"}} 0"),
        format!("shardfarm_coordinator_node_audits_total{{{labels},result=\"pass\"}} 0"),
        format!("shardfarm_coordinator_rewards{{{labels},share=\"rw1\"}} 0"),
    ] {
        assert!(text.lines().any(|l| l == want), "no `{want}` in\n{text}");
    }
    // Two epochs close (each pays 1 000 between two equal nodes); both nodes are silent by
    // then, so they are down, and silent for most of their life, so suspended too.
    r.c.tick(now + 10_000);
    r.c.tick(now + 20_000);
    let text = r.c.metrics.render();
    for want in [
        format!("shardfarm_coordinator_node_state{{{labels},state=\"active\"}} 0"),
        format!("shardfarm_coordinator_node_state{{{labels},state=\"suspended_down\"}} 1"),
        format!("shardfarm_coordinator_epoch_rewards{{{labels},share=\"rw1\"}} 500"),
        format!("shardfarm_coordinator_rewards{{{labels},share=\"rw1\"}} 1000"),
        "shardfarm_coordinator_farm_rewards{farm=\"zone-0\"} 2000".to_string(),
    ] {
        assert!(text.lines().any(|l| l == want), "no `{want}` in\n{text}");
    }
    let last_epoch = (now + 10_000) / 10_000;
    assert!(text.lines().any(|l| l == format!("shardfarm_coordinator_last_epoch {last_epoch}")));
    // The node leaves: its series go, its farm keeps its earnings.
    r.c.remove(&ids[0].id());
    // The same instant as the last tick: a later one could cross into a third epoch (the
    // epochs follow the wall clock) and pay it, which made this flaky one run in twenty.
    r.c.tick(now + 20_000);
    let text = r.c.metrics.render();
    assert!(!text.contains("node=\"alpha-0\""), "{text}");
    assert!(text.contains("node=\"alpha-1\""), "{text}");
    assert!(text.lines().any(|l| l == "shardfarm_coordinator_farm_rewards{farm=\"zone-0\"} 2000"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// A join's labels travel as a protobuf map, which has no fixed order: the client's
    /// `HashMap` encodes in one order and a re-encoding on the server in another. Signatures
    /// cover the bytes as sent, so every join with any label map verifies.
    #[test]
    fn joins_with_any_labels_verify_on_the_server_path(
        labels in proptest::collection::hash_map("[a-z0-9./-]{1,24}", "[a-zA-Z0-9._/-]{0,40}", 0..15)
    ) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let r = start(pool()).await;
            let (id, _) = Identity::generate(D, 0, &|_| {}).unwrap();
            let mut c = client(&r, Signer::identity(&id)).await;
            let ch = c.challenge().await.unwrap();
            let report = CapacityReport::prove(&id, &ch.challenge, D, machine()).unwrap();
            let mut req = join_req("z0", 9000, report.encode());
            req.labels.extend(labels.into_iter().filter(|(k, _)| k != "zone"));
            let joined = c.join(req).await;
            assert!(joined.is_ok(), "{joined:?}");
        });
    }
}

/// The layout `c`'s coordinator publishes, once it does (within 5 s).
async fn published(c: &mut CoordinatorClient) -> Option<shardfarm_proto::PublishedLayout> {
    for _ in 0..100 {
        if let Ok(l) = c.get_layout().await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// The coordinator's state is lost; restarted with the same pool key, it takes the newest
/// layout its nodes present (same version, same slots) instead of computing a fresh one, and
/// publishes nothing until the nodes that layout names are back. Presented layouts signed by
/// another key, or older ones, are not taken.
#[tokio::test]
async fn a_coordinator_that_lost_its_state_recovers_the_layout_from_its_nodes() {
    let (root, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    let cfg = PoolConfig { grace_ms: 60_000, ..pool() };
    let first = start_as(cfg.clone(), root.clone()).await;
    let mut ids = Vec::new();
    for i in 0..7u16 {
        let (id, res) = join(&first, &format!("zone-{}", i % 3), 9600 + 2 * i).await;
        res.unwrap();
        ids.push(id);
    }
    let mut c = client(&first, Signer::identity(&ids[0])).await;
    let before = published(&mut c).await.expect("a first layout");
    let signed = (**before.signed.as_ref().unwrap()).clone();
    // An impostor's publication with the highest sequence, presented too: it may not win.
    let impostor = shardfarm_proto::PublishedLayout::new(
        before.layout.clone(),
        None,
        before.addresses.clone(),
    )
    .sign(&Identity::generate(D, 0, &|_| {}).unwrap().0, u64::MAX, 0);
    drop(first);

    // The state dir is gone; the same pool key starts over.
    let second = start_as(cfg, root.clone()).await;
    let mut c = client(&second, Signer::identity(&ids[0])).await;
    // A stranger gets in first, with no layout, and housekeeping runs: the recovery goes on.
    join(&second, "zone-1", 9690).await.1.unwrap();
    second.c.tick(shardfarm_core::auth::now_ms());
    // Every node but one the layout names comes back (the first presenting the impostor's
    // publication, the others the pool's).
    let held_back = ids.iter().position(|id| !before.layout.slots_of(&id.id()).is_empty()).unwrap();
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != held_back) {
        let last = match i {
            0 => Some((**impostor.signed.as_ref().unwrap()).clone()),
            _ => Some(signed.clone()),
        };
        join_again(&second, id, &format!("zone-{}", i % 3), 9600 + 2 * i as u16, last)
            .await
            .unwrap();
    }
    // A holder is missing: no layout yet, and no fresh one either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = c.get_layout().await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    let zone = format!("zone-{}", held_back % 3);
    join_again(&second, &ids[held_back], &zone, 9600 + 2 * held_back as u16, None).await.unwrap();
    let after = published(&mut c).await.expect("the recovered layout");
    assert!(after.layout == before.layout, "same version, same slots");
    assert!(after.sequence > before.sequence);
    // Agents pinned to the pool accept it after the one they hold.
    let mut guard = shardfarm_proto::LayoutGuard::new(root.id());
    guard.accept(&signed).unwrap();
    assert!(guard.accept(after.signed.as_ref().unwrap()).unwrap().is_some());
    // A coordinator without the pool key: whatever it publishes, pinned agents refuse.
    let stranger = start(pool()).await;
    for (i, id) in ids.iter().enumerate().take(6) {
        join_again(
            &stranger,
            id,
            &format!("zone-{}", i % 3),
            9700 + 2 * i as u16,
            Some(signed.clone()),
        )
        .await
        .unwrap();
    }
    let mut theirs = None;
    for _ in 0..100 {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", stranger.addr));
        let signer = Signer::identity(&ids[0]);
        let channel = signer.dial(endpoint.unwrap(), stranger.c.identity().id()).await.unwrap();
        let mut raw = shardfarm_proto::pb::coordinator_client::CoordinatorClient::new(channel);
        let req = signer.request(
            stranger.c.identity().id(),
            shardfarm_proto::methods::GET_LAYOUT,
            proto::GetLayoutRequest {},
        );
        if let Ok(l) = raw.get_layout(req).await {
            theirs = Some(l.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let theirs = theirs.expect("the stranger publishes its own layout");
    let Err(e) = guard.accept(&theirs) else {
        panic!("a layout signed by a stranger was accepted")
    };
    assert_eq!(e.metric_label(), "wrong_pool", "{e}");
}

/// Joins as `id` claiming `zone`, with `grant` (possibly empty) and `labels` added.
async fn join_with(
    r: &Running,
    id: &Identity,
    zone: &str,
    port: u16,
    grant: Vec<u8>,
    labels: &[(&str, &str)],
) -> Result<proto::JoinResponse, tonic::Status> {
    let mut c = client(r, Signer::identity(id)).await;
    let ch = c.challenge().await.unwrap();
    let report = CapacityReport::prove(id, &ch.challenge, ch.difficulty as u8, machine()).unwrap();
    let mut req = join_req(zone, port, report.encode());
    req.farm_grant = grant.into();
    req.labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    c.join(req).await
}

#[tokio::test]
async fn outsiders_get_their_owner_root_as_domain_and_farm_agents_keep_theirs() {
    use shardfarm_core::grant::FarmGrant;
    let (farm, _) = Identity::generate(0, 1, &|_| {}).unwrap();
    let (unknown_farm, _) = Identity::generate(0, 1, &|_| {}).unwrap();
    let mut cfg = pool();
    cfg.farms = [(farm.id().to_hex(), [("farm".to_string(), "rack-a".to_string())].into())].into();
    let r = start(cfg).await;
    let pool_id = r.c.identity().id();
    let now = shardfarm_core::auth::now_ms() / 1000;
    let mine = || Identity::generate(D, 0, &|_| {}).unwrap().0;
    let member = |id: &Identity| r.c.members().into_iter().find(|m| m.id == id.id());

    // The farm's agent: its claimed zone stands, and the farm's label overrides its own.
    let agent = mine();
    let grant = FarmGrant::issue(&farm, agent.public_key(), pool_id, now + 60).to_bytes();
    join_with(&r, &agent, "zone-7", 9600, grant.clone(), &[("farm", "claimed")]).await.unwrap();
    let m = member(&agent).unwrap();
    assert_eq!((m.domain.as_str(), m.labels["farm"].as_str()), ("zone-7", "rack-a"));
    assert!(m.domain_from.starts_with("farm "), "{}", m.domain_from);

    // An outsider claiming the same zone gets its owner root instead, and cannot pass for
    // one of a farm's pods.
    let stranger = mine();
    let claims = [("farm", "rack-a"), ("pod", "rack-a-2")];
    join_with(&r, &stranger, "zone-7", 9602, Vec::new(), &claims).await.unwrap();
    let m = member(&stranger).unwrap();
    assert!(!m.labels.contains_key("farm") && !m.labels.contains_key("pod"), "{:?}", m.labels);
    assert_eq!(m.domain, format!("root-{}", stranger.id().short()));
    assert_eq!(m.labels["zone"], m.domain, "the claim is not kept where it could be read");
    assert_eq!(m.domain_from, "owner root");

    // The agent's grant replayed by another identity, for another pool, expired, or from a key
    // that is not one of the pool's farms: refused, and nothing joins.
    let thief = mine();
    let s = join_with(&r, &thief, "zone-7", 9604, grant, &[]).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s}");
    assert!(s.message().contains("names another node"), "{s}");
    let other_pool = FarmGrant::issue(&farm, thief.public_key(), farm.id(), now + 60);
    let s = join_with(&r, &thief, "zone-7", 9604, other_pool.to_bytes(), &[]).await.unwrap_err();
    assert!(s.message().contains("is for pool"), "{s}");
    let expired = FarmGrant::issue(&farm, thief.public_key(), pool_id, now - 1);
    let s = join_with(&r, &thief, "zone-7", 9604, expired.to_bytes(), &[]).await.unwrap_err();
    assert!(s.message().contains("expired"), "{s}");
    let self_made = FarmGrant::issue(&unknown_farm, thief.public_key(), pool_id, now + 60);
    let s = join_with(&r, &thief, "zone-7", 9604, self_made.to_bytes(), &[]).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s}");
    assert!(s.message().contains("is not one of pool"), "{s}");
    let s = join_with(&r, &thief, "zone-7", 9604, vec![0; 7], &[]).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s}");
    // A farm's agent must carry the domain label (an outsider needs none: it is assigned).
    let unlabelled = mine();
    let grant = FarmGrant::issue(&farm, unlabelled.public_key(), pool_id, now + 60);
    let mut c = client(&r, Signer::identity(&unlabelled)).await;
    let ch = c.challenge().await.unwrap();
    let p = CapacityReport::prove(&unlabelled, &ch.challenge, D, machine()).unwrap();
    let mut req = join_req("z", 9605, p.encode());
    req.labels.clear();
    req.farm_grant = grant.to_bytes().into();
    let s = c.join(req).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s}");
    assert!(s.message().contains("label `zone` is required"), "{s}");
    assert!(member(&thief).is_none());

    // Once the farm is forgotten, its grants vouch for nobody, and its agents are outsiders.
    r.c.remove_farm(&farm.id());
    let m = member(&agent).unwrap();
    assert_eq!(m.domain, format!("root-{}", agent.id().short()));
    assert!(!m.labels.contains_key("farm"), "{:?}", m.labels);
    let later = mine();
    let grant = FarmGrant::issue(&farm, later.public_key(), pool_id, now + 60).to_bytes();
    let s = join_with(&r, &later, "zone-7", 9606, grant, &[]).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s}");

    // A syndication's allow list shuts outsiders out, never the owner's own agents.
    r.c.set_farm(farm.id(), Default::default());
    r.c.set_admission(shardfarm_coordinator::Admission {
        rules: vec![AdmissionRule {
            name: "edge".into(),
            min_difficulty: 0,
            allow: Some(Default::default()),
        }],
        domains: Default::default(),
    });
    let grant = FarmGrant::issue(&farm, later.public_key(), pool_id, now + 60).to_bytes();
    join_with(&r, &later, "zone-7", 9606, grant, &[]).await.unwrap();
    let outsider = mine();
    let s = join_with(&r, &outsider, "zone-7", 9608, Vec::new(), &[]).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s}");
    assert!(s.message().contains("allow list"), "{s}");
}

#[tokio::test]
async fn label_sets_beyond_bounds_are_refused() {
    let r = start(pool()).await;
    let (id, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    let long = "x".repeat(64);
    let many: Vec<(String, String)> = (0..17).map(|i| (format!("k{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for labels in [vec![("host", long.as_str())], vec![("bad key", "v")], vec![("", "v")], many] {
        let s = join_with(&r, &id, "z0", 9700, Vec::new(), &labels).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{labels:?}: {s}");
        assert!(s.message().contains("label"), "{s}");
    }
    assert!(r.c.members().is_empty());
}

/// A heartbeat from every node of `ids`.
async fn keep_alive(r: &Running, ids: &[&Identity]) {
    for id in ids {
        let mut c = client(r, Signer::identity(id)).await;
        c.report(proto::ReportRequest::default()).await.unwrap();
    }
}

/// Reports `version` as synced for every node of `ids` and records the auditor's checks as
/// passed, then ticks: the fallback layout is dropped once all of them hold what they gained.
async fn sync_all(r: &Running, ids: &[&Identity], version: u64) {
    for id in ids {
        let mut c = client(r, Signer::identity(id)).await;
        let req = proto::ReportRequest { synced_version: version, ..Default::default() };
        c.report(req).await.unwrap();
    }
    for (node, _) in r.c.sync_work().nodes {
        r.c.record_sync_check(&node, version, true);
    }
    r.c.tick(shardfarm_core::auth::now_ms());
}

/// A member silent past the retention is forgotten only once it holds nothing a reader may
/// still need: while the fallback layout still gives it slots it stays; once the layout
/// without it is in sync, it leaves the members, the node list and the metrics.
#[tokio::test]
async fn members_long_gone_are_forgotten_once_they_hold_nothing() {
    let r = start(PoolConfig { forget_after_ms: 1_500, ..pool() }).await;
    let mut ids = Vec::new();
    for i in 0..7u16 {
        let (id, res) = join(&r, &format!("zone-{}", i % 3), 9500 + 2 * i).await;
        res.unwrap();
        ids.push(id);
    }
    let gone = ids.pop().unwrap();
    let mut c = client(&r, Signer::identity(&ids[0])).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let first = loop {
        r.c.tick(shardfarm_core::auth::now_ms());
        match c.get_layout().await {
            Ok(l) if !l.layout.slots_of(&gone.id()).is_empty() && l.previous.is_none() => break l,
            Ok(l) => {
                sync_all(&r, &ids.iter().chain([&gone]).collect::<Vec<_>>(), l.layout.version).await
            }
            Err(_) => {}
        }
        assert!(std::time::Instant::now() < deadline, "no layout giving the seventh slots");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The seventh falls silent; the others keep reporting. Past the grace (1 s) it is down and
    // a new layout re-places its slots, with the old one as the readers' fallback.
    let live: Vec<&Identity> = ids.iter().collect();
    let silent_from = std::time::Instant::now();
    while silent_from.elapsed() < Duration::from_millis(2_000) {
        keep_alive(&r, &live).await;
        r.c.tick(shardfarm_core::auth::now_ms());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let second = c.get_layout().await.unwrap();
    assert!(second.layout.version > first.layout.version);
    assert!(second.layout.slots_of(&gone.id()).is_empty());
    assert!(second.previous.as_ref().is_some_and(|p| !p.slots_of(&gone.id()).is_empty()));
    // Silent past the retention (1.5 s), but the fallback still names it: it stays.
    assert!(r.c.members().iter().any(|m| m.id == gone.id() && !m.up));

    // The layout without it is in sync: the fallback is dropped, and the seventh forgotten.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while r.c.members().iter().any(|m| m.id == gone.id()) {
        keep_alive(&r, &live).await;
        sync_all(&r, &live, second.layout.version).await;
        assert!(std::time::Instant::now() < deadline, "the seventh was never forgotten");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.list_nodes().await.unwrap().nodes.len(), 6);
    let short = &gone.id().to_hex()[..12];
    let m = r.c.metrics.render();
    assert!(!m.contains(short), "its series are still exported:\n{m}");
}

/// A member of the layout that joins again at another address (a pod recreated with a new
/// IP, an agent restarted on another port) is republished at once: the same layout version
/// under a higher sequence, carrying the new address and the pool's settings, signed.
#[tokio::test]
async fn a_member_back_at_another_address_is_republished_at_once() {
    let r = start(pool()).await;
    let mut ids = Vec::new();
    for i in 0..6u16 {
        let (id, res) = join(&r, &format!("zone-{}", i % 3), 9400 + 2 * i).await;
        res.unwrap();
        ids.push(id);
    }
    let mut c = client(&r, Signer::identity(&ids[0])).await;
    let first = published(&mut c).await.expect("a layout for six nodes");
    assert_eq!(first.address(&ids[3].id()), Some("127.0.0.1:9406"));
    let info = first.pool.clone().expect("the publication carries the pool's settings");
    assert_eq!((info.k, info.m, info.pool.as_str()), (4, 2, "test"));
    assert_eq!(info.partitions as usize, first.layout.partitions.len());

    let mut watch = c.watch_layout().await.unwrap();
    let mut guard = shardfarm_proto::LayoutGuard::new(r.c.identity().id());
    guard.accept(&watch.message().await.unwrap().unwrap()).unwrap();
    join_again(&r, &ids[3], "zone-0", 9500, None).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("a publication within 5 s of the move")
        .unwrap()
        .unwrap();
    let next = guard.accept(&next).unwrap().expect("a newer publication");
    assert_eq!(next.layout.version, first.layout.version, "the same layout");
    assert!(next.sequence > first.sequence);
    assert_eq!(next.address(&ids[3].id()), Some("127.0.0.1:9500"));
    assert_eq!(next.address(&ids[4].id()), Some("127.0.0.1:9408"));

    // The same address again publishes nothing new.
    join_again(&r, &ids[3], "zone-0", 9500, None).await.unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(500), watch.message()).await;
    assert!(quiet.is_err(), "a join at the same address republished: {quiet:?}");
}

/// Attack 4 of the hostile round: one root identity with many delegated keys floods
/// Challenge while a member of the pool restarts. The root gets its share of challenges (all
/// its keys together) and a precise refusal past it; another stranger still gets one; the
/// member rejoins at once, through its own share.
#[tokio::test]
async fn a_challenge_flood_from_one_root_keeps_neither_a_member_nor_another_stranger_out() {
    let r = start(pool()).await;
    let (member, joined) = join(&r, "z0", 7100).await;
    joined.unwrap();
    let (root, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    let mut issued = 0;
    let mut refusal = None;
    for _ in 0..40 {
        let key = random_signing_key();
        let cert = Delegation::issue(&root, key.verifying_key(), u64::MAX / 2000);
        let mut c = client(&r, Signer::delegated(cert, key)).await;
        match c.challenge().await {
            Ok(_) => issued += 1,
            Err(e) => refusal = Some(e),
        }
    }
    // Its share: the base share times the weight of the work it proved (one share at exactly
    // the pool's minimum, doubling with each bit above it).
    let weight = shardfarm_core::auth::share_weight(root.difficulty(), D) as usize;
    assert_eq!(issued, shardfarm_coordinator::MAX_CHALLENGES_PER_ROOT * weight);
    let refusal = refusal.unwrap();
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("its share"), "{}", refusal.message());
    assert!(refusal.message().contains(&root.id().short()), "{}", refusal.message());
    // Another stranger, and the member coming back, are not held up.
    let (other, _) = Identity::generate(D, 0, &|_| {}).unwrap();
    client(&r, Signer::identity(&other)).await.challenge().await.unwrap();
    join_again(&r, &member, "z0", 7100, None).await.unwrap();
}
