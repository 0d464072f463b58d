//! embedding-service (to be written).
