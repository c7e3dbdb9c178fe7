//! Detection quality on the labelled corpus, replayed through the daemon's pipeline:
//! the targets as a regression guard (the numbers themselves are reported
//! by `cargo xtask eval` in docs/detections.md).

use apimon_tests::corpus::{
    self, DETECTION_TARGET, Evaluation, FALSE_POSITIVE_TARGET, TARGET_CLASSES,
};
use monitor::policy::Policy;

#[test]
fn corpus_meets_the_detection_and_false_positive_targets() {
    let policy = Policy::builtin();
    let cases = corpus::corpus(&corpus::default_dir()).unwrap();
    let reports = corpus::replay(&cases, &policy).unwrap();
    let eval = Evaluation::new(&cases, &reports, policy.detections.doc.anomaly_threshold);
    assert!(eval.benign.total >= 800, "the benign corpus is all there");
    for class in TARGET_CLASSES {
        let tally = &eval.attacks[class];
        assert!(
            tally.total >= 200,
            "{}: {} attack requests",
            class.name(),
            tally.total
        );
        let (detected, false_positives) = (
            eval.detection_rate(*class),
            eval.false_positive_rate(*class),
        );
        assert!(
            detected >= DETECTION_TARGET,
            "{}: {detected:.1} % detected; missed: {:?}",
            class.name(),
            tally.examples
        );
        assert!(
            false_positives <= FALSE_POSITIVE_TARGET,
            "{}: {false_positives:.2} % false positives: {:?}",
            class.name(),
            eval.benign.examples
        );
    }
    let any = apimon_tests::corpus::percent_of(eval.benign.hits, eval.benign.total);
    assert!(
        any <= FALSE_POSITIVE_TARGET,
        "{any:.2} % of benign requests with any finding: {:?}",
        eval.benign.examples
    );
}
