//! End-to-end tests: the proxy on port 0 in front of the simulated Kommo account.

mod support;

mod accounts;
mod budget;
mod cache;
mod cli;
mod connections;
mod console;
mod fanout;
mod fidelity;
mod fixtures;
mod hardening;
mod keys;
mod limits;
mod ops;
mod overload;
mod passthrough;
mod redis;
mod restart;
mod sync;
mod verify;
