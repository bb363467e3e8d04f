//! Agent benchmarks: prints figures, asserts nothing.
//!
//! Build with the workspace (`cargo build --workspace --all-targets`; one profile, dependencies
//! optimised) and run `$CARGO_TARGET_DIR/debug/examples/bench rpc` or `… store [GiB]`.
//!
//! - `rpc`: one agent process on loopback. PutShard/GetShard throughput for 1 and 16 MiB
//!   shards with 1 and 8 concurrent clients, beside a plain TCP copy of the same bytes and a raw
//!   write of the same values into the same store without gRPC; 4 KiB puts/gets per second;
//!   the agent's peak RSS during 8 concurrent 16 MiB uploads.
//! - `tls [rounds]`: what TLS costs. The same put/get runs (1 and 16 MiB shards, 1 and 8
//!   clients, 4 KiB shards, fresh connections) against an agent serving TLS and one serving
//!   `--insecure-plaintext`, alternated, best of `rounds` each, side by side.
//! - `getshard [rounds]`: GetShard alone (16 MiB shards, one client, read `rounds` times)
//!   beside TCP and TLS copies of the same bytes; the loop to run under a profiler.
//! - `rate [seconds] [connections]`: one identity's sustained request rate against one agent
//!   (GetShard of 4 KiB shards over TLS, 16 connections, 10 minutes by default), per 10 s
//!   window, with every refusal by status: an honest busy identity must meet no rate cap.
//! - `store [GiB]`: the payload layout decision. The same sustained workload (4 MiB values,
//!   durable writes, a bounded live set so old values are deleted) on our store (files +
//!   RocksDB index) and on RocksDB BlobDB; throughput and write amplification measured from
//!   the kernel's per-process write counter.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use shardfarm_agent::store::{ShardId, Store};
use shardfarm_core::codec::{CodecParams, Encoder};
use shardfarm_core::identity::{Identity, NodeId};
use shardfarm_core::shard::{Cipher, merkle_root};
use shardfarm_proto::{AgentClient, Signer};

const MIB: usize = 1 << 20;

fn disk_write_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn peak_rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Shards of `count` distinct segments, each `shard_len` bytes, as (header, shard 0).
fn shards(uploader: &Identity, count: usize, shard_len: usize) -> Vec<(Vec<u8>, Bytes)> {
    (0..count)
        .map(|i| {
            // RS(1,1): shard 0 is the ciphertext itself, so its length is controlled exactly.
            let len = shard_len - 16;
            let p = CodecParams { k: 1, m: 1, segment_size: len as u64, cipher: Cipher::Aes256Gcm };
            let data = vec![(i % 251) as u8; len];
            let mut enc =
                Encoder::new(p, len as u64, uploader.signing_key().clone(), 0, 0).unwrap();
            let s = enc.encode_segment(0, &data).unwrap();
            (s.header.encode(), Bytes::copy_from_slice(s.shards[0]))
        })
        .collect()
}

fn tcp_copy(total: usize, chunk: usize) -> f64 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; MIB];
        let mut n = 0;
        while n < total {
            n += s.read(&mut buf).unwrap();
        }
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    let buf = vec![7u8; chunk];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        c.write_all(&buf).unwrap();
        sent += chunk;
    }
    server.join().unwrap();
    total as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// The same copy as [`tcp_copy`] through a TLS 1.3 stream with the agents' own configuration
/// (rustls, ring, ed25519 raw public keys): the most a TLS GetShard could reach on this
/// machine, since every byte is encrypted on one side and decrypted on the other.
async fn tls_copy(total: usize, chunk: usize) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, _) = Identity::generate(8, 1, &|_| {}).unwrap();
    let (client, _) = Identity::generate(8, 1, &|_| {}).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        shardfarm_proto::tls::server_config(server.signing_key()).unwrap(),
    );
    let connector = tokio_rustls::TlsConnector::from(
        shardfarm_proto::tls::client_config(client.signing_key(), server.id()).unwrap(),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        let mut buf = vec![0u8; MIB];
        let mut n = 0;
        while n < total {
            n += s.read(&mut buf).await.unwrap();
        }
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("shardfarm").unwrap();
    let mut c = connector.connect(name, tcp).await.unwrap();
    let buf = vec![7u8; chunk];
    let t = Instant::now();
    let mut sent = 0;
    while sent < total {
        c.write_all(&buf).await.unwrap();
        sent += chunk;
    }
    c.flush().await.unwrap();
    reader.await.unwrap();
    total as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Starts an agent on loopback with `extra` flags; returns it (the caller stops and waits for
/// it), its address and its id.
#[allow(clippy::zombie_processes)]
async fn start_agent(data: &Path, extra: &[&str]) -> (std::process::Child, String, NodeId) {
    let exe = std::env::current_exe().unwrap();
    let agent_bin = exe.parent().unwrap().parent().unwrap().join("shardfarm-agent");
    // With BENCH_AGENT_CPUS (e.g. `1`) the agent runs on those cores only (`taskset`).
    let mut cmd = match std::env::var("BENCH_AGENT_CPUS") {
        Ok(cpus) => {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", &cpus]).arg(&agent_bin);
            c
        }
        Err(_) => std::process::Command::new(&agent_bin),
    };
    let child = cmd
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--capacity", "100GiB"])
        .args(["--identity-difficulty", "8", "--pool-difficulty", "8", "--max-message", "8MiB"])
        // A short replay window: one identity's many requests leave it quickly, so repeated
        // rounds stay under its share of the window.
        .args(["--timestamp-window", "20"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("run `cargo build --workspace --all-targets` first");
    let ep = data.join("endpoints.json");
    loop {
        if let Ok(t) = std::fs::read_to_string(&ep) {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap();
            let id = NodeId::from_hex(v["node_id"].as_str().unwrap()).unwrap();
            return (child, v["grpc"].as_str().unwrap().to_string(), id);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Puts every shard of `set` with `clients` concurrent connections, reads them all back, then
/// deletes them; returns (put, get) in GB/s.
async fn put_get(
    addr: &str,
    node: NodeId,
    signer: &Arc<Signer>,
    set: &Arc<Vec<(Vec<u8>, Bytes)>>,
    clients: usize,
) -> (f64, f64) {
    let total: usize = set.iter().map(|(_, s)| s.len()).sum();
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(AgentClient::connect(addr, node, signer.clone()).await.unwrap());
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (c, mut conn) in conns.clone().into_iter().enumerate() {
        let set = set.clone();
        tasks.push(tokio::spawn(async move {
            for (h, s) in set.iter().skip(c).step_by(clients) {
                conn.put_shard(h, 0, s.clone()).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let put = total as f64 / t.elapsed().as_secs_f64() / 1e9;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (c, mut conn) in conns.into_iter().enumerate() {
        let set = set.clone();
        tasks.push(tokio::spawn(async move {
            for (h, _) in set.iter().skip(c).step_by(clients) {
                let hd = shardfarm_core::shard::SegmentHeader::decode_unverified(h).unwrap();
                let id = ShardId { object_id: hd.object_id, segment: 0, shard: 0 };
                let got = conn.get_shard(id, 0, 0).await.unwrap();
                assert_eq!(got.data.len(), hd.shard_length as usize);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let get = total as f64 / t.elapsed().as_secs_f64() / 1e9;
    // Delete so the next round writes fresh shards.
    let mut c = AgentClient::connect(addr, node, signer.clone()).await.unwrap();
    for (h, _) in set.iter() {
        let hd = shardfarm_core::shard::SegmentHeader::decode_unverified(h).unwrap();
        c.delete_shard(ShardId { object_id: hd.object_id, segment: 0, shard: 0 }).await.unwrap();
    }
    (put, get)
}

/// GetShard alone, for profiling the read path: 32 shards of 16 MiB stored once, then read by
/// one client `rounds` times over TLS; each round's rate beside the TCP and TLS copies.
async fn getshard(rounds: usize) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (mut child, addr, node) = start_agent(&dir.path().join("agent"), &[]).await;
    let (me, _) = Identity::generate(8, 1, &|_| {}).unwrap();
    let signer = Arc::new(Signer::identity(&me));
    let set = shards(&me, 32, 16 * MIB);
    let total: usize = set.iter().map(|(_, s)| s.len()).sum();
    let mut conn = AgentClient::connect(&addr, node, signer).await.unwrap();
    for (h, s) in &set {
        conn.put_shard(h, 0, s.clone()).await.unwrap();
    }
    let tcp = tcp_copy(total, 4 * MIB);
    let tls = tls_copy(total, 4 * MIB).await;
    println!("GetShard, 16 MiB shards, 1 client; TCP copy {tcp:.2} GB/s, TLS copy {tls:.2} GB/s");
    for round in 0..rounds {
        let t = Instant::now();
        for (h, _) in &set {
            let hd = shardfarm_core::shard::SegmentHeader::decode_unverified(h).unwrap();
            let id = ShardId { object_id: hd.object_id, segment: 0, shard: 0 };
            let got = conn.get_shard(id, 0, 0).await.unwrap();
            assert_eq!(got.data.len(), hd.shard_length as usize);
        }
        let get = total as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!(
            "  round {round}: {get:.2} GB/s ({:.0} % of TCP, {:.0} % of TLS)",
            100.0 * get / tcp,
            100.0 * get / tls
        );
    }
    unsafe_term(child.id());
    let _ = child.wait();
}

/// The cost of TLS: the same put/get runs against an agent serving TLS and one serving
/// plaintext (`--insecure-plaintext`), alternated, best of `rounds` each.
async fn tls(rounds: usize) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (mut tls_agent, tls_addr, tls_node) = start_agent(&dir.path().join("tls"), &[]).await;
    let (mut plain_agent, plain_addr, plain_node) =
        start_agent(&dir.path().join("plain"), &["--insecure-plaintext"]).await;
    let (me, _) = Identity::generate(8, 1, &|_| {}).unwrap();
    let tls_signer = Arc::new(Signer::identity(&me));
    let plain_signer =
        Arc::new(Signer::identity(&me).with_security(shardfarm_proto::Security::InsecurePlaintext));
    println!(
        "TLS cost (two agents on loopback, fsync per shard; best of {rounds} alternated runs)"
    );
    for (shard_mib, total_mib) in [(1usize, 256usize), (16, 512)] {
        let set = Arc::new(shards(&me, total_mib / shard_mib, shard_mib * MIB));
        for clients in [1usize, 8] {
            let (mut tls_best, mut plain_best) = ((0f64, 0f64), (0f64, 0f64));
            for _ in 0..rounds {
                let (p, g) = put_get(&plain_addr, plain_node, &plain_signer, &set, clients).await;
                plain_best = (plain_best.0.max(p), plain_best.1.max(g));
                let (p, g) = put_get(&tls_addr, tls_node, &tls_signer, &set, clients).await;
                tls_best = (tls_best.0.max(p), tls_best.1.max(g));
            }
            let cost = |tls: f64, plain: f64| 100.0 * (1.0 - tls / plain);
            println!(
                "  {shard_mib:>2} MiB shards, {clients} client(s): put TLS {:.2} vs plaintext {:.2} GB/s (TLS costs {:.0} %) | get TLS {:.2} vs plaintext {:.2} GB/s (TLS costs {:.0} %)",
                tls_best.0,
                plain_best.0,
                cost(tls_best.0, plain_best.0),
                tls_best.1,
                plain_best.1,
                cost(tls_best.1, plain_best.1),
            );
        }
    }
    // Small calls: the handshake and record overhead per 4 KiB shard.
    let small = Arc::new(shards(&me, 2000, 4096));
    for (name, addr, node, signer) in [
        ("plaintext", &plain_addr, plain_node, &plain_signer),
        ("TLS", &tls_addr, tls_node, &tls_signer),
    ] {
        let t = Instant::now();
        put_get(addr, node, signer, &small, 8).await;
        println!(
            "  4 KiB shards, 8 clients, {name}: {:.0} puts+gets/s",
            2.0 * small.len() as f64 / t.elapsed().as_secs_f64()
        );
    }
    // A fresh connection: TCP connect + TLS 1.3 handshake + one call.
    for (name, addr, node, signer) in [
        ("plaintext", &plain_addr, plain_node, &plain_signer),
        ("TLS", &tls_addr, tls_node, &tls_signer),
    ] {
        let t = Instant::now();
        for _ in 0..200 {
            AgentClient::connect(addr, node, signer.clone()).await.unwrap().info().await.unwrap();
        }
        println!(
            "  connect + one call, {name}: {:.2} ms",
            t.elapsed().as_secs_f64() * 1000.0 / 200.0
        );
    }
    for c in [&mut tls_agent, &mut plain_agent] {
        unsafe_term(c.id());
        let _ = c.wait();
    }
}

async fn rpc() {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (mut child, addr, node) = start_agent(&dir.path().join("agent"), &[]).await;
    let (me, _) = Identity::generate(8, 1, &|_| {}).unwrap();
    let signer = Arc::new(Signer::identity(&me));
    println!("agent rpc benchmark (one agent on loopback, fsync per shard)");
    for (shard_mib, total_mib) in [(1usize, 512usize), (16, 1024)] {
        let count = total_mib / shard_mib;
        let set = Arc::new(shards(&me, count, shard_mib * MIB));
        let tcp = tcp_copy(total_mib * MIB, shard_mib.min(4) * MIB);
        let tls = tls_copy(total_mib * MIB, shard_mib.min(4) * MIB).await;
        // Raw store writes of the same values (no gRPC), in a separate store on the same disk.
        let raw_dir = dir.path().join(format!("raw{shard_mib}"));
        let store = Store::open(&raw_dir).unwrap();
        let t = Instant::now();
        for (i, (h, s)) in set.iter().enumerate() {
            let mut p = store.begin().unwrap();
            p.write(s).unwrap();
            let root = p.root();
            let id = ShardId { object_id: [i as u8; 32], segment: i as u32, shard: 0 };
            store.commit(p, root, &id, 0, h, [0; 32], 0).unwrap();
        }
        let raw = (total_mib * MIB) as f64 / t.elapsed().as_secs_f64() / 1e9;
        drop(store);
        for clients in [1usize, 8] {
            let (put, get) = put_get(&addr, node, &signer, &set, clients).await;
            println!(
                "  {shard_mib:>2} MiB shards, {clients} client(s): put {put:.2} GB/s ({:.0} % of raw store {raw:.2}) | get {get:.2} GB/s ({:.0} % of TCP copy {tcp:.2}, {:.0} % of TLS copy {tls:.2})",
                100.0 * put / raw,
                100.0 * get / tcp,
                100.0 * get / tls
            );
        }
    }
    // Peak RSS during 8 concurrent 16 MiB uploads (the loop above did exactly that last).
    println!(
        "  agent peak RSS (VmHWM) after 8 concurrent 16 MiB uploads: {} MiB",
        peak_rss_kib(child.id()) / 1024
    );

    // Small shards: 4 KiB puts and gets per second with 8 clients.
    let small = Arc::new(shards(&me, 2000, 4096));
    for op in ["put", "get"] {
        let t = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..8usize {
            let small = small.clone();
            let mut conn = AgentClient::connect(&addr, node, signer.clone()).await.unwrap();
            let op = op.to_string();
            tasks.push(tokio::spawn(async move {
                for (h, s) in small.iter().skip(c).step_by(8) {
                    if op == "put" {
                        conn.put_shard(h, 0, s.clone()).await.unwrap();
                    } else {
                        let hd =
                            shardfarm_core::shard::SegmentHeader::decode_unverified(h).unwrap();
                        conn.get_shard(
                            ShardId { object_id: hd.object_id, segment: 0, shard: 0 },
                            0,
                            0,
                        )
                        .await
                        .unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        println!(
            "  4 KiB shards, 8 clients: {:.0} {op}s/s",
            small.len() as f64 / t.elapsed().as_secs_f64()
        );
    }
    unsafe_term(child.id());
    let _ = child.wait();
}

/// One identity, sustained: `conns` connections of the same signer loop over GetShard of
/// 4 KiB shards (the call a gateway and a rebuilding peer make most) for `secs` seconds. Prints
/// requests per second for every 10 s window, refusals by status, and the agent's peak RSS:
/// a busy honest identity must not run into a rate cap (replay state, shares).
async fn rate(secs: u64, conns: usize) {
    let dir = tempfile::tempdir_in(".").unwrap();
    let (mut child, addr, node) = start_agent(&dir.path().join("agent"), &[]).await;
    let (me, _) = Identity::generate(8, 1, &|_| {}).unwrap();
    let signer = Arc::new(Signer::identity(&me));
    let set = Arc::new(shards(&me, 256, 4096));
    let mut c = AgentClient::connect(&addr, node, signer.clone()).await.unwrap();
    for (h, s) in set.iter() {
        c.put_shard(h, 0, s.clone()).await.unwrap();
    }
    println!(
        "one identity, {conns} connections, GetShard of 4 KiB shards for {secs} s (agent over TLS, fsync on)"
    );
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let refused = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let end = Instant::now() + std::time::Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for t in 0..conns {
        let mut conn = AgentClient::connect(&addr, node, signer.clone()).await.unwrap();
        let (set, ok, refused) = (set.clone(), ok.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while Instant::now() < end {
                let hd = shardfarm_core::shard::SegmentHeader::decode_unverified(&set[i % 256].0)
                    .unwrap();
                let id = ShardId { object_id: hd.object_id, segment: 0, shard: 0 };
                match conn.get_shard(id, 0, 0).await {
                    Ok(_) => {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        let why = format!("{:?}: {}", e.code(), e.message());
                        *refused.lock().unwrap().entry(why).or_default() += 1;
                    }
                }
                i += conns;
            }
        }));
    }
    let start = Instant::now();
    let (mut last, mut windows) = (0u64, Vec::new());
    while Instant::now() < end {
        tokio::time::sleep(std::time::Duration::from_secs(10).min(end - Instant::now())).await;
        let now = ok.load(std::sync::atomic::Ordering::Relaxed);
        let r = (now - last) as f64 / 10.0;
        windows.push(r);
        println!("  {:>4.0} s: {r:>6.0} requests/s", start.elapsed().as_secs_f64());
        last = now;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = ok.load(std::sync::atomic::Ordering::Relaxed);
    let min = windows.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "  total {total} requests, {:.0}/s on average, slowest 10 s window {min:.0}/s; agent peak RSS {} MiB",
        total as f64 / start.elapsed().as_secs_f64(),
        peak_rss_kib(child.id()) / 1024
    );
    let refused = refused.lock().unwrap();
    if refused.is_empty() {
        println!("  refused: none");
    }
    for (why, n) in refused.iter() {
        println!("  refused {n}×: {why}");
    }
    unsafe_term(child.id());
    let _ = child.wait();
}

fn unsafe_term(pid: u32) {
    let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
}

/// The sustained workload: `total` bytes of `value`-sized writes, keeping at most `live` bytes
/// (oldest deleted first).
fn store_workload(
    name: &str,
    total: usize,
    value: usize,
    live: usize,
    mut put: impl FnMut(usize, &[u8]),
    mut del: impl FnMut(usize),
) {
    let buf: Vec<u8> = (0..value).map(|i| (i * 7 % 256) as u8).collect();
    let count = total / value;
    let keep = live / value;
    let w0 = disk_write_bytes();
    let t = Instant::now();
    for i in 0..count {
        let mut v = buf.clone();
        v[..8].copy_from_slice(&(i as u64).to_le_bytes());
        put(i, &v);
        if i >= keep {
            del(i - keep);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let written = disk_write_bytes() - w0;
    println!(
        "  {name:<28} {:.1} GiB in {secs:.0} s: {:.2} GB/s, disk writes {:.1} GiB, write amplification {:.2}",
        total as f64 / (1u64 << 30) as f64,
        total as f64 / secs / 1e9,
        written as f64 / (1u64 << 30) as f64,
        written as f64 / total as f64
    );
}

fn store(gib: usize) {
    let total = gib << 30;
    let value = 4 * MIB;
    let live = 4usize << 30;
    println!(
        "store benchmark: {gib} GiB of 4 MiB values, live set 4 GiB (older values deleted), every write durable"
    );
    let dir = tempfile::tempdir_in(".").unwrap();
    {
        let store = Store::open(&dir.path().join("files")).unwrap();
        let id = |i: usize| ShardId { object_id: [0; 32], segment: i as u32, shard: 0 };
        store_workload(
            "files + RocksDB index",
            total,
            value,
            live,
            |i, v| {
                let mut p = store.begin().unwrap();
                p.write(v).unwrap();
                let root = p.root();
                store.commit(p, root, &id(i), 0, b"h", [0; 32], 0).unwrap();
            },
            |i| {
                store.remove(&id(i), 0).unwrap();
            },
        );
    }
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.set_enable_blob_files(true);
        opts.set_min_blob_size(0);
        opts.set_enable_blob_gc(true);
        opts.set_blob_gc_age_cutoff(0.25);
        opts.set_blob_file_size(256 << 20);
        let db = rocksdb::DB::open(&opts, dir.path().join("blobdb")).unwrap();
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        store_workload(
            "RocksDB BlobDB (synced WAL)",
            total,
            value,
            live,
            |i, v| {
                // The same work per shard as the file store: hash it, then store it durably.
                std::hint::black_box(merkle_root(v));
                db.put_opt((i as u64).to_be_bytes(), v, &wo).unwrap();
            },
            |i| db.delete_opt((i as u64).to_be_bytes(), &wo).unwrap(),
        );
        db.flush().unwrap();
        db.compact_range::<&[u8], &[u8]>(None, None);
        let live_sst: u64 = std::fs::read_dir(dir.path().join("blobdb"))
            .unwrap()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        println!(
            "  BlobDB directory after flush + compaction: {:.1} GiB for a 4 GiB live set",
            live_sst as f64 / (1u64 << 30) as f64
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("rpc") => tokio::runtime::Runtime::new().unwrap().block_on(rpc()),
        Some("tls") => {
            let rounds = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(3);
            tokio::runtime::Runtime::new().unwrap().block_on(tls(rounds))
        }
        Some("getshard") => {
            let rounds = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(5);
            tokio::runtime::Runtime::new().unwrap().block_on(getshard(rounds))
        }
        Some("tcp") => {
            let gib: usize = args.get(2).and_then(|g| g.parse().ok()).unwrap_or(2);
            println!("loopback TCP copy, 1 MiB writes: {:.2} GB/s", tcp_copy(gib << 30, MIB));
        }
        Some("store") => store(args.get(2).and_then(|g| g.parse().ok()).unwrap_or(20)),
        Some("rate") => {
            let secs = args.get(2).and_then(|g| g.parse().ok()).unwrap_or(600);
            let conns = args.get(3).and_then(|g| g.parse().ok()).unwrap_or(16);
            tokio::runtime::Runtime::new().unwrap().block_on(rate(secs, conns))
        }
        _ => {
            eprintln!(
                "usage: bench rpc | bench tls [rounds, default 3] | bench getshard [rounds, default 5] | bench store [GiB, default 20] \
                 | bench tcp [GiB] | bench rate [seconds, default 600] [connections, default 16]"
            );
            std::process::exit(2);
        }
    }
    let _ = Path::new(".");
}
