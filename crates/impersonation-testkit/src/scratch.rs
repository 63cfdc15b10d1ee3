//! Names and places that keep tests apart, so they run in parallel against
//! shared servers: each test its own PostgreSQL schema, MariaDB database,
//! Redis namespace or SQLite file.
//!
//! Pass `imptest`, or a prefix that starts `imptest_`, so that names start
//! `imptest_`: `cargo xtask services reset` (and every `cargo xtask ci`)
//! removes what earlier runs left behind by that prefix, and the files under
//! [`scratch_dir`].
//!
//! ```
//! use impersonation_testkit::scratch;
//!
//! let schema = scratch::unique_name("imptest");
//! assert!(schema.starts_with("imptest_"));
//! assert_ne!(schema, scratch::unique_name("imptest"));
//!
//! let db = scratch::scratch_file("imptest", "db");
//! assert_eq!(db.parent(), Some(scratch::scratch_dir().as_path()));
//! ```

use std::path::PathBuf;

/// `<prefix>_<12 hex digits>`: unique per call (the random tail of a UUIDv7),
/// short enough for a PostgreSQL schema or MariaDB database name.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("{prefix}_{}", &id[20..])
}

/// The build's target directory: `$CARGO_TARGET_DIR`, else the workspace's
/// `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// `<target>/test-dbs/`, created if missing: where tests keep their SQLite
/// files.
///
/// # Panics
///
/// If the directory cannot be created (a test cannot go on without it).
pub fn scratch_dir() -> PathBuf {
    let dir = target_dir().join("test-dbs");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// A port of 127.0.0.1 that was free when drawn, released for a server a
/// test starts to bind. Another test's server may take it meanwhile: the
/// caller checks that its own server answers there, and draws again if not.
///
/// # Panics
///
/// If no port can be bound at all.
pub fn released_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("drawing a free port: {e}"))
}

/// A fresh path `<target>/test-dbs/<unique name>.<extension>` (the file is
/// not created).
pub fn scratch_file(prefix: &str, extension: &str) -> PathBuf {
    scratch_dir().join(format!("{}.{extension}", unique_name(prefix)))
}
