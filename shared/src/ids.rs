//! Newtype identifiers. Codes are validated on construction, so a `SiteCode` in hand is always
//! well formed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ValidationError;

/// A site code such as `SFO`: 2–8 characters, upper-case ASCII letters and digits, starting
/// with a letter. It prefixes human request ids, so it stays short and unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SiteCode(String);

impl SiteCode {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let ok = (2..=8).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_uppercase())
            && s.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ValidationError::new(
                "site",
                format!(
                    "invalid site code {s:?}: use 2-8 upper-case letters or digits, starting with a letter"
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for SiteCode {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<SiteCode> for String {
    fn from(c: SiteCode) -> Self {
        c.0
    }
}

impl FromStr for SiteCode {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SiteCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The code of a configuration object within its site (service, queue, counter, work profile)
/// or a staff username: 1–32 characters of ASCII letters, digits, `-`, `_`, `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Code(String);

impl Code {
    pub fn parse(s: &str) -> Result<Self, ValidationError> {
        let ok = (1..=32).contains(&s.len())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(ValidationError::new(
                "code",
                format!("invalid code {s:?}: use 1-32 letters, digits, '-', '_' or '.'"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Code {
    type Error = ValidationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Code> for String {
    fn from(c: Code) -> Self {
        c.0
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $new:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new() -> Self {
                Self(Uuid::$new())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// One enrolled agent installation. Re-enrolling a site's hardware makes a new `AgentId`
    /// for the same site.
    AgentId,
    new_v4
);
uuid_id!(
    /// A visit, time-ordered (UUIDv7) so ids sort by creation.
    VisitId,
    now_v7
);
uuid_id!(
    /// An appointment booked centrally, time-ordered (UUIDv7) so ids sort by booking.
    AppointmentId,
    now_v7
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_codes() {
        for ok in ["SFO", "CHI2", "AB", "ABCDEFGH"] {
            assert!(SiteCode::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "S", "sfo", "1AB", "ABCDEFGHI", "SF-O", "SFÖ"] {
            assert!(SiteCode::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn codes() {
        for ok in ["A", "acc-1", "counter_2", "x.y"] {
            assert!(Code::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "with space", "ü", &"x".repeat(33)] {
            assert!(Code::parse(bad).is_err(), "{bad}");
        }
    }
}
