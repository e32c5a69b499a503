//! Policy: who may do what (ARCHITECTURE §6). Client identification and request rules
//! (`engine`), their config model (`rules`), rate limits, persisted counters and the locks.

pub mod counters;
pub mod engine;
pub mod gate;
pub mod locks;
pub mod rate;
pub mod rules;
