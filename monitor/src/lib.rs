//! apimon: eBPF API traffic monitor and enforcer. `main.rs` only wires these modules.

pub mod audit;
pub mod capture;
pub mod cidr;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod detect;
pub mod enforce;
pub mod events;
pub mod http;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod policy;
pub mod privilege;
pub mod secrets;
pub mod verdict;
