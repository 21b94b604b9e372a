//! How both binaries load their settings: defaults < a TOML file < environment variables named
//! `<PREFIX>_<FIELD>` (with `__` between nested fields).

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub fn load<T>(env_prefix: &str, file: Option<&Path>) -> Result<T, config::ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut builder =
        config::Config::builder().add_source(config::Config::try_from(&T::default())?);
    if let Some(file) = file {
        builder = builder.add_source(config::File::from(file).required(true));
    }
    builder
        .add_source(
            config::Environment::with_prefix(env_prefix).prefix_separator("_").separator("__"),
        )
        .build()?
        .try_deserialize()
}

/// Deserializes a list of strings from a TOML array or from one comma-separated string (an
/// environment variable such as `MERIDIAN_CONTROLLER_RELEASE_KEYS=ed25519:…,ed25519:…`).
/// Use with `#[serde(deserialize_with = "…")]`.
pub fn list_or_comma_separated<'de, D>(d: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct ListOrText;
    impl<'de> serde::de::Visitor<'de> for ListOrText {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of strings or one comma-separated string")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element::<String>()? {
                out.push(v);
            }
            Ok(out)
        }
    }
    d.deserialize_any(ListOrText)
}
