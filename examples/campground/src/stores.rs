//! Which store the demo keeps sessions and the audit trail in.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use impersonation_core::{MemoryStore, Store, redacted_url};
use impersonation_diesel::{DieselConfig, DieselStore};
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
        Ok(match self {
            Self::Memory => Arc::new(MemoryStore::new()),
            Self::Sqlite => {
                if let Some(dir) = url
                    .strip_prefix("sqlite://")
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
