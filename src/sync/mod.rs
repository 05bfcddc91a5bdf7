//! Live views: a replica of one credential's leads, kept fresh from Kommo's change feed, that
//! answers multi-stage views from memory. Pure: [`replica`] holds and indexes, [`view`] decides.

pub mod replica;
pub mod view;
