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
