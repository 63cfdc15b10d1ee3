//! Which store the demo keeps sessions and the audit trail in.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context as _, Result};
use impersonation_core::{MemoryStore, Store};
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
                        .with_context(|| format!("connecting to Redis at {}", shown_url(url)))?,
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
        .with_context(|| format!("opening the store at {}", shown_url(url)))
}

/// A store URL as it may be shown (printed, or in an error): its password,
/// if it has one, replaced with `***`. `url::Url` cannot be used here: a
/// Redis cluster URL names several hosts.
pub fn shown_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority = rest.split('/').next().unwrap_or_default();
    match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let path = &rest[authority.len()..];
            let password = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{password}@{hosts}{path}")
        }
        None => url.to_owned(),
    }
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
    use super::shown_url;

    #[test]
    fn a_shown_url_keeps_everything_but_the_password() {
        assert_eq!(
            shown_url("postgres://app:hunter2@db.example:5432/x?sslmode=require"),
            "postgres://app:***@db.example:5432/x?sslmode=require"
        );
        assert_eq!(
            shown_url("redis://:s3cret@127.0.0.1/"),
            "redis://:***@127.0.0.1/"
        );
        assert_eq!(
            shown_url("redis+cluster://u:p@a:7001,b:7002"),
            "redis+cluster://u:***@a:7001,b:7002"
        );
        assert_eq!(
            shown_url("mysql://root@127.0.0.1/test"),
            "mysql://root@127.0.0.1/test"
        );
        assert_eq!(
            shown_url("sqlite://target/demo/x.db"),
            "sqlite://target/demo/x.db"
        );
        // An `@` in the path is not a password's end.
        assert_eq!(shown_url("sqlite:///tmp/a@b.db"), "sqlite:///tmp/a@b.db");
        assert_eq!(shown_url(":memory:"), ":memory:");
    }
}
