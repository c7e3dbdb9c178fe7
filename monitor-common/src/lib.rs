//! Types that cross the kernel/userspace boundary.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has no `bool` and no implicit padding
//! (explicit `_pad` fields), and carries a compile-time size assertion so that the
//! kernel and the daemon can never disagree on a layout.
#![no_std]

pub mod capture;
pub mod datapath;
pub mod maps;

#[cfg(feature = "user")]
mod user;
