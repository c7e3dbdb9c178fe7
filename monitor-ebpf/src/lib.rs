//! Nothing for the host: the programs are the `monitor` binary target, built for bpf.
#![no_std]
