//! The demo binary stops on Ctrl-C, as it says it does, even while a page
//! holds an event stream open.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The demo process, killed if the test ends before it exits.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Ctrl-C (SIGINT) while the dashboard's live line, an event stream that
/// never ends by itself, is open: the demo exits within a few seconds
/// (it gives requests in flight two), rather than run on until the tab
/// is closed.
#[test]
fn ctrl_c_stops_the_demo_while_an_event_stream_is_open() {
    let mut demo = Demo(
        Command::new(env!("CARGO_BIN_EXE_campground-demo"))
            .args(["--store", "memory", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(demo.0.stdout.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("the demo printed its address").unwrap();
        if let Some(url) = line.trim().strip_prefix("Open http://") {
            break url.split_whitespace().next().unwrap().to_owned();
        }
    };
    // Whatever else it prints goes nowhere, so that it never blocks.
    std::thread::spawn(move || lines.for_each(drop));
    let mut stream = TcpStream::connect(&base).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /dashboard/live HTTP/1.1\r\nHost: {base}\r\nCookie: campground_user=olive\r\n\r\n"
    )
    .unwrap();
    // The stream is open once its first event has come.
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("event: bookings") {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    let pid = demo.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = demo.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the demo still runs 10 s after Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}
