//! The web, brokered (issue 17): the control plane fetches and searches on an agent's
//! behalf. [`address`] says which addresses may be connected to; [`links`] finds the
//! links of a fetched page on the trusted side.

pub mod address;
pub mod fetch;
pub mod links;
