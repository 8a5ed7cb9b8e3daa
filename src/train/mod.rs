//! Training: configuration, schedules, the trainer and its phases, checkpoints.
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod copies;
pub mod engine;
pub mod grit_run;
pub mod memory;
pub mod run;
pub mod schedule;
