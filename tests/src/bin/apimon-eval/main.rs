//! `cargo xtask eval`: replays the labelled corpus in `tests/corpus` through the
//! daemon's own code path and reports detection and false-positive rates per class.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use apimon_tests::corpus::{
    self, DETECTION_TARGET, Evaluation, FALSE_POSITIVE_TARGET, TARGET_CLASSES, percent_of,
};
use monitor::policy::Policy;

fn main() -> Result<()> {
    let mut out: Option<PathBuf> = None;
    let mut dir = corpus::default_dir();
    let mut verbose = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = args.next().map(PathBuf::from),
            "--corpus" => dir = args.next().map(PathBuf::from).context("--corpus DIR")?,
            "--verbose" => verbose = true,
            other => {
                bail!("unknown argument {other:?} (expected --out FILE, --corpus DIR, --verbose)")
            }
        }
    }
    let policy = Policy::builtin();
    let threshold = policy.detections.doc.anomaly_threshold;
    let cases = corpus::corpus(&dir)?;
    let started = Instant::now();
    let reports = corpus::replay(&cases, &policy)?;
    let elapsed = started.elapsed();
    let eval = Evaluation::new(&cases, &reports, threshold);
    let benign = &eval.benign;
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| class | attack requests | detected | detection rate | over anomaly threshold | benign requests flagged by the class | false-positive rate | target |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|---|---|");
    for (class, tally) in &eval.attacks {
        let fp = eval.benign_by_class.get(class).copied().unwrap_or(0);
        let rate = eval.detection_rate(*class);
        let fp_rate = eval.false_positive_rate(*class);
        let target = if TARGET_CLASSES.contains(class) {
            let met = rate >= DETECTION_TARGET && fp_rate <= FALSE_POSITIVE_TARGET;
            format!(
                "≥ 95 %, ≤ 0.5 %: {}",
                if met { "met" } else { "**missed**" }
            )
        } else {
            "reported".into()
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {rate:.1} % | {:.1} % | {fp} | {fp_rate:.2} % | {target} |",
            class.name(),
            tally.total,
            tally.hits,
            percent_of(tally.over_threshold, tally.total),
        );
    }
    let any_rate = percent_of(benign.hits, benign.total);
    let _ = writeln!(
        table,
        "| **benign, any rule** | | | | | {} of {} | {any_rate:.2} % ({} over the anomaly threshold: {:.2} %) | ≤ 0.5 %: {} |",
        benign.hits,
        benign.total,
        benign.over_threshold,
        percent_of(benign.over_threshold, benign.total),
        if any_rate <= FALSE_POSITIVE_TARGET {
            "met"
        } else {
            "**missed**"
        },
    );
    let mut report = String::new();
    let _ = writeln!(
        report,
        "{} requests ({} attacks, {} benign) replayed in {:.0} ms ({:.1} µs per request, release build), default policy: paranoia {}, anomaly threshold {threshold}.\n",
        cases.len(),
        cases.len() - benign.total,
        benign.total,
        elapsed.as_secs_f64() * 1e3,
        elapsed.as_secs_f64() * 1e6 / cases.len().max(1) as f64,
        policy.detections.doc.paranoia,
    );
    report.push_str(&table);
    let _ = writeln!(report, "\nMissed attacks (at most 50 per class):\n");
    for (class, tally) in &eval.attacks {
        for example in &tally.examples {
            let _ = writeln!(
                report,
                "- {}: `{}`",
                class.name(),
                example.replace('`', "'")
            );
        }
    }
    let _ = writeln!(report, "\nBenign requests with a finding:\n");
    for example in &benign.examples {
        let _ = writeln!(report, "- `{}`", example.replace('`', "'"));
    }
    if verbose || out.is_none() {
        println!("{report}");
    } else {
        println!("{table}");
    }
    if let Some(out) = out {
        write_section(&out, "eval", &report)?;
        write_section(&out, "rules", &catalogue())?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The rule catalogue as a table, from the code itself.
fn catalogue() -> String {
    let mut out = String::from(
        "| rule id | name | class | OWASP API Top 10 (2023) | severity (score) | paranoia |\n|---|---|---|---|---|---|\n",
    );
    for rule in monitor::detect::catalog::ALL {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} {} | {} ({}) | {} |",
            rule.id,
            rule.name.replace('|', "\\|"),
            rule.class.name(),
            rule.category.id(),
            rule.category.title(),
            rule.severity.name(),
            rule.severity.score(),
            rule.paranoia,
        );
    }
    out
}

/// Replaces a generated section of `docs/detections.md` (between its markers).
fn write_section(path: &Path, name: &str, section: &str) -> Result<()> {
    let begin_marker = format!("<!-- {name}:begin -->");
    let end_marker = format!("<!-- {name}:end -->");
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let generated = format!("{begin_marker}\n{section}{end_marker}");
    let updated = match (doc.find(&begin_marker), doc.find(&end_marker)) {
        (Some(begin), Some(end)) if begin < end => format!(
            "{}{generated}{}",
            &doc[..begin],
            &doc[end + end_marker.len()..]
        ),
        _ => format!("{doc}\n{generated}\n"),
    };
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}
