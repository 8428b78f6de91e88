use std::time::Duration;

use crate::common::*;

const T: Duration = Duration::from_secs(60);

#[test]
fn it_should_describe_a_64mib_file_with_64_pieces_and_a_stable_info_hash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("data.bin"), 64 << 20);
    let out = shoal_ok(
        d,
        &[
            "create",
            "data.bin",
            "-o",
            "a.json",
            "--tracker",
            "127.0.0.1:5000",
        ],
        T,
    );
    assert!(out.contains("info hash: "), "{out}");
    shoal_ok(
        d,
        &[
            "create",
            "data.bin",
            "-o",
            "b.json",
            "--tracker",
            "127.0.0.1:6000",
            "--tracker",
            "127.0.0.2:6001",
        ],
        T,
    );
    let a: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("a.json")).unwrap()).unwrap();
    assert_eq!(a["pieces"].as_array().unwrap().len(), 64);
    assert_eq!(a["piece_length"], 1 << 20);
    assert_eq!(a["name"], "data.bin");
    assert_eq!(
        a["file_sha256"].as_str().unwrap(),
        sha256sum(&d.join("data.bin"))
    );
    let info = |f: &str| {
        let out = shoal_ok(d, &["show", f], T);
        out.lines()
            .find_map(|l| l.strip_prefix("info hash: "))
            .unwrap_or_else(|| panic!("no info hash line in {out}"))
            .to_string()
    };
    let (ha, hb) = (info("a.json"), info("b.json"));
    assert_eq!(ha.len(), 64);
    assert_eq!(ha, hb, "trackers must not change the info hash");
    let json: serde_json::Value =
        serde_json::from_str(&shoal_ok(d, &["show", "a.json", "--json"], T)).unwrap();
    assert_eq!(json["info_hash"], ha);
    assert_eq!(json["pieces"], 64);
    // A different piece size is different content.
    shoal_ok(
        d,
        &[
            "create",
            "data.bin",
            "-o",
            "c.json",
            "--piece-size",
            "256KiB",
        ],
        T,
    );
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("c.json")).unwrap()).unwrap();
    assert_eq!(c["pieces"].as_array().unwrap().len(), 256);
    assert_ne!(info("c.json"), ha);
}

#[test]
fn it_should_refuse_a_descriptor_whose_name_escapes_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    random_file(&d.join("x.bin"), 40_000);
    shoal_ok(
        d,
        &["create", "x.bin", "-o", "x.json", "--piece-size", "16KiB"],
        T,
    );
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("x.json")).unwrap()).unwrap();
    v["name"] = "../evil".into();
    std::fs::write(d.join("evil.json"), serde_json::to_vec(&v).unwrap()).unwrap();
    let out = shoal(d, &["show", "evil.json"], T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`name`"), "{err}");
    // Each other broken field is named too.
    for (field, value) in [
        ("pieces", serde_json::json!(["00"])),
        ("piece_length", serde_json::json!(1000)),
        ("file_sha256", serde_json::json!("abc")),
    ] {
        let mut bad = v.clone();
        bad["name"] = "x.bin".into();
        bad[field] = value;
        std::fs::write(d.join("bad.json"), serde_json::to_vec(&bad).unwrap()).unwrap();
        let out = shoal(d, &["show", "bad.json"], T);
        assert!(!out.status.success(), "{field} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
    }
}

#[test]
fn it_should_name_an_unknown_config_key_and_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("c.toml"), "[tracker]\nttll = \"30s\"\n").unwrap();
    let out = shoal(d, &["--config", "c.toml", "show", "nothing.json"], T);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ttll"));
    std::fs::write(d.join("c.toml"), "[peer]\nflush_interval = \"often\"\n").unwrap();
    let out = shoal(d, &["--config", "c.toml", "show", "nothing.json"], T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("flush_interval") || err.contains("often"),
        "{err}"
    );
    // The shipped config.toml loads as is.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let out = shoal(d, &["--config", shipped, "show", "nothing.json"], T);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing.json"),
        "config should load, then show fails on the file: {err}"
    );
}
