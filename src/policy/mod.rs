//! Policy: who may do what. Today this holds the signing locks (the kill switch); client
//! rules, request rules and rate limits join it as the policy engine grows.

pub mod locks;
