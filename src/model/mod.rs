//! Architectures and their forward graphs. (in progress)
