//! A real TCP echo server and client, running inside network namespaces.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket};

use crate::netns::NetNs;

/// A TCP echo server on a thread inside a namespace; stops on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &NetNs, addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = ns.run(move || TcpListener::bind(addr).expect("binding the echo server"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = stream.read(&mut buf) {
                                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A client in `ns`, sending from `source`.
pub struct Client {
    ns_path: String,
    pub source: IpAddr,
}

impl Client {
    pub fn new(ns: &NetNs, source: IpAddr) -> Self {
        Self {
            ns_path: ns.path(),
            source,
        }
    }

    /// One TCP exchange: connect from `source`, send, read the echo. True when it all
    /// happened within `timeout`.
    pub fn exchange(&self, server: SocketAddr, timeout: Duration) -> bool {
        let ns_path = self.ns_path.clone();
        let source = self.source;
        std::thread::spawn(move || {
            let file = std::fs::File::open(ns_path).expect("opening netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            exchange_from(source, server, timeout)
        })
        .join()
        .expect("client thread panicked")
    }

    /// Polls `exchange` until it returns `want` or `deadline` passes; returns when it did.
    pub fn wait_until(
        &self,
        server: SocketAddr,
        want: bool,
        deadline: Duration,
    ) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if self.exchange(server, Duration::from_millis(200)) == want {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

fn exchange_from(source: IpAddr, server: SocketAddr, timeout: Duration) -> bool {
    let family = if source.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let Ok(fd) = socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK, None) else {
        return false;
    };
    if bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(SocketAddr::new(source, 0)),
    )
    .is_err()
    {
        return false;
    }
    let _ = connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(server),
    );
    let stream = TcpStream::from(fd);
    // Wait for the non-blocking connect to finish within the timeout.
    let start = Instant::now();
    let mut pollfd = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&stream),
        nix::poll::PollFlags::POLLOUT,
    )];
    let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    if nix::poll::poll(&mut pollfd, nix::poll::PollTimeout::from(millis)).unwrap_or(0) != 1 {
        return false;
    }
    if stream.take_error().ok().flatten().is_some() || stream.peer_addr().is_err() {
        return false;
    }
    let remaining = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    let mut stream = stream;
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(remaining)).is_err() {
        return false;
    }
    let message = b"apimon-probe";
    if stream.write_all(message).is_err() {
        return false;
    }
    let mut echo = [0u8; 12];
    stream.read_exact(&mut echo).is_ok() && &echo == message
}
