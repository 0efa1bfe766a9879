//! Where flags come from: the `--config` TOML file beneath the environment beneath the command
//! line. The environment and the file system are handed in, so that tests never read the
//! process's own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, Parser as _};

use super::{Args, Config, ConfigError, invalid};

/// Why no configuration came out.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The flags did not parse, or `--help`/`--version` was asked for: clap prints it and
    /// chooses the exit status.
    #[error(transparent)]
    Flags(#[from] clap::Error),
    #[error("--config: cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// The environment variable that carries `--<long>`: `PHANTOM_AUTHZ_` and the flag in upper
/// snake case.
pub fn env_var(long: &str) -> String {
    format!(
        "PHANTOM_AUTHZ_{}",
        long.to_ascii_uppercase().replace('-', "_")
    )
}

/// Parses and validates `argv` (program name first) over the environment (`env`), over the
/// TOML file named by `--config` or `PHANTOM_AUTHZ_CONFIG` (read with `read`).
pub fn load(
    argv: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Config, LoadError> {
    let merged = merge(argv, env, read)?;
    Ok(Config::from_args(Args::try_parse_from(merged)?)?)
}

/// The effective settings, keyed by flag name without the dashes, as a `--config` file would
/// give them: defaults included, unset options left out, secrets replaced by `***` (and a
/// URL's credentials by `***@`). Saved, with the secrets filled back in, it is a config file.
pub fn settings(
    argv: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Vec<(String, String)>, LoadError> {
    let matches = Args::command().try_get_matches_from(merge(argv, env, read)?)?;
    let mut settings = Vec::new();
    for arg in Args::command().get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if long == "config" {
            continue;
        }
        let Some(mut values) = matches.get_raw(id) else {
            continue;
        };
        let Some(value) = values.next_back() else {
            continue;
        };
        let value = value.to_string_lossy();
        let shown = match long {
            "client-secret" => "***".to_owned(),
            "redis-url" | "idp-proxy" => super::masked_url(&value),
            _ => value.into_owned(),
        };
        settings.push((long.to_owned(), shown));
    }
    Ok(settings)
}

/// The command line with the file's flags and the environment's before it, in that order:
/// later occurrences win.
fn merge(
    argv: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Vec<OsString>, LoadError> {
    let mut argv = argv.into_iter();
    let program = argv.next().unwrap_or_else(|| "phantom-authz".into());
    let command_line: Vec<OsString> = argv.collect();
    let from_env = env_args(env);
    let first = Args::try_parse_from(
        std::iter::once(program.clone())
            .chain(from_env.iter().cloned())
            .chain(command_line.iter().cloned()),
    )?;
    let from_file = match &first.config {
        None => Vec::new(),
        Some(path) => {
            let text = read(path).map_err(|source| LoadError::ReadFile {
                path: path.clone(),
                source,
            })?;
            file_args(&text)?
        }
    };
    Ok(std::iter::once(program)
        .chain(from_file.into_iter().map(OsString::from))
        .chain(from_env)
        .chain(command_line)
        .collect())
}

/// Every flag set in the environment, as `--flag=value`; empty variables count as unset.
fn env_args(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<OsString> {
    Args::command()
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter_map(|long| {
            let value = env(&env_var(long)).filter(|value| !value.is_empty())?;
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(value);
            Some(flag)
        })
        .collect()
}

/// Turns a `--config` TOML document into flags, keyed by flag name without the dashes.
/// Unknown keys are errors, and so is `config` itself.
pub fn file_args(text: &str) -> Result<Vec<String>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        invalid("--config", format!("not valid TOML: {}", e.message()))
    })?;
    let command = Args::command();
    let mut args = Vec::new();
    for (key, value) in table {
        if key == "config" || !command.get_arguments().any(|a| a.get_long() == Some(&key)) {
            return Err(invalid("--config", format!("unknown setting `{key}`")));
        }
        let value = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(n) => n.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(invalid(
                    "--config",
                    format!("`{key}` must be a string, number or boolean"),
                ));
            }
        };
        args.push(format!("--{key}={value}"));
    }
    Ok(args)
}
