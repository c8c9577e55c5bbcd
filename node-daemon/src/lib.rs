//! moat-node-daemon
