//! The CLI end to end against `blob-access serve` over its embedded in-memory CAS.

mod support;

use std::path::Path;
use support::*;

const SIZES: &[u64] = &[0, 1, (1 << 20) - 1, (1 << 20) + 1, 100 << 20];

#[test]
fn put_get_find_missing_round_trips() {
    let serve = Serve::start(None);
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "c.yaml", serve.port);
    let c = config.to_str().unwrap();
    for &size in SIZES {
        let file = random_file(dir.path(), size);
        let missing_before = cli_ok(&["find-missing", "--config", c, &expected_digest(&file)]);
        let want = if size == 0 {
            String::new()
        } else {
            expected_digest(&file)
        };
        assert_eq!(
            missing_before.trim(),
            want,
            "the empty blob is never missing"
        );
        let digest = put_cli(&config, &file);
        assert_eq!(digest, expected_digest(&file), "size {size}");
        assert_eq!(cli_ok(&["find-missing", "--config", c, &digest]), "");
        let out = dir.path().join(format!("out-{size}"));
        get_cli(&config, &digest, &out);
        assert!(files_equal(&file, &out), "size {size}");
        if size < 2 << 20 {
            let out = cli(&["get", "--config", c, &digest]);
            assert!(out.status.success());
            assert_eq!(
                out.stdout,
                std::fs::read(&file).unwrap(),
                "stdout, size {size}"
            );
        }
    }
}

/// `get -o` makes a file as any program would (0666 less the umask), and
/// refuses a directory as the output, naming it.
#[test]
fn get_to_a_file_follows_the_umask_and_refuses_a_directory() {
    use std::os::unix::fs::PermissionsExt;
    let serve = Serve::start(None);
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "c.yaml", serve.port);
    let c = config.to_str().unwrap();
    let digest = put_cli(&config, &random_file(dir.path(), 1000));
    for (umask, mode) in [("022", 0o644), ("027", 0o640), ("0", 0o666)] {
        let out = dir.path().join(format!("out-{umask}"));
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask} && exec \"$0\" \"$@\""))
            .arg(bin())
            .args(["get", "--config", c, &digest, "-o"])
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success());
        let got = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, mode, "umask {umask}: {got:o}");
    }

    let target = dir.path().join("a-dir");
    std::fs::create_dir(&target).unwrap();
    let t = target.to_str().unwrap();
    let err = one_line_error(&cli(&["get", "--config", c, &digest, "-o", t]));
    assert!(
        err.contains("InvalidArgument") && err.contains(t) && err.contains("is a directory"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".blob-access-"))
        .collect();
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

#[test]
fn a_killed_get_leaves_no_file_behind() {
    // A server that accepts and never answers: `get -o` has made its file and
    // waits for the first byte when it is killed.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "c.yaml", port);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let digest = format!("{}/{}", "ab".repeat(32), 5 << 30);
    let mut child = std::process::Command::new(bin())
        .args([
            "get",
            "-q",
            "--config",
            config.to_str().unwrap(),
            &digest,
            "-o",
        ])
        .arg(out_dir.join("blob"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _held = silent.accept().unwrap();
    // Wait until the process holds a file in `out` open (named or unnamed).
    let fds = format!("/proc/{}/fd", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let holds_file = || {
        std::fs::read_dir(&fds)
            .unwrap()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|p| p.starts_with(&out_dir)))
    };
    while !holds_file() {
        assert!(
            std::time::Instant::now() < deadline,
            "get never made its file"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// sha256sum's answer, independent of our own hashing.
fn expected_digest(file: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(file)
        .output()
        .unwrap();
    let hash = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    format!("{hash}/{}", std::fs::metadata(file).unwrap().len())
}

fn one_line_error(out: &std::process::Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn failures_are_one_line_errors_and_leave_nothing_behind() {
    let serve = Serve::start(None);
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "c.yaml", serve.port);
    let c = config.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    let absent = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae/3";

    let err = one_line_error(&cli(&["get", "--config", c, absent, "-o", o]));
    assert!(err.contains("NotFound") && err.contains(absent), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temp file left behind"
    );

    let err = one_line_error(&cli(&["get", "--config", c, "nothex/3"]));
    assert!(err.contains("invalid digest"), "{err}");
    let err = one_line_error(&cli(&[
        "find-missing",
        "--config",
        c,
        &absent.replace("/3", "/-3"),
    ]));
    assert!(err.contains("non-negative"), "{err}");

    let dead = grpc_config(dir.path(), "dead.yaml", free_port());
    let err = one_line_error(&cli(&[
        "get",
        "--config",
        dead.to_str().unwrap(),
        absent,
        "-o",
        o,
    ]));
    assert!(err.contains("Unavailable"), "{err}");
    assert!(!out.exists());

    let err = one_line_error(&cli(&["put", "--config", c, "/nonexistent/file"]));
    assert!(err.contains("/nonexistent/file"), "{err}");
}

#[test]
fn validate_reports_file_line_column_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "memory:\n  max_size_bytes: 1\n  colour: red\n").unwrap();
    let good = root().join("examples/memory.yaml");
    let out = cli(&["validate", good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}:3:3: at memory.colour: unknown field `colour`",
            bad.display()
        )),
        "{err}"
    );
    assert_eq!(
        cli(&["validate", good.to_str().unwrap()]).status.code(),
        Some(0)
    );

    // A node that makes no sense in an action cache: refused with its path,
    // before anything is built; `serve` refuses the file the same way.
    let ac = dir.path().join("ac.yaml");
    std::fs::write(
        &ac,
        "content_addressable_storage: {memory: {max_size_bytes: 1MiB}}\naction_cache:\n  existence_caching: {backend: {memory: {max_size_bytes: 1MiB}}}\n",
    )
    .unwrap();
    let expected = format!(
        "{}: at action_cache.existence_caching: `existence_caching` cannot be part of an action_cache tree",
        ac.display()
    );
    let out = cli(&["validate", ac.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&expected),
        "{out:?}"
    );
    let out = cli(&[
        "serve",
        "--config",
        ac.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&expected),
        "{out:?}"
    );

    let schema: serde_json::Value = serde_json::from_str(&cli_ok(&["schema"])).unwrap();
    let checked_in: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("config-schema/blob-access.schema.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(schema, checked_in);
}

/// Settings that can never connect are config errors with a place, from
/// `validate` and from every command that loads the file.
#[test]
fn validate_refuses_grpc_settings_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("grpc:\n  endpoint: \"not a url\"\n", "2:13: at grpc.endpoint: "),
        (
            "resumable_grpc:\n  grpc:\n    endpoint: grpc://127.0.0.1:1\n    headers: {\"x y\": v}\n",
            "4:15: at resumable_grpc.grpc.headers",
        ),
        (
            "grpc:\n  endpoint: unix:/tmp/s\n  headers:\n    a: \"x\\ny\"\n",
            "4:8: at grpc.headers.a: the value is not printable ASCII",
        ),
    ];
    for (i, (text, place)) in cases.into_iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&file, text).unwrap();
        let f = file.to_str().unwrap();
        let expected = format!("{f}:{place}");
        let err = one_line_error(&cli(&["validate", f]));
        assert!(err.starts_with(&expected), "{err}");
        let err = one_line_error(&cli(&["find-missing", "--config", f, "-"]));
        assert!(err.contains(&expected), "{err}");
        let out = cli(&["serve", "--config", f, "--listen", "127.0.0.1:0"]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&expected),
            "{out:?}"
        );
    }
}

/// "serving ... on unix:PATH" is printed once the socket listens, never
/// before a bind that fails.
#[test]
fn serve_on_a_unix_socket_says_serving_only_once_listening() {
    let err = one_line_error(&cli(&["serve", "--listen", "unix:/nonexistent/dir/sock"]));
    assert!(
        err.contains("/nonexistent/dir/sock") && !err.contains("serving"),
        "{err}"
    );

    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let mut child = std::process::Command::new(bin())
        .args(["serve", "--listen"])
        .arg(format!("unix:{}", socket.display()))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let line = stderr
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("serving"));
    let connected = std::os::unix::net::UnixStream::connect(&socket);
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("serve exited without saying it serves");
    assert!(
        line.ends_with(&format!("on unix:{}", socket.display())),
        "{line}"
    );
    connected.expect("not listening when it said it serves");
}

#[test]
fn put_of_many_files_sends_only_what_is_missing_and_find_missing_reads_stdin() {
    let serve = Serve::start(None);
    let dir = tempfile::tempdir().unwrap();
    let config = grpc_config(dir.path(), "c.yaml", serve.port);
    let c = config.to_str().unwrap();
    let files: Vec<String> = (0..200)
        .map(|i| {
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, format!("many {i}\n").repeat(i + 1)).unwrap();
            p.to_str().unwrap().to_string()
        })
        .collect();
    // Half of them first; then all: only the other half is sent.
    let put = |files: &[String]| {
        let mut args = vec!["put", "--config", c];
        args.extend(files.iter().map(String::as_str));
        let out = cli(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digests = String::from_utf8(out.stdout).unwrap();
        (digests, String::from_utf8(out.stderr).unwrap())
    };
    let (_, summary) = put(&files[..100]);
    assert!(summary.contains("100 blobs"), "{summary}");
    let (digests, summary) = put(&files);
    assert!(
        summary.contains("put 200 files") && summary.contains(": 100 blobs"),
        "{summary}"
    );
    let digests: Vec<&str> = digests.lines().collect();
    for (d, f) in digests.iter().zip(&files) {
        assert_eq!(*d, expected_digest(Path::new(f)));
    }
    assert_eq!(digests.len(), 200);

    let absent = "0".repeat(64) + "/5";
    let mut child = std::process::Command::new(bin())
        .args(["find-missing", "--config", c])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let input = format!("{}\n{absent}\n", digests.join("\n"));
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), absent);
}
