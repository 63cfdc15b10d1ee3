//! Test stores: each test gets its own namespace, so tests share the
//! servers without seeing each other.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use impersonation_redis::{RedisConfig, RedisStore};

pub(crate) const SINGLE: &str = "redis://127.0.0.1:6379";
pub(crate) const CLUSTER: &str = "redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

pub(crate) use impersonation_testkit::scratch::unique_name as unique;

pub(crate) async fn store_at(url: &str, ns: &str) -> RedisStore {
    RedisStore::connect(RedisConfig::new(url).unwrap().namespace(ns).unwrap())
        .await
        .expect("Redis test store")
}

/// Two stores on one new namespace at `url`, each with its own
/// connection and cached chain heads: two processes of an app.
pub(crate) async fn pair_at(url: &str) -> (RedisStore, RedisStore) {
    let ns = unique("imptest");
    (store_at(url, &ns).await, store_at(url, &ns).await)
}

/// A plain connection to the server at `url`, for a test that reads,
/// damages, moves or counts stored keys itself. It waits up to 30 s for
/// an answer, not the client's default half second, which a `MIGRATE`
/// (bounded by its own timeout) can take on a machine busy with the rest
/// of a test run.
pub(crate) async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    let patient = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(std::time::Duration::from_secs(30)))
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&patient)
        .await
        .unwrap()
}

/// The members of the set at `key`, on the single server or the cluster
/// (read as Redis holds it, not through the store, whose listing skips
/// stale entries).
#[allow(dead_code)] // not every test binary reads a set
pub(crate) async fn set_members(on_cluster: bool, key: &str) -> Vec<String> {
    let mut smembers = redis::cmd("SMEMBERS");
    smembers.arg(key);
    if on_cluster {
        let client = redis::cluster::ClusterClient::new(
            CLUSTER
                .trim_start_matches("redis+cluster://")
                .split(',')
                .map(|node| format!("redis://{node}"))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let mut conn = client.get_async_connection().await.unwrap();
        smembers.query_async(&mut conn).await.unwrap()
    } else {
        smembers.query_async(&mut raw(SINGLE).await).await.unwrap()
    }
}

/// The prefix of the keys of `chain`'s agent in namespace `ns`
/// (`ns:{<route>}:a:<agent>`, as keys.rs lays them out), for a test that
/// reads or damages them: `:head`, `:chain`, `:live`.
pub(crate) fn agent_keys(ns: &str, chain: &impersonation_core::ChainKey) -> String {
    format!("{ns}:{{{}}}:a:{}", chain.route(), chain.as_str())
}

/// Every entry of the stream at `key`, read raw.
pub(crate) async fn stream_entries(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> redis::streams::StreamRangeReply {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap()
}

pub(crate) async fn single() -> RedisStore {
    store_at(SINGLE, &unique("imptest")).await
}

pub(crate) async fn cluster() -> RedisStore {
    store_at(CLUSTER, &unique("imptest")).await
}

/// A Redis server of the test's own, on a free port, for tests that kill
/// clients, restart the server or count its commands.
pub(crate) struct OwnServer {
    pub(crate) port: u16,
    dir: std::path::PathBuf,
    child: Option<std::process::Child>,
}

impl OwnServer {
    /// On a free port. The port is free when drawn, then released for the
    /// server to bind: should another test's server take it meanwhile,
    /// ours exits, and another port is drawn.
    pub(crate) fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("imptest_redis"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port: 0,
            dir,
            child: None,
        };
        for _ in 0..5 {
            server.port = impersonation_testkit::scratch::released_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server found its port taken five times");
    }

    /// Starts redis-server on the port; whether it is this one that
    /// answers there (by its process id), not another that took the port.
    fn spawn(&mut self) -> bool {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by cargo xtask services up)");
        let ours = format!("process_id:{}", child.id());
        // Kept at once, so that `Drop` stops it should the wait below fail.
        let child = self.child.insert(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return false; // it could not bind the port
            }
            let info = std::process::Command::new("timeout")
                .args([
                    "5",
                    "redis-cli",
                    "-p",
                    &self.port.to_string(),
                    "info",
                    "server",
                ])
                .output();
            if info.is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.trim() == ours)
            }) {
                return true;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (all data lost: persistence is off) and starts it again.
    pub(crate) fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "port {} still answers 10 s after its server was killed",
                self.port
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(
            self.spawn(),
            "another server took port {} while this one restarted",
            self.port
        );
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
