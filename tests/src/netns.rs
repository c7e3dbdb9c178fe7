//! Network namespaces and veth pairs that clean up after themselves, also when a test
//! panics (the guards delete them on drop).

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
};

use nix::sched::{CloneFlags, setns};

use crate::unique_tag;

/// Runs `ip` with arguments, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(role: &str) -> Self {
        let name = format!("apimon-test-{}-{role}", unique_tag());
        ip(&["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full);
    }

    /// Moves the calling thread into this namespace (sockets it opens live there).
    pub fn enter_current_thread(&self) {
        let file = File::open(self.path()).expect("opening netns");
        setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(path).expect("opening netns");
            setns(file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns panicked")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A server namespace and a client namespace joined by a veth pair. The client side has
/// two addresses per family, so one client can be blocked while the other is not.
pub struct Topology {
    pub server: NetNs,
    pub client: NetNs,
    pub server_if: String,
    pub client_if: String,
}

impl Topology {
    pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    pub const CLIENT_V4: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3)];
    pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
    pub const CLIENT_V6: [Ipv6Addr; 2] = [
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2),
        Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 3),
    ];

    pub fn new() -> Self {
        let server = NetNs::new("srv");
        let client = NetNs::new("cli");
        let tag = unique_tag();
        let server_if = format!("am{tag}s");
        let client_if = format!("am{tag}c");
        ip(&[
            "link",
            "add",
            &server_if,
            "netns",
            &server.name,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            &client.name,
        ]);
        server.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::SERVER_V4),
            "dev",
            &server_if,
        ]);
        server.ip(&[
            "addr",
            "add",
            &format!("{}/64", Self::SERVER_V6),
            "dev",
            &server_if,
            "nodad",
        ]);
        for v4 in Self::CLIENT_V4 {
            client.ip(&["addr", "add", &format!("{v4}/24"), "dev", &client_if]);
        }
        for v6 in Self::CLIENT_V6 {
            client.ip(&[
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                &client_if,
                "nodad",
            ]);
        }
        server.ip(&["link", "set", &server_if, "up"]);
        client.ip(&["link", "set", &client_if, "up"]);
        Self {
            server,
            client,
            server_if,
            client_if,
        }
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
