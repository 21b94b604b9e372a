//! Central statistics. `facts` turns the raw event stream into one row per visit; a projector
//! (see `Store::project_facts`) applies it per agent after a durable cursor, in the same
//! transaction as the facts, so every event counts exactly once and a rebuild from the raw
//! events (cursor reset) reproduces the same facts.

pub mod facts;
