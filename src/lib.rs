//! kommo-fanout: a drop-in gateway in front of a Kommo (amoCRM) account.
#![forbid(unsafe_code)]

pub mod sim;
