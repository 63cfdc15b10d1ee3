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
    pub(crate) fn start() -> Self {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(unique("imptest_redis"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self {
            port,
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
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
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
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
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.spawn();
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
