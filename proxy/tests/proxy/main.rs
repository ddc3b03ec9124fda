//! Integration tests of the request path over real sockets: an echo backend, the proxy, a client.

mod bench;
mod cli;
mod common;
mod hardening;
mod fuzz;
mod http_features;
mod lifecycle;
mod reload;
mod routing;
mod seed;
