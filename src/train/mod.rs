//! Training: configuration, schedules, the loop, checkpoints, metrics.
pub mod checkpoint;
pub mod config;
pub mod copies;
pub mod engine;
pub mod grit_run;
pub mod metrics;
pub mod run;
pub mod schedule;
