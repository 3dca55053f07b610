//! A REAPI client backend (placeholder until the grpc module lands).
