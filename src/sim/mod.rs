//! The simulated Kommo account (placeholder; being written).
