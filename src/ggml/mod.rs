//! Safe wrappers over the ggml FFI used by the training graphs. (in progress)
