//! Whole-system tests of IronClaw and loopback fakes of the outside world.
//!
//! # Trust
//!
//! Test code only; never shipped. It plays the attacker against the real components:
//! hostile segments, wrong keys, and independent implementations of the on-disk format.

#![forbid(unsafe_code)]

pub mod fake_http;
