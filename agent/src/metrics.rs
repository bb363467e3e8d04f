//! Prometheus metrics of the agent. Names follow STYLE.md §9: `shardfarm_` prefix, base units,
//! `_total` on counters; labels are bounded (method names, results, reasons).

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Owner roots shown by name in the "who is spending" gauges; the rest are summed as `others`.
pub const TOP_ROOTS: usize = 5;
/// Owner roots counted by name between two publications; requests of roots beyond are counted
/// as `others` (memory stays bounded whatever a flood of roots does).
const COUNTED_ROOTS: usize = 4096;

/// All agent metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// Requests by method and result (`ok` or a status code name).
    pub requests: IntCounterVec,
    /// Request latency by method.
    pub request_seconds: HistogramVec,
    /// Refused requests by auth reason.
    pub auth_failures: IntCounterVec,
    /// Uploads refused because too many were in flight (`per_identity`, `node_busy`).
    pub uploads_refused: IntCounterVec,
    /// Uploads in flight (each holds a reservation and a temp file).
    pub uploads_in_flight: IntGauge,
    /// Payload bytes received in PutShard.
    pub bytes_in: IntCounter,
    /// Payload bytes sent in GetShard.
    pub bytes_out: IntCounter,
    /// Shards stored.
    pub shards: IntGauge,
    /// Payload bytes stored.
    pub stored_bytes: IntGauge,
    /// Configured capacity.
    pub capacity_bytes: IntGauge,
    /// Shards checked by scrub.
    pub scrub_checked: IntCounter,
    /// Corrupt shards found, by where they were found (get, audit, scrub).
    pub corrupt_shards: IntCounterVec,
    /// Audits answered by result.
    pub audits: IntCounterVec,
    /// Leading zero bits of this node's identity.
    pub identity_difficulty: IntGauge,
    /// Unix time the agent started.
    pub start_time: Gauge,
    /// Inputs and result of the latest capacity proof (label `input`: processors, cores,
    /// solve_seconds, overhead, reported_bytes, taken_bytes, capacity).
    pub capacity_proof: GaugeVec,
    /// Build information.
    pub build_info: IntGauge,
    /// Shards this node holds a slot for but lacks (repair still to do).
    pub repair_backlog: IntGauge,
    /// Shards repaired, by how (`copy` from its previous holder, `rebuild` from k peers).
    pub repaired: IntCounterVec,
    /// Bytes written by repair.
    pub repair_bytes: IntCounter,
    /// Repairs that failed (retried on the next pass).
    pub repair_failures: IntCounter,
    /// Partition listings a holder of the current layout did not answer during repair passes
    /// (each keeps the pass from counting as a sync), by peer (a layout member's short id).
    pub listing_failures: IntCounterVec,
    /// Partitions repair passes compared with their holders, by result: `agreed` (every
    /// holder's summary matched: nothing listed) or `listed` (a summary differed or a holder
    /// did not answer: the partition was listed from every holder).
    pub partitions_compared: IntCounterVec,
    /// How long repair passes take.
    pub repair_pass_seconds: prometheus::Histogram,
    /// Repair passes that were not a sync (a listing missing or a repair failed; retried with
    /// backoff).
    pub repair_passes_failed: IntCounter,
    /// The oldest of the times each partition this node holds was last proven whole (every
    /// current holder listed it, nothing left to repair), Unix seconds; a partition not yet
    /// proven for the current layout counts from when the layout arrived (from the start,
    /// before the first pass).
    pub repair_proven_timestamp: Gauge,
    /// Segments with fewer than k shards that are younger than the upload grace: being
    /// written, not lost.
    pub segments_being_written: IntGauge,
    /// Shards deleted after their new holder confirmed them (handoff).
    pub handed_off: IntCounter,
    /// Newest layout version received from the coordinator.
    pub layout_version: IntGauge,
    /// Layout publications refused, by reason (`LayoutRefusal::METRIC_LABELS`).
    pub layouts_refused: IntCounterVec,
    /// Newest layout version this node has fully repaired for.
    pub synced_version: IntGauge,
    /// Shard reads that failed for another reason than corruption (not quarantined).
    pub read_errors: IntCounter,
    /// Tombstones kept.
    pub tombstones: IntGauge,
    /// Repair sources refused, by reason (`forged_header`, `corrupt`, `wrong_segment`).
    pub bad_sources: IntCounterVec,
    /// Segments this node holds a slot of that have fewer than k verified shards anywhere.
    pub lost_segments: IntGauge,
    /// Tombstones refused: an owner root past its rate for objects this node holds nothing of.
    pub tombstones_refused: IntCounter,
    /// Connections closed by admission, by reason (`when_full`, `per_root`, `no_request`,
    /// `handshake_rate`).
    pub connections_closed: IntCounterVec,
    /// Connections open.
    pub connections: IntGauge,
    /// Requests of strangers served beyond their owner root's rate (each left the root's
    /// connections unread until it was back within it).
    pub requests_paced: IntCounter,
    /// Requests refused for a share or limit (`resource_exhausted`, `unavailable`), by method
    /// and whether the caller holds a slot in the layout (`member`) or not (`stranger`).
    pub refused: IntCounterVec,
    /// Verified requests in the last minute of the owner roots that sent the most (`root`:
    /// short id, [`TOP_ROOTS`] of them; `others`: the rest together).
    pub top_root_requests: IntGaugeVec,
    /// Upload bytes in flight (reserved) of the owner roots holding the most, as above.
    pub top_root_upload_bytes: IntGaugeVec,
    /// Requests per owner root since the last publication.
    spending: Mutex<HashMap<[u8; 32], u64>>,
    /// Shards deleted because no layout slot accounts for them or their segment never became
    /// readable (garbage collection), and because of tombstones, by reason.
    pub collected: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("shardfarm_agent_requests_total", "gRPC requests by method and result"),
            &["method", "result"],
        )
        .unwrap();
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("shardfarm_agent_request_duration_seconds", "gRPC request latency")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap()),
            &["method"],
        )
        .unwrap();
        let auth_failures = IntCounterVec::new(
            Opts::new("shardfarm_agent_auth_failures_total", "requests refused by the auth layer"),
            &["reason"],
        )
        .unwrap();
        let uploads_refused = IntCounterVec::new(
            Opts::new(
                "shardfarm_agent_uploads_refused_total",
                "uploads refused because too many were in flight, by limit",
            ),
            &["reason"],
        )
        .unwrap();
        let uploads_in_flight = IntGauge::new(
            "shardfarm_agent_uploads_in_flight",
            "uploads in flight (each holds a reservation and a temp file)",
        )
        .unwrap();
        let bytes_in =
            IntCounter::new("shardfarm_agent_received_bytes_total", "shard bytes received")
                .unwrap();
        let bytes_out =
            IntCounter::new("shardfarm_agent_sent_bytes_total", "shard bytes sent").unwrap();
        let shards = IntGauge::new("shardfarm_agent_shards", "shards stored").unwrap();
        let stored_bytes =
            IntGauge::new("shardfarm_agent_stored_bytes", "shard payload bytes stored").unwrap();
        let capacity_bytes =
            IntGauge::new("shardfarm_agent_capacity_bytes", "capacity offered").unwrap();
        let scrub_checked = IntCounter::new(
            "shardfarm_agent_scrub_checked_shards_total",
            "shards re-hashed by scrub",
        )
        .unwrap();
        let corrupt_shards = IntCounterVec::new(
            Opts::new("shardfarm_agent_corrupt_shards_total", "corrupt shards quarantined"),
            &["found_by"],
        )
        .unwrap();
        let audits = IntCounterVec::new(
            Opts::new("shardfarm_agent_audits_total", "storage audits answered by result"),
            &["result"],
        )
        .unwrap();
        let identity_difficulty = IntGauge::new(
            "shardfarm_agent_identity_difficulty_bits",
            "leading zero bits of this node's mined identity",
        )
        .unwrap();
        let start_time =
            Gauge::new("shardfarm_agent_start_time_seconds", "unix time the agent started")
                .unwrap();
        let capacity_proof = GaugeVec::new(
            Opts::new(
                "shardfarm_agent_capacity_proof",
                "inputs and result of the latest capacity proof",
            ),
            &["input"],
        )
        .unwrap();
        let build_info = IntGauge::with_opts(
            Opts::new("shardfarm_agent_build_info", "build information")
                .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .unwrap();
        build_info.set(1);
        let repair_backlog = IntGauge::new(
            "shardfarm_agent_repair_backlog_shards",
            "shards this node holds a slot for but still lacks",
        )
        .unwrap();
        let repaired = IntCounterVec::new(
            Opts::new("shardfarm_agent_repaired_shards_total", "shards repaired, by method"),
            &["method"],
        )
        .unwrap();
        let repair_bytes =
            IntCounter::new("shardfarm_agent_repair_bytes_total", "bytes written by repair")
                .unwrap();
        let listing_failures = IntCounterVec::new(
            Opts::new(
                "shardfarm_agent_repair_listing_failures_total",
                "partition listings a current holder did not answer during repair passes (the pass is then not a sync), by peer",
            ),
            &["peer"],
        )
        .unwrap();
        let partitions_compared = IntCounterVec::new(
            Opts::new(
                "shardfarm_agent_repair_partitions_compared_total",
                "partitions repair passes compared with their holders: agreed (nothing listed) or listed",
            ),
            &["result"],
        )
        .unwrap();
        for r in ["agreed", "listed"] {
            partitions_compared.with_label_values(&[r]);
        }
        let repair_pass_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new("shardfarm_agent_repair_pass_duration_seconds", "repair pass time")
                .buckets(prometheus::exponential_buckets(0.01, 4.0, 9).unwrap()),
        )
        .unwrap();
        let repair_passes_failed = IntCounter::new(
            "shardfarm_agent_repair_passes_failed_total",
            "repair passes that were not a sync (a listing missing or a repair failed)",
        )
        .unwrap();
        let repair_proven_timestamp = Gauge::new(
            "shardfarm_agent_repair_proven_timestamp_seconds",
            "oldest time a partition held here was last proven whole by every current holder's listing (unproven ones: when their layout arrived)",
        )
        .unwrap();
        repair_proven_timestamp.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        let segments_being_written = IntGauge::new(
            "shardfarm_agent_segments_being_written",
            "segments with fewer than k shards younger than the upload grace (not lost)",
        )
        .unwrap();
        let repair_failures =
            IntCounter::new("shardfarm_agent_repair_failures_total", "repairs that failed")
                .unwrap();
        let handed_off = IntCounter::new(
            "shardfarm_agent_handed_off_shards_total",
            "shards deleted after their new holder confirmed them",
        )
        .unwrap();
        let layout_version =
            IntGauge::new("shardfarm_agent_layout_version", "newest layout version received")
                .unwrap();
        let layouts_refused = IntCounterVec::new(
            Opts::new(
                "shardfarm_agent_layouts_refused_total",
                "layout publications refused (unsigned, wrong pool, bad signature, older, forked)",
            ),
            &["reason"],
        )
        .unwrap();
        let synced_version = IntGauge::new(
            "shardfarm_agent_synced_layout_version",
            "newest layout version fully repaired for",
        )
        .unwrap();
        let read_errors = IntCounter::new(
            "shardfarm_agent_read_errors_total",
            "shard reads that failed without proving corruption (retried, never quarantined)",
        )
        .unwrap();
        let tombstones =
            IntGauge::new("shardfarm_agent_tombstones", "uploader-signed deletions kept").unwrap();
        let bad_sources = IntCounterVec::new(
            Opts::new(
                "shardfarm_agent_repair_bad_sources_total",
                "peers' shards refused as repair sources, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let lost_segments = IntGauge::new(
            "shardfarm_agent_lost_segments",
            "segments of this node's slots with fewer than k verified shards in the pool",
        )
        .unwrap();
        let collected = IntCounterVec::new(
            Opts::new(
                "shardfarm_agent_collected_shards_total",
                "shards deleted by garbage collection or tombstones, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "shardfarm_agent_connections_closed_total",
                "connections closed by admission: to admit a caller when full (when_full), an owner root's excess (per_root), no request in time (no_request), before the handshake because their address was past its handshake rate under load (handshake_rate)",
            ),
            &["reason"],
        )
        .unwrap();
        let connections =
            IntGauge::new("shardfarm_agent_connections", "gRPC connections open").unwrap();
        let requests_paced = IntCounter::new(
            "shardfarm_agent_requests_paced_total",
            "requests of strangers beyond their owner root's rate; each left the root's connections unread until it was back within it",
        )
        .unwrap();
        let tombstones_refused = IntCounter::new(
            "shardfarm_agent_tombstones_refused_total",
            "tombstones refused: an owner root past its rate for objects this node holds nothing of",
        )
        .unwrap();
        for r in ["when_full", "per_root", "no_request", "handshake_rate"] {
            connections_closed.with_label_values(&[r]);
        }
        let refused = IntCounterVec::new(
            Opts::new(
                "shardfarm_agent_refused_total",
                "requests refused for a share or limit (resource_exhausted, unavailable), by \
                 method and caller (member: holds a layout slot; stranger)",
            ),
            &["method", "caller"],
        )
        .unwrap();
        for m in ["PutShard", "DeleteObject"] {
            for c in ["member", "stranger"] {
                refused.with_label_values(&[m, c]);
            }
        }
        let top_root_requests = IntGaugeVec::new(
            Opts::new(
                "shardfarm_agent_top_root_requests",
                "verified requests in the last minute of the owner roots that sent the most \
                 (root: short id; others: the rest)",
            ),
            &["root"],
        )
        .unwrap();
        let top_root_upload_bytes = IntGaugeVec::new(
            Opts::new(
                "shardfarm_agent_top_root_upload_bytes",
                "upload bytes in flight of the owner roots holding the most (root: short id; \
                 others: the rest)",
            ),
            &["root"],
        )
        .unwrap();
        top_root_requests.with_label_values(&["others"]);
        top_root_upload_bytes.with_label_values(&["others"]);
        for c in [
            Box::new(refused.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(top_root_requests.clone()),
            Box::new(top_root_upload_bytes.clone()),
            Box::new(connections_closed.clone()),
            Box::new(connections.clone()),
            Box::new(requests_paced.clone()),
            Box::new(tombstones_refused.clone()),
            Box::new(read_errors.clone()),
            Box::new(tombstones.clone()),
            Box::new(bad_sources.clone()),
            Box::new(lost_segments.clone()),
            Box::new(collected.clone()),
            Box::new(repair_backlog.clone()),
            Box::new(repaired.clone()),
            Box::new(repair_bytes.clone()),
            Box::new(repair_failures.clone()),
            Box::new(listing_failures.clone()),
            Box::new(partitions_compared.clone()),
            Box::new(repair_pass_seconds.clone()),
            Box::new(repair_passes_failed.clone()),
            Box::new(repair_proven_timestamp.clone()),
            Box::new(segments_being_written.clone()),
            Box::new(handed_off.clone()),
            Box::new(layout_version.clone()),
            Box::new(layouts_refused.clone()),
            Box::new(synced_version.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_seconds.clone()),
            Box::new(auth_failures.clone()),
            Box::new(uploads_refused.clone()),
            Box::new(uploads_in_flight.clone()),
            Box::new(bytes_in.clone()),
            Box::new(bytes_out.clone()),
            Box::new(shards.clone()),
            Box::new(stored_bytes.clone()),
            Box::new(capacity_bytes.clone()),
            Box::new(scrub_checked.clone()),
            Box::new(corrupt_shards.clone()),
            Box::new(audits.clone()),
            Box::new(identity_difficulty.clone()),
            Box::new(start_time.clone()),
            Box::new(capacity_proof.clone()),
            Box::new(build_info.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        // Known label values start at zero, so dashboards and alerts see 0 rather than no data.
        for m in ["copy", "rebuild"] {
            repaired.with_label_values(&[m]);
        }
        for r in ["forged_header", "corrupt", "wrong_segment"] {
            bad_sources.with_label_values(&[r]);
        }
        for r in ["tombstone", "unreadable_segment"] {
            collected.with_label_values(&[r]);
        }
        for f in ["get", "audit", "scrub"] {
            corrupt_shards.with_label_values(&[f]);
        }
        for r in ["answered", "corrupt", "missing"] {
            audits.with_label_values(&[r]);
        }
        for r in shardfarm_proto::LayoutRefusal::METRIC_LABELS {
            layouts_refused.with_label_values(&[r]);
        }
        for r in ["per_identity", "per_identity_bytes", "node_busy", "too_slow"] {
            uploads_refused.with_label_values(&[r]);
        }
        for r in shardfarm_core::auth::AuthError::METRIC_LABELS {
            auth_failures.with_label_values(&[r]);
        }
        Metrics {
            refused,
            top_root_requests,
            top_root_upload_bytes,
            spending: Mutex::default(),
            tombstones_refused,
            connections_closed,
            connections,
            requests_paced,
            read_errors,
            tombstones,
            bad_sources,
            lost_segments,
            collected,
            repair_backlog,
            repaired,
            repair_bytes,
            repair_failures,
            listing_failures,
            partitions_compared,
            repair_pass_seconds,
            repair_passes_failed,
            repair_proven_timestamp,
            segments_being_written,
            handed_off,
            layout_version,
            layouts_refused,
            synced_version,
            registry,
            requests,
            request_seconds,
            auth_failures,
            uploads_refused,
            uploads_in_flight,
            bytes_in,
            bytes_out,
            shards,
            stored_bytes,
            capacity_bytes,
            scrub_checked,
            corrupt_shards,
            audits,
            identity_difficulty,
            start_time,
            capacity_proof,
            build_info,
        }
    }

    /// Counts a verified request of owner root `root` for the "who is spending" gauges.
    pub fn note_root(&self, root: &[u8; 32]) {
        let mut m = self.spending.lock().unwrap();
        let key = if m.len() < COUNTED_ROOTS || m.contains_key(root) { *root } else { [0xff; 32] };
        *m.entry(key).or_default() += 1;
    }

    /// Publishes the requests counted since the last call and `uploads` (bytes in flight by
    /// owner root) as the top-roots gauges.
    pub fn publish_spending(&self, uploads: Vec<([u8; 32], u64)>) {
        let requests: Vec<([u8; 32], u64)> =
            std::mem::take(&mut *self.spending.lock().unwrap()).into_iter().collect();
        publish_top(&self.top_root_requests, requests);
        publish_top(&self.top_root_upload_bytes, uploads);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// Sets `gauge` to the [`TOP_ROOTS`] largest of `by_root` by short root id, and the rest
/// (and roots past the counted ones, keyed all-ones) summed as `others`.
fn publish_top(gauge: &IntGaugeVec, mut by_root: Vec<([u8; 32], u64)>) {
    by_root.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    gauge.reset();
    let mut others = 0u64;
    let mut shown = 0;
    for (root, n) in by_root {
        if shown < TOP_ROOTS && root != [0xff; 32] && n > 0 {
            gauge.with_label_values(&[&hex::encode(&root[..6])]).set(n as i64);
            shown += 1;
        } else {
            others = others.saturating_add(n);
        }
    }
    gauge.with_label_values(&["others"]).set(others as i64);
}

/// Copies what connection admission did into `m` every 2 s until `stop`.
pub async fn follow_connections(
    m: std::sync::Arc<Metrics>,
    conns: shardfarm_proto::conns::Connections,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut seen = shardfarm_proto::conns::Evictions::default();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
        let now = conns.evictions();
        let c = &m.connections_closed;
        c.with_label_values(&["when_full"]).inc_by(now.when_full - seen.when_full);
        c.with_label_values(&["per_root"]).inc_by(now.per_root - seen.per_root);
        c.with_label_values(&["no_request"]).inc_by(now.no_request - seen.no_request);
        c.with_label_values(&["handshake_rate"])
            .inc_by(now.handshakes_refused - seen.handshakes_refused);
        m.requests_paced.inc_by(now.paced - seen.paced);
        m.connections.set(conns.open_count() as i64);
        seen = now;
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
