//! Training: configuration, schedules, the loop, checkpoints, metrics.
pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod schedule;
pub mod copies;
pub mod engine;
pub mod grit_run;
pub mod run;
