//! The password gate: argon2 costs about 19 MiB and tens of milliseconds per check, so checks
//! run on a few dedicated threads (one per core, at most four) with a short queue in front. A
//! sign-in that finds the queue full is refused at once (`Busy`, answered 429 with
//! `Retry-After`) instead of piling up: memory stays bounded by the checking threads (the
//! allocator keeps a freed 19 MiB block per thread that ran a check, so the checks must not
//! wander over the whole blocking pool) and the rest of the branch keeps answering. An unknown
//! user is checked against a dummy hash with the same parameters, so the answer takes as long
//! as for a known one.

use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::{Output, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use rand::RngCore;
use tokio::sync::{mpsc, oneshot};

/// Most checking threads, whatever the machine.
const MAX_PARALLEL: usize = 4;
/// Checks that may wait for a thread, per thread.
const QUEUE_PER_THREAD: usize = 8;

/// The queue is full: try again shortly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

/// One check: the hash (`None`: unknown user), the password, where the answer goes.
struct Check {
    phc: Option<String>,
    password: String,
    answer: oneshot::Sender<bool>,
}

pub struct PasswordGate {
    /// Full queue policy: refuse (`Busy`). The threads stop when the gate is dropped.
    checks: mpsc::Sender<Check>,
}

impl PasswordGate {
    /// `threads` checking threads and room for `queue` checks waiting for one.
    pub fn new(threads: usize, queue: usize) -> Self {
        let (checks, inbox) = mpsc::channel::<Check>(queue.max(1));
        let inbox = Arc::new(Mutex::new(inbox));
        for i in 0..threads.max(1) {
            let inbox = inbox.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("password-check-{i}"))
                .spawn(move || check_loop(&inbox));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-check thread");
            }
        }
        PasswordGate { checks }
    }

    /// Sized for this machine: one thread per core (at most `MAX_PARALLEL`).
    pub fn for_machine() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = cores.clamp(1, MAX_PARALLEL);
        Self::new(threads, threads * QUEUE_PER_THREAD)
    }

    /// Whether `password` matches `phc` (`None`: an unknown user, never matches, same cost).
    /// A check once queued runs to its end even when the caller stops waiting.
    pub async fn verify(&self, phc: Option<String>, password: String) -> Result<bool, Busy> {
        let (answer, answered) = oneshot::channel();
        self.checks.try_send(Check { phc, password, answer }).map_err(|_| Busy)?;
        answered.await.map_err(|_| Busy)
    }
}

fn check_loop(inbox: &Mutex<mpsc::Receiver<Check>>) {
    // argon2's working memory, kept by the thread from one check to the next: allocating it per
    // check lets the allocator spread freed 19 MiB blocks over many arenas.
    let mut memory: Vec<Block> = Vec::new();
    loop {
        // One thread waits on the queue at a time; the others wait for the lock.
        let next = match inbox.lock() {
            Ok(mut inbox) => inbox.blocking_recv(),
            Err(_) => None,
        };
        let Some(check) = next else { return };
        let matches = match &check.phc {
            Some(phc) => verify_with(&check.password, phc, &mut memory),
            None => {
                let _ = verify_with(&check.password, dummy_hash(), &mut memory);
                false
            }
        };
        let _ = check.answer.send(matches);
    }
}

/// Whether `password` matches the PHC string `phc`. A malformed hash still costs one check
/// (against the dummy) and never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    verify_with(password, phc, &mut Vec::new())
}

/// `verify_password` with argon2's working memory in `memory` (grown when a hash needs more).
fn verify_with(password: &str, phc: &str, memory: &mut Vec<Block>) -> bool {
    match hash_with(password, phc, memory) {
        Some((computed, expected)) => computed == expected,
        None => {
            let _ = hash_with(password, dummy_hash(), memory);
            false
        }
    }
}

/// The hash of `password` with the algorithm, parameters and salt of `phc`, and `phc`'s own
/// hash (`Output`'s equality is constant-time); `None` for a malformed `phc`.
fn hash_with(password: &str, phc: &str, memory: &mut Vec<Block>) -> Option<(Output, Output)> {
    let parsed = PasswordHash::new(phc).ok()?;
    let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).ok()?,
        None => Version::default(),
    };
    let params = Params::try_from(&parsed).ok()?;
    let expected = parsed.hash?;
    let mut salt = [0u8; 64];
    let salt = parsed.salt?.decode_b64(&mut salt).ok()?;
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let argon = Argon2::new(algorithm, version, params);
    let computed = Output::init_with(expected.len(), |out| {
        argon
            .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut memory[..])
            .map_err(|_| argon2::password_hash::Error::Crypto)
    })
    .ok()?;
    Some((computed, expected))
}

/// A hash of a random password with the parameters the controller hashes staff passwords with
/// (argon2id defaults), made once.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let mut secret = [0u8; 32];
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut secret);
        rand::rng().fill_bytes(&mut salt);
        let Ok(salt) = SaltString::encode_b64(&salt) else {
            return String::new();
        };
        Argon2::default().hash_password(&secret, &salt).map(|h| h.to_string()).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        // No thread takes checks from this gate's queue: its one place fills and stays full.
        let (checks, _inbox) = mpsc::channel::<Check>(1);
        let gate = PasswordGate { checks };
        let (answer, _) = oneshot::channel();
        gate.checks.try_send(Check { phc: None, password: "x".into(), answer }).unwrap();
        assert_eq!(gate.verify(None, "x".into()).await, Err(Busy));
    }

    #[tokio::test]
    async fn checks_match_only_the_right_password() {
        let gate = PasswordGate::new(1, 2);
        let salt = SaltString::encode_b64(&[7u8; 16]).unwrap();
        let phc = Argon2::default().hash_password(b"right password", &salt).unwrap().to_string();
        assert_eq!(gate.verify(Some(phc.clone()), "right password".into()).await, Ok(true));
        assert_eq!(gate.verify(Some(phc), "wrong".into()).await, Ok(false));
        assert_eq!(gate.verify(None, "right password".into()).await, Ok(false));
        assert_eq!(gate.verify(Some("not a hash".into()), "x".into()).await, Ok(false));
    }

    #[test]
    fn the_dummy_hash_has_the_parameters_of_real_ones() {
        let dummy = PasswordHash::new(dummy_hash()).unwrap();
        let salt = SaltString::encode_b64(&[1u8; 16]).unwrap();
        let real_phc = Argon2::default().hash_password(b"pw", &salt).unwrap().to_string();
        let real = PasswordHash::new(&real_phc).unwrap();
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.params, real.params);
    }
}
