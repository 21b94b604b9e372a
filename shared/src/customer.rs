//! Customer fields of a visit: personal data entered at the branch (name, phone, email, note).
//!
//! **Personal data rule:** customer fields never leave the site unless the site's configuration
//! allows it (`Site::share_customer_data`); central statistics work without them. The agent
//! keeps them with the visit and decides, when it records `VISIT_CREATED`, whether the event it
//! queues for the controller carries them.

use serde::{Deserialize, Serialize};

use crate::ValidationErrors;

/// Longest customer name, in characters.
pub const MAX_CUSTOMER_NAME: usize = 120;
/// Longest phone number, in characters.
pub const MAX_CUSTOMER_PHONE: usize = 40;
/// Longest email address, in characters (RFC 5321's path limit).
pub const MAX_CUSTOMER_EMAIL: usize = 254;
/// Longest note, in characters.
pub const MAX_CUSTOMER_NOTE: usize = 500;

/// A visit's customer fields, as stored and as carried in events. Every field is optional and
/// a present field is never empty. Deliberately lenient when read (no `deny_unknown_fields`):
/// an event from a newer agent with more customer fields must still decode. Values are only
/// ever built through [`CustomerInput::validate`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Customer fields as a client sends them (the connector API's `customer` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerInput {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub phone: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
}

impl CustomerInput {
    /// Trims every field and drops empty ones, then checks lengths (in characters), control
    /// characters (a note may span lines) and the email's shape. `Ok(None)` when nothing is
    /// left; otherwise every problem at once, with field paths relative to the customer.
    pub fn validate(self) -> Result<Option<Customer>, ValidationErrors> {
        let mut errs = ValidationErrors::default();
        let mut field = |value: Option<String>, name: &str, max: usize, multiline: bool| {
            let value = value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())?;
            if value.chars().count() > max {
                errs.push(name, format!("at most {max} characters"));
            } else if value.chars().any(|c| c.is_control() && !(multiline && c == '\n')) {
                errs.push(name, "must not contain control characters");
            }
            Some(value)
        };
        let customer = Customer {
            name: field(self.name, "name", MAX_CUSTOMER_NAME, false),
            phone: field(self.phone, "phone", MAX_CUSTOMER_PHONE, false),
            email: field(self.email, "email", MAX_CUSTOMER_EMAIL, false),
            note: field(self.note, "note", MAX_CUSTOMER_NOTE, true),
        };
        if let Some(email) = &customer.email
            && !errs.0.iter().any(|e| e.field == "email")
            && !email_looks_valid(email)
        {
            errs.push("email", "is not an email address (expected name@domain.tld)");
        }
        errs.into_result()?;
        Ok((customer != Customer::default()).then_some(customer))
    }
}

/// A light check, not RFC 5322: one `@`, a non-empty local part, a domain with an inner dot,
/// no whitespace.
fn email_looks_valid(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else { return false };
    !local.is_empty()
        && !domain.contains('@')
        && !email.chars().any(char::is_whitespace)
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, phone: &str, email: &str, note: &str) -> CustomerInput {
        let some = |s: &str| Some(s.to_owned());
        CustomerInput { name: some(name), phone: some(phone), email: some(email), note: some(note) }
    }

    /// `(input, Ok(customer) | Err(fields with a problem))`.
    fn check(given: CustomerInput, expected: Result<Option<Customer>, &[&str]>) {
        let got = given.clone().validate();
        match expected {
            Ok(c) => assert_eq!(got, Ok(c), "{given:?}"),
            Err(fields) => {
                let errs = got.expect_err("must be refused");
                let got: Vec<&str> = errs.0.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(got, fields, "{given:?}: {errs}");
            }
        }
    }

    #[test]
    fn customer_fields_are_trimmed_checked_and_empty_ones_dropped() {
        let full = Customer {
            name: Some("Ada Lovelace".into()),
            phone: Some("+1 (415) 555-0100".into()),
            email: Some("ada@example.org".into()),
            note: Some("wheelchair\nneeds the ramp".into()),
        };
        check(
            input(
                "  Ada Lovelace ",
                "+1 (415) 555-0100",
                "ada@example.org",
                "wheelchair\nneeds the ramp",
            ),
            Ok(Some(full)),
        );
        check(CustomerInput::default(), Ok(None));
        check(input(" ", "", "\t", ""), Ok(None));
        check(
            CustomerInput { name: Some("Grace".into()), ..Default::default() },
            Ok(Some(Customer { name: Some("Grace".into()), ..Default::default() })),
        );
        // Limits count characters, not bytes.
        let at_limit = "é".repeat(MAX_CUSTOMER_NAME);
        check(
            CustomerInput { name: Some(at_limit.clone()), ..Default::default() },
            Ok(Some(Customer { name: Some(at_limit), ..Default::default() })),
        );
        let long = |n: usize| "x".repeat(n + 1);
        check(
            input(
                &long(MAX_CUSTOMER_NAME),
                &long(MAX_CUSTOMER_PHONE),
                &format!("{}@example.org", long(MAX_CUSTOMER_EMAIL)),
                &long(MAX_CUSTOMER_NOTE),
            ),
            Err(&["name", "phone", "email", "note"]),
        );
        for bad in
            ["ada", "@example.org", "ada@", "ada@example", "ada@@example.org", "a da@example.org"]
        {
            check(input("Ada", "", bad, ""), Err(&["email"]));
        }
        for good in ["a@b.co", "ada.lovelace+queue@mail.example.org"] {
            assert!(email_looks_valid(good), "{good}");
        }
        check(input("Ada\u{7}", "", "", "line\u{0}"), Err(&["name", "note"]));
        check(input("Ada\nLovelace", "", "", ""), Err(&["name"]));
    }

    #[test]
    fn input_refuses_unknown_fields_and_stored_form_skips_absent_ones() {
        assert!(serde_json::from_str::<CustomerInput>(r#"{"name":"A","age":3}"#).is_err());
        let c = Customer { name: Some("A".into()), ..Default::default() };
        assert_eq!(serde_json::to_string(&c).expect("json"), r#"{"name":"A"}"#);
        // A newer agent's extra fields still decode.
        let read: Customer = serde_json::from_str(r#"{"name":"A","language":"fr"}"#).expect("read");
        assert_eq!(read, c);
    }
}
