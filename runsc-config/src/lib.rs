//! Turns a sandbox description into an OCI `config.json` and a `runsc` argument list, and
//! checks a spec against the hardening invariants.
//!
//! # Trust
//!
//! Trusted, pure code used by the control plane (as root) and by `ironclaw doctor`. Its
//! inputs come from the control plane's own validated configuration. The generator and
//! checker arrive with the sandbox work (issue 3); until then this crate is empty.

#![forbid(unsafe_code)]
