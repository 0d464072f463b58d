//! Helpers for the integration tests (to be written).
