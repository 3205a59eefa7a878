//! `rewind serve` in front of embedded stores with users: per-database access.

use std::io::Write;
use std::process::{Command, Stdio};

use rewind_testkit::{http_request, Gateway};

fn request(
    port: u16,
    method: &str,
    path: &str,
    auth: Option<(&str, &str)>,
    body: &str,
) -> (u16, String) {
    let auth = auth
        .map(|(u, p)| format!("Authorization: Basic {}\r\n", base64(&format!("{u}:{p}"))))
        .unwrap_or_default();
    http_request(port, method, path, &auth, body)
}

fn base64(s: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn users_see_only_their_databases_and_wrong_passwords_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_rewind");
    let hash = {
        let mut child = Command::new(bin)
            .arg("hash-password")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
        let out = child.wait_with_output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert!(hash.contains('$') && !hash.contains("s3cret"), "{hash}");
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/cht");
    std::fs::write(
        dir.path().join("rewind.toml"),
        format!("[[users]]\nname = \"chw1\"\npassword = \"{hash}\"\ndatabases = [\"medic\"]\nroles = [\"chw\"]\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for db in ["medic", "other"] {
        let status = Command::new(bin)
            .args(["sample", "--docs", "3", "--db"])
            .arg(data.join(format!("{db}.db")))
            .output()
            .unwrap()
            .status;
        assert!(status.success());
    }
    let gateway = Gateway::serve_embedded(bin, dir.path(), &data, &migrations);
    let port = gateway.port;
    let (status, body) = request(port, "GET", "/medic", None, "");
    assert_eq!(status, 401, "{body}");
    // With users, no word of an open gateway.
    assert!(
        !gateway.stderr().contains("no [[users]]"),
        "{}",
        gateway.stderr()
    );
    assert!(body.contains("\"error\":\"unauthorized\""), "{body}");
    let (status, _) = request(port, "GET", "/medic", Some(("chw1", "wrong")), "");
    assert_eq!(status, 401);
    let (status, _) = request(port, "GET", "/medic", Some(("nobody", "s3cret")), "");
    assert_eq!(status, 401);
    let (status, body) = request(port, "GET", "/medic", Some(("chw1", "s3cret")), "");
    assert_eq!(status, 200, "{body}");
    let (status, body) = request(port, "GET", "/other", Some(("chw1", "s3cret")), "");
    assert_eq!(status, 403, "{body}");
    let (status, _) = request(port, "PUT", "/other/x", Some(("chw1", "s3cret")), "{}");
    assert_eq!(status, 403);
    let (status, body) = request(port, "GET", "/_session", Some(("chw1", "s3cret")), "");
    assert_eq!(status, 200);
    assert!(
        body.contains("\"name\":\"chw1\"") && body.contains("\"chw\""),
        "{body}"
    );
    let (status, _) = request(port, "GET", "/_config", Some(("chw1", "s3cret")), "");
    assert_eq!(status, 403);
    let (status, _) = request(port, "GET", "/", None, "");
    assert_eq!(status, 200, "the welcome answer needs no login");
}
