//! The farm's economics, as pure arithmetic: uptime, audit reputation, node standing and the
//! per-epoch rewards (DESIGN.md, "Proof of capacity, audits, reputation, rewards").
//!
//! Nothing here does I/O or reads a clock: callers pass times in, so every formula is checked
//! exactly on hand-computed cases in the tests below.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

// ---- Public interface ----

/// Milliseconds in a day (uptime is kept per UTC day).
pub const DAY_MS: u64 = 86_400_000;
/// Days in the uptime window.
pub const UPTIME_DAYS: u64 = 7;

/// Reputation thresholds and the audit score's forgetting factor (from the pool's config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReputationConfig {
    /// Forgetting factor λ of the beta audit score (Storj uses 0.95): an audit `t` rounds ago
    /// weighs λ^t.
    pub lambda: f64,
    /// Weight w of one audit.
    pub weight: f64,
    /// Below this audit score a node is suspended: it keeps its slots but gets no new ones.
    pub suspend_below: f64,
    /// Below this audit score a node is disqualified for good and its data repaired away.
    pub disqualify_below: f64,
    /// Below this 7-day uptime a node is suspended.
    pub min_uptime: f64,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        // With λ = 0.95 and a new node's α = 20 (see `AuditScore`), failures in a row score
        // 0.95, 0.90, 0.86, 0.81, 0.77 (suspended), …, 0.60 (the tenth: disqualified).
        ReputationConfig {
            lambda: 0.95,
            weight: 1.0,
            suspend_below: 0.8,
            disqualify_below: 0.6,
            min_uptime: 0.5,
        }
    }
}

/// Beta reputation of audits with forgetting: after each audit `α ← λα + w·pass`,
/// `β ← λβ + w·(1 − pass)`; the score is `α / (α + β)`.
///
/// A new node starts at `α = w / (1 − λ)`, `β = 0`: the fixed point of a long clean record.
/// Starting at α = 1 instead would disqualify a new node on its first failed audit (score
/// 0.49); with the fixed point, a node that lost its data is suspended after 5 failures in a
/// row and disqualified after 10, while an occasional failure is forgiven.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditScore {
    /// Evidence of passing.
    pub alpha: f64,
    /// Evidence of failing.
    pub beta: f64,
}

impl AuditScore {
    /// The score of a new node.
    pub fn new(cfg: &ReputationConfig) -> Self {
        AuditScore { alpha: cfg.weight / (1.0 - cfg.lambda).max(1e-9), beta: 0.0 }
    }

    /// Records one audit.
    pub fn record(&mut self, passed: bool, cfg: &ReputationConfig) {
        let v = if passed { 1.0 } else { 0.0 };
        self.alpha = cfg.lambda * self.alpha + cfg.weight * v;
        self.beta = cfg.lambda * self.beta + cfg.weight * (1.0 - v);
    }

    /// `α / (α + β)`.
    pub fn score(&self) -> f64 {
        self.alpha / (self.alpha + self.beta)
    }
}

/// One UTC day of observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Day {
    /// Days since the Unix epoch.
    pub day: u64,
    /// Time observed up, ms.
    pub up_ms: u64,
    /// Time observed at all, ms.
    pub observed_ms: u64,
}

/// Uptime as the floating average of daily uptime over the past 7 days (Bitcloud's law): the
/// mean, over the days of the window that were observed, of up time / observed time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uptime {
    /// Observed days, oldest first, at most [`UPTIME_DAYS`].
    pub days: VecDeque<Day>,
}

impl Uptime {
    /// Records the interval `[from_ms, to_ms)` as up or down, split at day boundaries.
    pub fn record(&mut self, from_ms: u64, to_ms: u64, up: bool) {
        let mut t = from_ms;
        while t < to_ms {
            let day = t / DAY_MS;
            let end = to_ms.min((day + 1) * DAY_MS);
            let d = match self.days.back_mut() {
                Some(d) if d.day == day => d,
                _ => {
                    self.days.push_back(Day { day, up_ms: 0, observed_ms: 0 });
                    self.days.back_mut().expect("just pushed")
                }
            };
            d.observed_ms += end - t;
            if up {
                d.up_ms += end - t;
            }
            t = end;
        }
        while let Some(first) = self.days.front() {
            if first.day + UPTIME_DAYS <= to_ms / DAY_MS {
                self.days.pop_front();
            } else {
                break;
            }
        }
    }

    /// The floating average over the window ending on the day of `now_ms` (1.0 with no data).
    pub fn ratio(&self, now_ms: u64) -> f64 {
        let today = now_ms / DAY_MS;
        let days: Vec<f64> = self
            .days
            .iter()
            .filter(|d| d.day + UPTIME_DAYS > today && d.observed_ms > 0)
            .map(|d| d.up_ms as f64 / d.observed_ms as f64)
            .collect();
        if days.is_empty() { 1.0 } else { days.iter().sum::<f64>() / days.len() as f64 }
    }
}

/// A node's standing in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// Takes and keeps data.
    Active,
    /// Keeps its slots, gets no new ones.
    Suspended,
    /// Out for good; its slots are re-placed and rebuilt elsewhere.
    Disqualified,
}

impl Standing {
    /// The lowercase name (metrics label, CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Active => "active",
            Standing::Suspended => "suspended",
            Standing::Disqualified => "disqualified",
        }
    }
}

/// The standing that the audit score and uptime give. Disqualification is final.
pub fn judge(prev: Standing, audit: &AuditScore, uptime: f64, cfg: &ReputationConfig) -> Standing {
    let score = audit.score();
    if prev == Standing::Disqualified || score < cfg.disqualify_below {
        Standing::Disqualified
    } else if score < cfg.suspend_below || uptime < cfg.min_uptime {
        Standing::Suspended
    } else {
        Standing::Active
    }
}

/// Rewards of an epoch (from the pool's config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RewardConfig {
    /// Epoch length, seconds (default one day).
    pub epoch_seconds: u64,
    /// SP: the pool's reward per epoch, in the smallest unit.
    pub pool_reward: u64,
    /// PMA: the share of SP paid for capacity (RW1).
    pub pma: f64,
    /// PMB: the share of SP paid for storage proven by audits (RW2).
    pub pmb: f64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig { epoch_seconds: 86_400, pool_reward: 1_000_000, pma: 0.3, pmb: 0.7 }
    }
}

/// What one node brings to an epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochInput {
    /// Hex node id.
    pub node: String,
    /// Its farm (the MiningFarm or local farm it belongs to).
    pub farm: String,
    /// Its capacity figure C (negative counts as 0).
    pub capacity: f64,
    /// Bytes it stores.
    pub stored_bytes: u64,
    /// Audits it passed this epoch.
    pub audits_passed: u64,
    /// Audits it was asked this epoch.
    pub audits_total: u64,
    /// Its standing at the end of the epoch.
    pub standing: Standing,
}

/// One node's reward for one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    /// Hex node id.
    pub node: String,
    /// Its farm.
    pub farm: String,
    /// RW1, the capacity share: `⌊SP·PMA · C_i / ΣC⌋`.
    pub rw1: u64,
    /// RW2, the storage share: `⌊SP·PMB · stored_i / Σstored⌋`.
    pub rw2: u64,
    /// C_i used.
    pub capacity: f64,
    /// stored_i used: bytes stored × the fraction of this epoch's audits passed.
    pub proven_bytes: u64,
}

/// RW1 and RW2 of every node for one epoch.
///
/// Disqualified nodes earn nothing and do not count in the sums. Storage counts only as far as
/// audits proved it: `stored_i = stored bytes × passed / asked` this epoch, and 0 for a node
/// that was not audited (nothing proven). Amounts are rounded down, so the pool never pays more
/// than SP·(PMA + PMB); the remainder stays with the pool.
pub fn epoch_rewards(cfg: &RewardConfig, inputs: &[EpochInput]) -> Vec<Reward> {
    let counted = |x: &EpochInput| x.standing != Standing::Disqualified;
    let cap = |x: &EpochInput| if counted(x) { x.capacity.max(0.0) } else { 0.0 };
    let proven = |x: &EpochInput| -> u64 {
        if !counted(x) || x.audits_total == 0 {
            return 0;
        }
        (u128::from(x.stored_bytes) * u128::from(x.audits_passed) / u128::from(x.audits_total))
            as u64
    };
    let sum_c: f64 = inputs.iter().map(cap).sum();
    let sum_s: u128 = inputs.iter().map(|x| u128::from(proven(x))).sum();
    let rw1_pot = cfg.pool_reward as f64 * cfg.pma;
    let rw2_pot = cfg.pool_reward as f64 * cfg.pmb;
    inputs
        .iter()
        .map(|x| {
            let c = cap(x);
            let s = proven(x);
            Reward {
                node: x.node.clone(),
                farm: x.farm.clone(),
                rw1: if sum_c > 0.0 { (rw1_pot * c / sum_c).floor() as u64 } else { 0 },
                rw2: if sum_s > 0 { (rw2_pot * s as f64 / sum_s as f64).floor() as u64 } else { 0 },
                capacity: c,
                proven_bytes: s,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_score_follows_the_beta_update_exactly() {
        let cfg = ReputationConfig::default();
        let mut s = AuditScore::new(&cfg);
        // α0 = 1 / (1 − 0.95) = 20, a fixed point of passing: 0.95·20 + 1 = 20.
        assert!((s.alpha - 20.0).abs() < 1e-9 && s.beta == 0.0);
        s.record(true, &cfg);
        assert!((s.alpha - 20.0).abs() < 1e-9 && s.score() == 1.0);
        s.record(false, &cfg);
        // α = 0.95·20 = 19, β = 1: score 19/20.
        assert!((s.alpha - 19.0).abs() < 1e-9 && (s.beta - 1.0).abs() < 1e-12);
        assert!((s.score() - 0.95).abs() < 1e-9);
        // From α = 1, β = 0: pass → (1.95, 0); fail → (1.8525, 1).
        let mut t = AuditScore { alpha: 1.0, beta: 0.0 };
        t.record(true, &cfg);
        assert_eq!((t.alpha, t.beta), (1.95, 0.0));
        t.record(false, &cfg);
        assert!((t.alpha - 1.8525).abs() < 1e-12 && (t.beta - 1.0).abs() < 1e-12);
        assert!((t.score() - 1.8525 / 2.8525).abs() < 1e-12);
    }

    #[test]
    fn a_node_that_lost_its_data_is_suspended_then_disqualified() {
        let cfg = ReputationConfig::default();
        let mut s = AuditScore::new(&cfg);
        let mut standings = Vec::new();
        let mut st = Standing::Active;
        for _ in 0..11 {
            s.record(false, &cfg);
            st = judge(st, &s, 1.0, &cfg);
            standings.push(st);
        }
        use Standing::*;
        // Scores: 0.950 0.903 0.857 0.815 0.774 0.735 0.698 0.663 0.630 0.599 0.569.
        assert_eq!(
            standings,
            [
                Active,
                Active,
                Active,
                Active,
                Suspended,
                Suspended,
                Suspended,
                Suspended,
                Suspended,
                Disqualified,
                Disqualified
            ]
        );
        // Disqualification is final, whatever follows.
        for _ in 0..50 {
            s.record(true, &cfg);
        }
        assert_eq!(judge(st, &s, 1.0, &cfg), Disqualified);
    }

    #[test]
    fn low_uptime_suspends() {
        let cfg = ReputationConfig::default();
        let s = AuditScore::new(&cfg);
        assert_eq!(judge(Standing::Active, &s, 0.49, &cfg), Standing::Suspended);
        assert_eq!(judge(Standing::Suspended, &s, 0.5, &cfg), Standing::Active);
    }

    #[test]
    fn uptime_is_the_mean_of_daily_ratios_over_seven_days() {
        let mut u = Uptime::default();
        let h = 3_600_000;
        // Day 10: up 18 h, down 6 h → 0.75. Day 11: up 12 h of 12 h observed → 1.0.
        u.record(10 * DAY_MS, 10 * DAY_MS + 18 * h, true);
        u.record(10 * DAY_MS + 18 * h, 11 * DAY_MS, false);
        u.record(11 * DAY_MS, 11 * DAY_MS + 12 * h, true);
        assert_eq!(u.ratio(11 * DAY_MS + 12 * h), (0.75 + 1.0) / 2.0);
        // An interval across midnight is split: 23:00–01:00 down counts 1 h on each day.
        let mut v = Uptime::default();
        v.record(5 * DAY_MS, 5 * DAY_MS + 23 * h, true);
        v.record(5 * DAY_MS + 23 * h, 6 * DAY_MS + h, false);
        assert_eq!(v.days[0], Day { day: 5, up_ms: 23 * h, observed_ms: 24 * h });
        assert_eq!(v.days[1], Day { day: 6, up_ms: 0, observed_ms: h });
        assert_eq!(v.ratio(6 * DAY_MS + h), (23.0 / 24.0 + 0.0) / 2.0);
        // Days older than the window are forgotten: on day 17, day 10 is out, day 11 is in.
        u.record(17 * DAY_MS, 17 * DAY_MS + h, true);
        assert_eq!(u.days.len(), 2);
        assert_eq!(u.ratio(17 * DAY_MS + h), 1.0);
        assert_eq!(Uptime::default().ratio(0), 1.0);
    }

    fn input(node: &str, farm: &str, c: f64, stored: u64, passed: u64, total: u64) -> EpochInput {
        EpochInput {
            node: node.into(),
            farm: farm.into(),
            capacity: c,
            stored_bytes: stored,
            audits_passed: passed,
            audits_total: total,
            standing: Standing::Active,
        }
    }

    #[test]
    fn rewards_follow_rw1_and_rw2_exactly() {
        // SP = 1 000 000, PMA = 0.3, PMB = 0.7.
        let cfg = RewardConfig::default();
        let mut inputs = vec![
            input("a", "f1", 100.0, 1000, 4, 4),
            input("b", "f1", 300.0, 3000, 2, 4),
            input("c", "f2", 600.0, 500, 0, 0),
            input("d", "f2", 50.0, 9999, 4, 4),
        ];
        inputs[3].standing = Standing::Disqualified;
        let r = epoch_rewards(&cfg, &inputs);
        // ΣC = 100 + 300 + 600 = 1000 (d is disqualified): RW1 = 300 000 · C/1000.
        assert_eq!(r.iter().map(|x| x.rw1).collect::<Vec<_>>(), [30_000, 90_000, 180_000, 0]);
        // Proven: a 1000·4/4 = 1000, b 3000·2/4 = 1500, c not audited 0, d 0. Σ = 2500.
        // RW2 = 700 000 · s/2500 → 280 000, 420 000, 0, 0.
        assert_eq!(r.iter().map(|x| x.proven_bytes).collect::<Vec<_>>(), [1000, 1500, 0, 0]);
        assert_eq!(r.iter().map(|x| x.rw2).collect::<Vec<_>>(), [280_000, 420_000, 0, 0]);
        // Rounding down: three equal nodes share 300 000 as 100 000 each; 1 000 001 as 333 333.
        let three: Vec<_> = ["x", "y", "z"].iter().map(|n| input(n, "f", 1.0, 1, 1, 1)).collect();
        let r = epoch_rewards(&RewardConfig { pool_reward: 1_000_001, ..cfg.clone() }, &three);
        assert!(r.iter().all(|x| x.rw1 == 100_000 && x.rw2 == 233_333), "{r:?}");
        // Negative capacity (more taken than reported) counts as 0; nothing to share → 0.
        let r = epoch_rewards(&cfg, &[input("n", "f", -5.0, 0, 0, 0)]);
        assert_eq!((r[0].rw1, r[0].rw2), (0, 0));
    }
}
