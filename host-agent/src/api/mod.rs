//! The management gRPC API.
