//! A real nginx serving test content inside a network namespace; stopped on drop.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::NetNs;

pub struct Nginx {
    child: Child,
    pub dir: tempfile::TempDir,
}

/// Size of `/big`, a response of several MB.
pub const BIG_BYTES: usize = 3 * 1024 * 1024;

impl Nginx {
    /// Serves `/a`, `/b`, `/users/42`, `/big` and `POST /echo` (answers "ok") on
    /// `listen` addresses (`ip:port`, IPv6 in brackets).
    pub fn start(ns: &NetNs, listen: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("apimon-nginx-")
            .tempdir()
            .expect("tempdir");
        let root = dir.path().join("www");
        std::fs::create_dir_all(root.join("users")).expect("www");
        std::fs::write(root.join("a"), "alpha\n").expect("a");
        std::fs::write(root.join("b"), "bravo!\n").expect("b");
        std::fs::write(root.join("users/42"), "{\"id\":42}\n").expect("users/42");
        std::fs::write(root.join("big"), vec![b'x'; BIG_BYTES]).expect("big");
        let listens: String = listen.iter().map(|l| format!("listen {l};\n")).collect();
        let d = dir.path().display();
        let config = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
             error_log {d}/error.log;\n\
             events {{}}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             keepalive_requests 1000;\n\
             server {{\n{listens} root {root};\n\
             location = /echo {{ client_max_body_size 20m; client_body_buffer_size 1m; return 200 \"ok\\n\"; }}\n\
             }}\n}}\n",
            root = root.display()
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).expect("nginx.conf");
        let ns_path = ns.path();
        let mut command = Command::new("nginx");
        command
            .args([
                "-c",
                &config_path.display().to_string(),
                "-p",
                &dir.path().display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only open and setns between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let file = std::fs::File::open(&ns_path)?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        let child = command
            .spawn()
            .expect("spawning nginx (apt-get install nginx-light)");
        let nginx = Self { child, dir };
        nginx.wait_listening(ns, listen[0]);
        nginx
    }

    fn wait_listening(&self, ns: &NetNs, listen: &str) {
        let addr: std::net::SocketAddr = listen.parse().expect("listen address");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let connected = ns.run(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if connected {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
        panic!("nginx did not listen on {listen}: {log}");
    }

    pub fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("www")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs curl inside `ns`; returns stdout, panicking on failure.
pub fn curl(ns: &NetNs, args: &[&str]) -> String {
    try_curl(ns, "20", args).unwrap_or_else(|e| panic!("curl {}: {e}", args.join(" ")))
}

/// Runs curl inside `ns` with a time limit (seconds); stdout, or stderr on failure.
pub fn try_curl(ns: &NetNs, max_time: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "curl",
            "-sS",
            "--max-time",
            max_time,
        ])
        .args(args)
        .output()
        .expect("running curl");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// A file of `len` bytes under `dir`, for request bodies.
pub fn body_file(dir: &Path, name: &str, len: usize) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut body = String::from("{\"items\":[");
    while body.len() + 40 < len {
        body.push_str("{\"id\":1234567,\"name\":\"widget\"},");
    }
    body.push_str("{\"id\":0}]}");
    while body.len() < len {
        body.insert(body.len() - 1, ' ');
    }
    std::fs::write(&path, body).expect("body file");
    path
}
