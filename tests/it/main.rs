//! One test binary for everything that needs the real services (link time
//! is the cost of each binary on 2 cores).

mod changes;
mod chart;
mod election;
mod faults;
mod journey;
mod kube;
mod kubelet;
mod nats;
mod operator;
mod outages;
mod postgres;
mod relay;
mod security;
mod status;
mod support;
mod types;
