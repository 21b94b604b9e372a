//! Waking one agent's session when commands were appended to its log.
//!
//! Changes that concern every session (a configuration published, an agent revoked) bump the
//! replica-wide `commands_changed` channel: every session looks at its log and re-checks its
//! credential. Request operations append commands for one or two agents many times a second;
//! waking every session for each of them would cost every session two queries per flush. They
//! wake only the sessions of the agents that got commands, through this registry (and, across
//! replicas, through the agent's id in the PostgreSQL notification's payload).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

/// The live sessions of this replica by agent id (its store key).
#[derive(Default)]
pub struct AgentWakes(Mutex<HashMap<String, watch::Sender<u64>>>);

impl AgentWakes {
    fn map(&self) -> MutexGuard<'_, HashMap<String, watch::Sender<u64>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes a session of `agent`; the registration ends when the returned value drops.
    pub fn subscribe(self: &Arc<Self>, agent: &str) -> AgentWake {
        let rx =
            self.map().entry(agent.to_owned()).or_insert_with(|| watch::Sender::new(0)).subscribe();
        AgentWake { rx, agent: agent.to_owned(), wakes: self.clone() }
    }

    /// Wakes the sessions of `agent` on this replica, if it has any.
    pub fn wake(&self, agent: &str) {
        if let Some(tx) = self.map().get(agent) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Agents with a live session here.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }
}

/// One session's subscription.
pub struct AgentWake {
    rx: watch::Receiver<u64>,
    agent: String,
    wakes: Arc<AgentWakes>,
}

impl AgentWake {
    /// Resolves when the agent was woken since the last call.
    pub async fn changed(&mut self) {
        // The sender lives in the registry for as long as this subscription does.
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for AgentWake {
    fn drop(&mut self) {
        let mut map = self.wakes.map();
        // This subscription is still counted while it drops: remove the entry with the last.
        if map.get(&self.agent).is_some_and(|tx| tx.receiver_count() <= 1) {
            map.remove(&self.agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn only_the_named_agent_is_woken_and_registrations_end_with_the_last_session() {
        let wakes = Arc::new(AgentWakes::default());
        let mut a = wakes.subscribe("a");
        let mut a2 = wakes.subscribe("a");
        let mut b = wakes.subscribe("b");
        wakes.wake("a");
        wakes.wake("nobody");
        assert!(a.changed().now_or_never().is_some());
        assert!(a2.changed().now_or_never().is_some());
        assert!(b.changed().now_or_never().is_none(), "b was not woken");
        assert!(a.changed().now_or_never().is_none(), "one wake, seen once");
        drop(a);
        assert_eq!(wakes.len(), 2, "a still has a session");
        drop(a2);
        drop(b);
        assert!(wakes.is_empty());
    }
}
