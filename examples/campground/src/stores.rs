//! Which store the demo keeps sessions and the audit trail in.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use impersonation_core::{MemoryStore, Store, redacted_url};
use impersonation_diesel::{BackendKind, DieselConfig, DieselStore};
use impersonation_redis::{RedisConfig, RedisStore};

/// A store the demo can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// An SQLite file (the default): nothing to install.
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MariaDB (or MySQL).
    Mariadb,
    /// Redis.
    Redis,
    /// In memory: gone when the demo stops.
    Memory,
}

impl StoreKind {
    /// Every kind, in the order the help text lists them.
    pub const ALL: [StoreKind; 5] = [
        Self::Sqlite,
        Self::Postgres,
        Self::Mariadb,
        Self::Redis,
        Self::Memory,
    ];

    /// The name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Mariadb => "mariadb",
            Self::Redis => "redis",
            Self::Memory => "memory",
        }
    }

    /// The URL used when none is given. SQLite's file lives under `target_dir`.
    pub fn default_url(self, target_dir: &Path) -> String {
        match self {
            Self::Sqlite => format!(
                "sqlite://{}",
                target_dir.join("demo").join("campground.sqlite3").display()
            ),
            Self::Postgres => "postgres://postgres@127.0.0.1:5432/test".into(),
            Self::Mariadb => "mysql://root@127.0.0.1:3306/test".into(),
            Self::Redis => "redis://127.0.0.1:6379".into(),
            Self::Memory => "memory".into(),
        }
    }

    /// Connects (and migrates) the store at `url`. `namespace` is the
    /// PostgreSQL schema or the Redis key namespace (letters, digits, `_`).
    pub async fn connect(self, url: &str, namespace: &str) -> Result<Arc<dyn Store>> {
        // The URL must name this kind of store: otherwise the store picked
        // and the one the page and the console name would differ (or a
        // memory store would drop the URL, and every session with it).
        if !self.fits(url) {
            anyhow::bail!(
                "`{}` is not a {self} URL (expected {}); pass the --store it names",
                redacted_url(url),
                self.url_form()
            );
        }
        Ok(match self {
            Self::Memory => Arc::new(MemoryStore::new()),
            Self::Sqlite => {
                // Both schemes the store takes for SQLite name a path.
                if let Some(dir) = url
                    .strip_prefix("sqlite://")
                    .or_else(|| url.strip_prefix("file://"))
                    .and_then(|p| Path::new(p).parent())
                    .filter(|d| !d.as_os_str().is_empty())
                {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                Arc::new(diesel(url, namespace).await?)
            }
            Self::Postgres | Self::Mariadb => Arc::new(diesel(url, namespace).await?),
            Self::Redis => {
                let config = RedisConfig::new(url)?.namespace(namespace)?;
                Arc::new(
                    RedisStore::connect(config)
                        .await
                        .with_context(|| format!("connecting to Redis at {}", redacted_url(url)))?,
                )
            }
        })
    }
}

impl StoreKind {
    /// Whether `url` names a store of this kind (by its scheme).
    pub fn fits(self, url: &str) -> bool {
        let diesel = BackendKind::of_url(url).ok();
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        match self {
            Self::Memory => url == "memory",
            Self::Sqlite => diesel == Some(BackendKind::Sqlite),
            Self::Postgres => diesel == Some(BackendKind::Postgres),
            Self::Mariadb => diesel == Some(BackendKind::Mysql),
            Self::Redis => matches!(
                scheme,
                "redis" | "rediss" | "redis+cluster" | "rediss+cluster"
            ),
        }
    }

    /// The store `url` names, if any (`memory` for the memory store).
    pub fn of_url(url: &str) -> Option<Self> {
        [
            Self::Sqlite,
            Self::Postgres,
            Self::Mariadb,
            Self::Redis,
            Self::Memory,
        ]
        .into_iter()
        .find(|kind| kind.fits(url))
    }

    fn url_form(self) -> &'static str {
        match self {
            Self::Memory => "`memory`",
            Self::Sqlite => "sqlite://PATH",
            Self::Postgres => "postgres://…",
            Self::Mariadb => "mysql:// or mariadb://…",
            Self::Redis => "redis:// or rediss://…",
        }
    }
}

async fn diesel(url: &str, namespace: &str) -> Result<DieselStore> {
    let mut config = DieselConfig::new(url);
    if url.starts_with("postgres") {
        config = config.schema(namespace);
    }
    DieselStore::connect_and_migrate(config)
        .await
        .with_context(|| format!("opening the store at {}", redacted_url(url)))
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|k| {
                k.name() == s
                    || (s == "mysql" && *k == Self::Mariadb)
                    || (s == "pg" && *k == Self::Postgres)
            })
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown store `{s}` (expected one of {})", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_url_names_its_store_and_no_other() {
        for (url, kind) in [
            ("sqlite:///tmp/x.sqlite3", Some(StoreKind::Sqlite)),
            ("file:///tmp/x.sqlite3", Some(StoreKind::Sqlite)),
            (
                "postgres://postgres@127.0.0.1/test",
                Some(StoreKind::Postgres),
            ),
            ("postgresql://h/db", Some(StoreKind::Postgres)),
            ("mysql://root@127.0.0.1/test", Some(StoreKind::Mariadb)),
            ("mariadb://root@127.0.0.1/test", Some(StoreKind::Mariadb)),
            ("redis://127.0.0.1:6379", Some(StoreKind::Redis)),
            ("rediss://cache.example:6380", Some(StoreKind::Redis)),
            (
                "redis+cluster://127.0.0.1:7001,127.0.0.1:7002",
                Some(StoreKind::Redis),
            ),
            ("memory", Some(StoreKind::Memory)),
            // A socket URL the Redis store does not take is no store's.
            ("unix:///run/redis.sock", None),
            ("redis+unix:///run/redis.sock", None),
            ("http://127.0.0.1", None),
            ("/tmp/x.sqlite3", None),
        ] {
            assert_eq!(StoreKind::of_url(url), kind, "{url}");
        }
        assert!(!StoreKind::Memory.fits("postgres://h/db"));
        assert!(!StoreKind::Sqlite.fits("postgres://h/db"));
    }

    #[tokio::test]
    async fn a_url_of_another_store_is_refused_before_connecting() {
        let refused = StoreKind::Memory
            .connect("postgres://user:hunter2@127.0.0.1/test", "x")
            .await
            .err()
            .expect("refused");
        let message = refused.to_string();
        assert!(message.contains("is not a memory URL"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        let refused = StoreKind::Sqlite
            .connect("redis://127.0.0.1:6379", "x")
            .await
            .err()
            .expect("refused");
        assert!(refused.to_string().contains("is not a sqlite URL"));
    }

    /// A SQLite file in a folder not made yet opens, by either scheme.
    #[tokio::test]
    async fn a_sqlite_file_in_a_new_folder_opens_by_either_scheme() {
        for scheme in ["sqlite", "file"] {
            let dir = impersonation_testkit::scratch::scratch_file("imptest_demo", "d");
            let url = format!("{scheme}://{}/x.db", dir.display());
            assert!(!dir.exists());
            StoreKind::Sqlite.connect(&url, "x").await.unwrap();
            assert!(dir.join("x.db").exists(), "{url}");
        }
    }
}
