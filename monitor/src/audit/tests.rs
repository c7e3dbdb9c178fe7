use super::*;

fn event(n: u32) -> Arc<Event> {
    Arc::new(Event::new("event", "configuration", "block_added").with_field("n", n))
}

fn options(dir: &Path, max_file_bytes: u64) -> AuditOptions {
    AuditOptions {
        path: dir.join("audit.jsonl"),
        max_file_bytes,
        keep_files: 5,
        stdout: false,
    }
}

/// Writes `n` records through the real writer; returns the files oldest first.
fn write(dir: &Path, n: u32, max_file_bytes: u64) -> Vec<PathBuf> {
    let (log, writer) = AuditLog::open(options(dir, max_file_bytes)).unwrap();
    for i in 0..n {
        log.record(event(i));
    }
    log.sync().unwrap();
    drop(log);
    writer.finish();
    files(dir)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let main = dir.join("audit.jsonl");
    let mut out: Vec<PathBuf> = (1..=5)
        .rev()
        .map(|n| rotated(&main, n))
        .filter(|p| p.exists())
        .collect();
    out.push(main);
    out
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn rewrite(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

fn tampered(files: &[PathBuf]) -> (String, String) {
    match verify(files).unwrap() {
        Verdict::Tampered { place, what } => (place, what),
        intact => panic!("not detected: {intact:?}"),
    }
}

#[test]
fn an_untouched_log_verifies_and_a_restart_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), 5, 1 << 20);
    let files = write(dir.path(), 3, 1 << 20);
    assert_eq!(
        verify(&files).unwrap(),
        Verdict::Intact {
            records: 8,
            first: 1,
            last: 8
        }
    );
    let first: Value = serde_json::from_str(&lines(&files[0])[0]).unwrap();
    assert_eq!(first["apimon"]["audit"]["prev"], GENESIS);
    assert_eq!(
        first["event"]["action"], "block_added",
        "the event itself is kept"
    );
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), 40, 4000);
    assert!((3..=5).contains(&files.len()), "{files:?}");
    assert!(
        files
            .iter()
            .all(|f| std::fs::metadata(f).unwrap().len() <= 4000)
    );
    assert_eq!(
        verify(&files).unwrap(),
        Verdict::Intact {
            records: 40,
            first: 1,
            last: 40
        }
    );
    // The newest file alone verifies too (older ones may have been rotated away).
    assert!(matches!(
        verify(&files[files.len() - 1..]).unwrap(),
        Verdict::Intact { .. }
    ));
    // Beyond `keep_files`, the oldest go; what is kept still verifies.
    let small = tempfile::tempdir().unwrap();
    let kept = write(small.path(), 40, 1000);
    assert_eq!(kept.len(), 6, "five rotated and the current one");
    match verify(&kept).unwrap() {
        Verdict::Intact { first, last, .. } => assert!(first > 1 && last == 40),
        other => panic!("{other:?}"),
    }
    // A missing middle file is a deletion.
    let mut gapped = files.clone();
    gapped.remove(1);
    assert!(tampered(&gapped).1.starts_with("deleted"));
}

#[test]
fn each_kind_of_tampering_is_found_at_its_record() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), 6, 1 << 20);
    let path = &files[0];
    let original = lines(path);
    let place = |line: usize| format!("{}:{line}", path.display());

    let mut altered = original.clone();
    altered[2] = altered[2].replace("block_added", "block_removed");
    rewrite(path, &altered);
    assert_eq!(
        tampered(&files),
        (place(3), "altered: record 3 does not match its hash".into())
    );

    let mut garbage = original.clone();
    garbage[1] = "not json".into();
    rewrite(path, &garbage);
    assert_eq!(tampered(&files).0, place(2));

    let mut deleted = original.clone();
    deleted.remove(3);
    rewrite(path, &deleted);
    assert_eq!(
        tampered(&files),
        (place(4), "deleted: record 4 is missing".into())
    );

    let mut reordered = original.clone();
    reordered.swap(2, 3);
    rewrite(path, &reordered);
    let (at, what) = tampered(&files);
    assert_eq!(at, place(3));
    assert!(what.starts_with("reordered"), "{what}");

    // A forged record sealed onto the chain: the next genuine one no longer follows.
    let mut inserted = original.clone();
    let forged_head = record_head(&original[2]).unwrap();
    let (forged, _) = seal(&event(99), &forged_head);
    inserted.insert(3, forged);
    rewrite(path, &inserted);
    let (at, what) = tampered(&files);
    assert_eq!(at, place(5));
    assert!(what.starts_with("inserted"), "{what}");

    let mut duplicated = original.clone();
    duplicated.insert(4, original[1].clone());
    rewrite(path, &duplicated);
    let (at, what) = tampered(&files);
    assert_eq!(at, place(5));
    assert!(what.starts_with("inserted"), "{what}");

    rewrite(path, &original);
    assert!(matches!(verify(&files).unwrap(), Verdict::Intact { .. }));
}

#[test]
fn sync_returns_only_once_records_are_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (log, writer) = AuditLog::open(options(dir.path(), 1 << 20)).unwrap();
    for i in 0..100 {
        log.record(event(i));
    }
    log.sync().unwrap();
    assert_eq!(lines(&dir.path().join("audit.jsonl")).len(), 100);
    drop(log);
    writer.finish();
}

#[test]
fn a_half_written_last_record_is_cut_before_writing_on() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), 3, 1 << 20);
    let path = &files[0];
    let mut text = std::fs::read_to_string(path).unwrap();
    text.push_str("{\"@timestamp\":\"2026-11-28T00:00:00Z\",\"event\":{\"ac");
    std::fs::write(path, text).unwrap();
    let files = write(dir.path(), 2, 1 << 20);
    assert_eq!(
        verify(&files).unwrap(),
        Verdict::Intact {
            records: 5,
            first: 1,
            last: 5
        }
    );
}
