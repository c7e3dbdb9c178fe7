//! Carries out what the policy decides on a request: every verdict is counted and
//! becomes an event; blocks (and throttles) become kernel state within milliseconds,
//! longer for repeat offenders.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Instant, SystemTime},
};

use ipnet::IpNet;
use tracing::{info, warn};

use crate::{
    clock::Clocks,
    detect::{Finding, Report, State},
    enforce::{Enforcer, PolicyEnforcement, escalation::Escalation},
    events::{Bus, Endpoint, Event, Rule, Subject},
    http::{Exchange, Problem, RequestStart},
    maps::ListKind,
    metrics::Metrics,
    policy::{Decision, Policy, Request, file::ActionKind},
    secrets::Fingerprinter,
};

/// The active policy, swapped whole on reload.
pub type ActivePolicy = Arc<RwLock<Arc<Policy>>>;

/// Reads the active policy (a poisoned lock still holds a whole policy).
pub fn current(policy: &ActivePolicy) -> Arc<Policy> {
    policy
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Offenders remembered at most, for their recent enforcement or their report window
/// (past that, recent enforcements out of their grace go, and the least recently
/// reported).
const MAX_OFFENDERS: usize = 100_000;
/// How long after an enforcement its offender's requests are taken for ones already in
/// flight, without asking the lists (the map update is done well within it).
const IN_FLIGHT_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What an event is reported once per window for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Reported {
    /// A policy rule, by its index.
    Rule(usize),
    Detection(&'static str),
}

pub struct Verdicts {
    pub policy: ActivePolicy,
    pub enforcer: Arc<Mutex<Enforcer>>,
    pub metrics: Arc<Metrics>,
    pub events: Bus,
    pub secrets: Fingerprinter,
    escalation: Escalation,
    /// The policy in force: verdicts are made by it, the escalation settings came
    /// from it.
    tuned_for: Arc<Policy>,
    /// When the policy last blocked or throttled each network: for `IN_FLIGHT_GRACE`
    /// its requests already in flight do not count as new offences. Past it the lists,
    /// which know of expiries, operators' removals and failed updates, decide.
    recent: HashMap<(IpNet, ListKind), Instant>,
    /// When each (rule index, offender) over a limit was last reported, and how many of
    /// its verdicts went unreported since. Cleared on reload (indexes change).
    reported: lru::LruCache<(Reported, IpNet), (Instant, u64)>,
    /// Decision counters by rule index, then label: no label lookup per verdict.
    counters: Vec<Vec<(&'static str, prometheus::IntCounter)>>,
    /// Behaviour windows and scan cache, kept across reloads.
    detection_state: State,
    detection_counters: HashMap<&'static str, prometheus::IntCounter>,
}

impl Verdicts {
    pub fn new(
        policy: ActivePolicy,
        enforcer: Arc<Mutex<Enforcer>>,
        metrics: Arc<Metrics>,
        events: Bus,
        secrets: Fingerprinter,
    ) -> Self {
        let tuned_for = current(&policy);
        let e = &tuned_for.doc.escalation;
        let escalation = Escalation::new(e.factor, e.max_ttl.0, e.memory.0);
        Self {
            tuned_for,
            policy,
            enforcer,
            metrics,
            events,
            secrets,
            escalation,
            recent: HashMap::new(),
            reported: lru::LruCache::new(
                std::num::NonZeroUsize::new(MAX_OFFENDERS).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
            counters: Vec::new(),
            detection_state: State::default(),
            detection_counters: HashMap::new(),
        }
    }

    /// Takes up the active policy, with the settings taken from it. Called once per
    /// batch of events: a reload applies from the next batch, and no event pays for
    /// the lock.
    pub fn refresh(&mut self) {
        let policy = current(&self.policy);
        if !Arc::ptr_eq(&policy, &self.tuned_for) {
            // Reloaded: new escalation settings; what offenders did is kept.
            let e = &policy.doc.escalation;
            self.escalation.retune(e.factor, e.max_ttl.0, e.memory.0);
            self.tuned_for = policy;
            self.reported.clear();
            self.counters.clear();
        }
    }

    /// The policy in force (as of the last `refresh`).
    fn policy(&self) -> Arc<Policy> {
        self.tuned_for.clone()
    }

    /// Judges one request as soon as its head is in.
    pub fn judge(&mut self, request: &RequestStart<'_>, clocks: &Clocks) {
        let policy = self.policy();
        let source = request.client.ip().to_canonical();
        let decisions = policy.evaluate(&Request {
            source,
            head: request.head,
            route: request.route,
        });
        let at = clocks.to_wall(request.started_ns);
        let subject = Subject::from(request);
        for decision in &decisions {
            self.count(decision);
            let kind = match decision.action {
                ActionKind::Log | ActionKind::Allow => "event",
                _ => "alert",
            };
            let action = if decision.rate_limited() {
                "rate_limited"
            } else {
                "rule_match"
            };
            // An offender over a limit sends many requests: reported once per window.
            self.carry_out(
                &policy,
                source,
                decision,
                (Reported::Rule(decision.rule_index), decision.window),
                |this| Event::about_request(kind, action, &subject, at, &this.secrets),
            );
        }
    }

    /// Carries out one verdict on `source`: blocks or throttles it in the kernel (not
    /// in dry run), then publishes its event, built by `event`. Without an enforcement,
    /// a verdict with a report window is published at most once per window and
    /// offender, with the count of those not reported.
    fn carry_out(
        &mut self,
        policy: &Policy,
        source: IpAddr,
        decision: &Decision,
        (reported, window): (Reported, Option<std::time::Duration>),
        event: impl FnOnce(&Self) -> Event,
    ) {
        // A throttle always has a rate: policies without one are refused at load.
        let enforcement = match (decision.action, decision.throttle_pps) {
            _ if decision.dry_run => None,
            (ActionKind::Block, _) => Some(PolicyEnforcement::Block),
            (ActionKind::Throttle, Some(pps)) => Some(PolicyEnforcement::Throttle(pps)),
            _ => None,
        };
        // The network a verdict on `source` covers (IPv6 by the policy's prefix).
        let net = policy.offender_net(source);
        let enforced = enforcement.and_then(|what| self.enforce(net, decision, what));
        let unreported = match (enforced.is_some(), window) {
            (false, Some(window)) => match self.report_due((reported, net), window) {
                Some(unreported) => unreported,
                None => return,
            },
            _ => 0,
        };
        let mut event = event(self);
        event.event.severity = decision.severity;
        event.event.outcome = Some(
            if decision.dry_run {
                "unknown"
            } else {
                "success"
            }
            .into(),
        );
        event.rule = Some(Rule {
            id: decision.rule_id.to_owned(),
            name: decision.rule_name.to_owned(),
            category: decision.category.map(str::to_owned),
        });
        let mut event = event
            .with_field("action", decision.label())
            .with_field("dry_run", decision.dry_run);
        for (name, value) in enforced.into_iter().flatten() {
            event = event.with_field(name, value);
        }
        if unreported > 0 {
            event = event.with_field("unreported", unreported);
        }
        self.events.publish(event);
    }

    /// Counts a verdict in `apimon_policy_decisions_total`.
    fn count(&mut self, decision: &Decision) {
        if self.counters.len() <= decision.rule_index {
            self.counters.resize_with(decision.rule_index + 1, Vec::new);
        }
        let label = decision.label();
        let by_label = &mut self.counters[decision.rule_index];
        match by_label.iter().find(|(l, _)| *l == label) {
            Some((_, counter)) => counter.inc(),
            None => {
                let counter = self.metrics.decision_counter(decision.rule_id, label);
                counter.inc();
                by_label.push((label, counter));
            }
        }
    }

    /// Whether an over-limit verdict for `key` is due as an event (Some: with how many
    /// went unreported since the last), or falls within `window` of the last one.
    fn report_due(&mut self, key: (Reported, IpNet), window: std::time::Duration) -> Option<u64> {
        let now = Instant::now();
        match self.reported.get_mut(&key) {
            Some((last, unreported)) if now.duration_since(*last) < window => {
                *unreported += 1;
                None
            }
            Some(entry) => {
                let unreported = entry.1;
                *entry = (now, 0);
                Some(unreported)
            }
            None => {
                self.reported.put(key, (now, 0));
                Some(0)
            }
        }
    }

    /// Runs the policy's detections on a finished exchange.
    pub fn inspect(&mut self, exchange: &Exchange, clocks: &Clocks) {
        let policy = self.policy();
        // Tokens are judged at the time of the request, not of its inspection.
        let at = clocks.to_wall(exchange.started_ns);
        let report = policy
            .detections
            .inspect(exchange, &mut self.detection_state, at);
        if report.findings.is_empty() {
            return;
        }
        self.act_on(&policy, &report, exchange.client, &|secrets| {
            Event::about_exchange("alert", "detection", exchange, at, secrets)
        });
    }

    /// Runs detections on bytes a client sent that could not be parsed.
    pub fn inspect_problem(&mut self, problem: &Problem) {
        let policy = self.policy();
        let report = policy.detections.inspect_problem(problem);
        self.act_on(&policy, &report, problem.client, &|_| {
            let mut event = Event::new("alert", "web", "detection");
            event.source = Some(Endpoint::from(problem.client));
            event.destination = Some(Endpoint::from(problem.server));
            event
        });
    }

    /// Counts what detections found about `client`, and carries out each finding as a
    /// verdict (its rule's action, `log` without one), one event per rule and
    /// offender per report window.
    fn act_on(
        &mut self,
        policy: &Policy,
        report: &Report,
        client: std::net::SocketAddr,
        base_event: &dyn Fn(&crate::secrets::Fingerprinter) -> Event,
    ) {
        let source = client.ip().to_canonical();
        let window = policy.detections.doc.report_window.0;
        for finding in &report.findings {
            let rule = finding.rule;
            let metrics = &self.metrics;
            self.detection_counters
                .entry(rule.id)
                .or_insert_with(|| metrics.detection_counter(rule.category.id(), rule.id))
                .inc();
            let decision = detection_decision(policy, finding);
            self.carry_out(
                policy,
                source,
                &decision,
                (Reported::Detection(rule.id), Some(window)),
                |this| {
                    let evidence = if finding.secret && !finding.evidence.is_empty() {
                        this.secrets.fingerprint(finding.evidence.as_bytes())
                    } else {
                        finding.evidence.clone()
                    };
                    let mut event = base_event(&this.secrets).with_field(
                        "detection",
                        serde_json::json!({
                            "class": rule.class.name(),
                            "category_name": rule.category.title(),
                            "severity": rule.severity.name(),
                            "location": finding.location,
                            "evidence": evidence,
                            "anomaly_score": report.score,
                        }),
                    );
                    event.event.category = vec!["intrusion_detection".into(), "web".into()];
                    event
                },
            );
        }
    }

    /// Blocks or throttles the offender's network in the kernel, for an escalating TTL;
    /// returns what the verdict's event tells of it, or None when it already was (the
    /// request was in flight before).
    fn enforce(
        &mut self,
        net: IpNet,
        decision: &Decision,
        enforcement: PolicyEnforcement,
    ) -> Option<Vec<(&'static str, serde_json::Value)>> {
        let kind = enforcement.list();
        let now = Instant::now();
        let key = (net, kind);
        let in_flight = self
            .recent
            .get(&key)
            .is_some_and(|since| now.duration_since(*since) < IN_FLIGHT_GRACE);
        if in_flight
            || self
                .enforcer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .holds(kind, &net, SystemTime::now())
        {
            return None;
        }
        let (ttl, offence) = self.escalation.offend(net, decision.ttl, now);
        if self.recent.len() >= MAX_OFFENDERS {
            self.recent
                .retain(|_, since| now.duration_since(*since) < IN_FLIGHT_GRACE);
        }
        self.recent.insert(key, now);
        let origin = format!("policy:{}", decision.rule_id);
        let reason = if decision.rule_name.is_empty() {
            decision.rule_id.to_owned()
        } else {
            decision.rule_name.to_owned()
        };
        // The map update and the state file (an fsync) run off the capture task, which
        // keeps reading samples meanwhile.
        let enforcer = self.enforcer.clone();
        let events = self.events.clone();
        tokio::task::spawn_blocking(move || {
            let added = {
                let mut enforcer = enforcer
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                enforcer.enforce_for_policy(enforcement, &[net], ttl, &reason, &origin)
            };
            match added {
                Ok(entries) => {
                    let action = format!("{}_added", kind.noun());
                    for entry in entries {
                        info!(event.action = %action, cidr = %entry.cidr, %origin, ttl_s = ttl.as_secs(), offence, "Policy enforced");
                        events.publish(Event::list_change(&action, &entry));
                    }
                }
                Err(error) => {
                    warn!(cidr = %net, %error, list = kind.name(), "Policy enforcement failed");
                    events.publish(
                        Event::new("event", "configuration", &format!("{}_failed", kind.noun()))
                            .with_field("cidr", net.to_string())
                            .with_field("origin", origin)
                            .with_message(error.to_string()),
                    );
                }
            }
        });
        let fields = vec![
            ("cidr", net.to_string().into()),
            ("ttl_s", ttl.as_secs().into()),
            ("offence", offence.into()),
        ];
        Some(fields)
    }
}

/// A detection's finding as a verdict: its action (`log` without one), the TTL and
/// rate its rule sets or the policy's, dry run when the finding or the policy is.
fn detection_decision<'p>(policy: &'p Policy, finding: &Finding) -> Decision<'p> {
    let action = finding.action.unwrap_or(ActionKind::Log);
    let settings = policy.detections.settings(finding.rule.id);
    Decision {
        rule_index: usize::MAX,
        rule_id: finding.rule.id,
        rule_name: finding.rule.name,
        action,
        window: None,
        // `run --dry-run` and a policy-wide dry run cover detections too.
        dry_run: finding.dry_run || policy.doc.dry_run,
        ttl: settings
            .and_then(|s| s.ttl.as_ref())
            .map_or_else(|| policy.default_ttl(action), |ttl| ttl.0),
        throttle_pps: settings.and_then(|s| s.throttle_pps),
        severity: Some(finding.rule.severity.score() as u8),
        category: Some(finding.rule.category.id()),
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroU32, path::Path, time::Duration};

    use super::*;
    use crate::{
        detect::catalog,
        policy::{Source, file::PolicyDoc},
    };

    fn policy(text: &str) -> Policy {
        let doc = PolicyDoc::parse(text, Path::new("p.toml")).unwrap_or_else(|e| panic!("{e}"));
        Policy::new(doc, Source::File("p.toml".into()), None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn finding(id: &str, action: Option<ActionKind>, dry_run: bool) -> Finding {
        Finding {
            rule: catalog::find(id).unwrap(),
            location: "query:q".into(),
            evidence: String::new(),
            secret: false,
            dry_run,
            action,
        }
    }

    #[test]
    fn a_detection_verdict_takes_its_ttl_and_rate_from_the_policy() {
        let p = policy(
            "block_ttl = \"5m\"\nthrottle_ttl = \"2m\"\n\
             [detections.rules.sqli]\naction = \"block\"\nttl = \"1h\"\n\
             [detections.rules.xss]\naction = \"throttle\"\nthrottle_pps = 10\n",
        );
        let own = detection_decision(&p, &finding("sqli", Some(ActionKind::Block), false));
        assert_eq!(
            (own.action, own.ttl),
            (ActionKind::Block, Duration::from_secs(3600))
        );
        assert_eq!((own.rule_id, own.category), ("sqli", Some("API8:2023")));
        assert!(!own.dry_run);
        let defaults = detection_decision(
            &p,
            &finding("ssrf-internal-address", Some(ActionKind::Block), false),
        );
        assert_eq!(
            defaults.ttl,
            Duration::from_secs(300),
            "the policy's block_ttl"
        );
        let throttle = detection_decision(&p, &finding("xss", Some(ActionKind::Throttle), false));
        assert_eq!(
            (throttle.ttl, throttle.throttle_pps.map(NonZeroU32::get)),
            (Duration::from_secs(120), Some(10))
        );
        let reported = detection_decision(&p, &finding("sqli", None, true));
        assert_eq!((reported.action, reported.dry_run), (ActionKind::Log, true));
        let dry = policy("dry_run = true\n");
        assert!(detection_decision(&dry, &finding("sqli", Some(ActionKind::Block), false)).dry_run);
    }
}
