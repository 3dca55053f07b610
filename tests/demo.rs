//! `blob-access demo`, the README's first command: the plain read must fail
//! through the stream-killing proxy and the resuming read must succeed.

mod support;

use support::*;

#[test]
fn demo_shows_a_plain_read_failing_and_a_resumed_read_verified() {
    let out = cli(&["demo", "--size-mib", "96", "--kill-after-mib", "16"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (plain, resumable) = text.split_once("2. ").expect("two parts");
    assert!(plain.contains("FAILED after"), "{text}");
    let ok = resumable
        .lines()
        .find(|l| l.trim_start().starts_with("OK: 96 MiB"))
        .unwrap_or_else(|| panic!("no success line: {text}"));
    let resumptions = logged_resumptions(ok);
    // 96 MiB cut every 16 MiB at most: at least 5 resumptions.
    assert!(resumptions >= 5, "{ok}");
    assert!(ok.contains("digest verified"), "{ok}");
}
