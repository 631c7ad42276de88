//! The per-session proxy: an HTTP/1.1 server on the session's unix socket, the agent's
//! only way out. [`server`] turns hostile bytes into closed requests and bounds what one
//! agent can cost; what each endpoint does is behind [`server::SessionHandler`].

pub mod budget;
pub mod server;
pub mod session;
pub mod turn;
