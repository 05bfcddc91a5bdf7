//! Live views: a replica of each credential's leads, kept fresh from Kommo's change feed, that
//! answers multi-stage views from memory. Pure: [`replica`] holds and indexes, [`view`] decides
//! what a replica can answer, [`feed`] says what to read; [`live`] does the I/O.

pub mod feed;
pub mod live;
pub mod replica;
pub mod view;
