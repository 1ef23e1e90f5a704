//! kinfer-wrapper: serves a user's Python function over the Open Inference Protocol (v2
//! REST) and KServe v1, running the function in Python worker processes.

pub mod args;
pub mod batch;
pub mod error;
pub mod http;
pub mod ipc;
pub mod metrics;
pub mod pool;
pub mod server;
pub mod tensor;
