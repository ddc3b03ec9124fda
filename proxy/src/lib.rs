#![forbid(unsafe_code)]

pub mod ratelimit;
