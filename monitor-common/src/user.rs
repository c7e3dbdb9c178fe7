//! Userspace-only impls: aya's `Pod` marks the types safe to copy in and out of maps.

use crate::datapath::{ActionCounter, DatapathState, IpStats, ListEntry};

// SAFETY: `#[repr(C)]`, only integer fields, no implicit padding (size asserted).
unsafe impl aya::Pod for ActionCounter {}
// SAFETY: as above.
unsafe impl aya::Pod for ListEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for IpStats {}
// SAFETY: as above.
unsafe impl aya::Pod for DatapathState {}
