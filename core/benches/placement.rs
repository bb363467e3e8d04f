//! Placement engine figures: time to compute a layout, its balance, and the slots moved by
//! adding or removing one node against the minimum. Prints figures, asserts nothing.
//! `cargo bench -p shardfarm-core --bench placement` (add `-- quick` for the small cases only).

use std::time::Instant;

use shardfarm_core::identity::{NodeId, blake2b256};
use shardfarm_core::placement::{Node, Options, Profile, compute};

fn node(i: usize, zones: usize, uneven: bool) -> Node {
    let id = NodeId(blake2b256(&[b"bench", &(i as u64).to_le_bytes()]));
    // Uneven: capacities from 1 to 16 TiB in a fixed pattern.
    let tib = if uneven { 1 + (i * 7) % 16 } else { 4 };
    Node {
        id,
        root: id,
        domain: format!("zone-{}", i % zones),
        capacity: (tib as u64) << 40,
        draining: false,
        frozen: false,
    }
}

fn case(nodes: usize, zones: usize, k: u16, m: u16, partitions: u32, uneven: bool) {
    let profile = Profile { k, m, partitions, domain_kind: "zone".into() };
    let all: Vec<Node> = (0..=nodes).map(|i| node(i, zones, uneven)).collect();
    let o = Options::default();
    let t = Instant::now();
    let first = compute(&all[..nodes], &profile, None, &o).expect("feasible");
    let fresh = t.elapsed();
    let t = Instant::now();
    let added = compute(&all, &profile, Some(&first.layout), &o).expect("feasible");
    let add = t.elapsed();
    let without: Vec<Node> = all[1..nodes].to_vec();
    let t = Instant::now();
    let removed = compute(&without, &profile, Some(&first.layout), &o).expect("feasible");
    let remove = t.elapsed();
    println!(
        "{nodes:>6} nodes {zones:>3} zones RS({k},{m}) P={partitions:<6} {}: fresh {:>8.1} ms \
         balance {:.3} | +1 node {:>8.1} ms moved {} (min {}) balance {:.3} | −1 node {:>8.1} ms \
         moved {} (min {})",
        if uneven { "uneven" } else { "equal " },
        fresh.as_secs_f64() * 1e3,
        first.quality.balance,
        add.as_secs_f64() * 1e3,
        added.quality.moved,
        added.quality.min_moves,
        added.quality.balance,
        remove.as_secs_f64() * 1e3,
        removed.quality.moved,
        removed.quality.min_moves,
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    case(9, 3, 4, 2, 256, false);
    case(256, 8, 4, 2, 256, false);
    case(256, 16, 10, 4, 256, true);
    case(1000, 20, 10, 4, 4096, false);
    case(1000, 20, 16, 8, 4096, true);
    if !quick {
        case(4000, 40, 29, 51, 4096, true);
        case(10_000, 50, 10, 4, 65_536, false);
    }
}
