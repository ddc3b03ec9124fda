//! Integration tests of the request path over real sockets: an echo backend, the proxy, a client.

mod app_health;
mod cli;
mod common;
mod concurrency;
mod fuzz;
mod hardening;
mod http_features;
mod lifecycle;
mod mtls;
mod reload;
mod routing;
mod seed;
