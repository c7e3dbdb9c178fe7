//! Userspace-only impls: aya's `Pod` marks the types safe to copy in and out of maps.

use crate::datapath::{ActionCounter, DatapathState, IpStats, ListEntry, RateConfig, TokenBuckets};

// SAFETY: `#[repr(C)]`, only integer fields, no implicit padding (size asserted).
unsafe impl aya::Pod for ActionCounter {}
// SAFETY: as above.
unsafe impl aya::Pod for ListEntry {}
// SAFETY: as above.
unsafe impl aya::Pod for IpStats {}
// SAFETY: as above.
unsafe impl aya::Pod for DatapathState {}

use crate::capture::{CaptureConfig, FlowBudget, FlowKey, SampleHeader};

// SAFETY: as above.
unsafe impl aya::Pod for SampleHeader {}
// SAFETY: as above.
unsafe impl aya::Pod for CaptureConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowBudget {}

// SAFETY: repr(C) plain old data without padding.
unsafe impl aya::Pod for RateConfig {}
// SAFETY: repr(C) plain old data without padding.
unsafe impl aya::Pod for TokenBuckets {}
