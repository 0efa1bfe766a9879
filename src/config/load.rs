//! Where flags come from: the `--config` TOML file beneath the environment beneath the command
//! line. The environment and the file system are handed in, so that tests never read the
//! process's own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, Parser as _};

use super::{Args, Config, ConfigError, invalid};
use crate::route::{PathMatch, Rule, is_audience, parse_scopes};

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
    let (merged, rules) = merge(argv, env, read)?;
    let mut config = Config::from_args(Args::try_parse_from(merged)?)?;
    config.routes.rules = rules;
    Ok(config)
}

/// The effective settings, keyed by flag name without the dashes, as a `--config` file would
/// give them: defaults included, unset options left out, secrets replaced by `***` (and a
/// URL's credentials by `***@`). Saved, with the secrets filled back in, it is a config file.
pub fn settings(
    argv: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<Effective, LoadError> {
    let (merged, rules) = merge(argv, env, read)?;
    let matches = Args::command().try_get_matches_from(merged)?;
    let mut settings = Vec::new();
    for arg in Args::command().get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if long == "config" {
            continue;
        }
        let Some(values) = matches.get_raw(id) else {
            continue;
        };
        let values: Vec<_> = values.map(|value| value.to_string_lossy()).collect();
        // A list flag shows every value; any other flag given twice, the one that wins.
        let value = match (arg.get_value_delimiter(), values.last()) {
            (_, None) => continue,
            (Some(delimiter), Some(_)) => values.join(&delimiter.to_string()).into(),
            (None, Some(last)) => last.clone(),
        };
        let shown = match long {
            "client-secret" => "***".to_owned(),
            "redis-url" => super::masked_urls(&value),
            "idp-proxy" => super::masked_url(&value),
            _ => value.into_owned(),
        };
        settings.push((long.to_owned(), shown));
    }
    Ok(Effective { settings, rules })
}

/// The effective configuration, as `check-config` prints it.
#[derive(Debug)]
pub struct Effective {
    /// Each flag's value, keyed by flag name without the dashes.
    pub settings: Vec<(String, String)>,
    pub rules: Vec<Rule>,
}

/// The command line with the file's flags and the environment's before it, in that order
/// (later occurrences win), and the file's route rules.
fn merge(
    argv: Vec<OsString>,
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<String>,
) -> Result<(Vec<OsString>, Vec<Rule>), LoadError> {
    let mut argv = argv.into_iter();
    let program = argv.next().unwrap_or_else(|| "phantom-authz".into());
    let command_line: Vec<OsString> = argv.collect();
    let from_env = env_args(env);
    let first = Args::try_parse_from(
        std::iter::once(program.clone())
            .chain(from_env.iter().cloned())
            .chain(command_line.iter().cloned()),
    )?;
    let (from_file, rules) = match &first.config {
        None => (Vec::new(), Vec::new()),
        Some(path) => {
            let text = read(path).map_err(|source| LoadError::ReadFile {
                path: path.clone(),
                source,
            })?;
            file_settings(&text)?
        }
    };
    let argv = std::iter::once(program)
        .chain(from_file.into_iter().map(OsString::from))
        .chain(from_env)
        .chain(command_line)
        .collect();
    Ok((argv, rules))
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

/// Turns a `--config` TOML document into flags (keyed by flag name without the dashes) and
/// route rules (`[[route]]`). Unknown keys are errors, and so is `config` itself.
pub fn file_settings(text: &str) -> Result<(Vec<String>, Vec<Rule>), ConfigError> {
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        invalid("--config", format!("not valid TOML: {}", e.message()))
    })?;
    let rules = match table.remove("route") {
        None => Vec::new(),
        Some(toml::Value::Array(rules)) => rules
            .iter()
            .enumerate()
            .map(|(n, rule)| {
                rule_of(rule)
                    .map_err(|problem| invalid("--config", format!("route {}: {problem}", n + 1)))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(invalid(
                "--config",
                "`route` must be an array of tables ([[route]])",
            ));
        }
    };
    Ok((file_args(table)?, rules))
}

/// Flags from the file's plain settings.
fn file_args(table: toml::Table) -> Result<Vec<String>, ConfigError> {
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

/// One `[[route]]` table: `host`, `path` or `path-prefix`, `methods`, `scopes` (an array or a
/// space-separated string) and `audience`, each optional.
fn rule_of(value: &toml::Value) -> Result<Rule, String> {
    let table = value.as_table().ok_or("must be a table")?;
    let text = |key: &str| -> Result<Option<&str>, String> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(text)) => Ok(Some(text.as_str())),
            Some(_) => Err(format!("`{key}` must be a string")),
        }
    };
    for key in table.keys() {
        if ![
            "host",
            "path",
            "path-prefix",
            "methods",
            "scopes",
            "audience",
        ]
        .contains(&key.as_str())
        {
            return Err(format!(
                "unknown key `{key}` (host, path, path-prefix, methods, scopes, audience)"
            ));
        }
    }
    let path = match (text("path")?, text("path-prefix")?) {
        (Some(_), Some(_)) => return Err("give `path` or `path-prefix`, not both".into()),
        (Some(path), None) => PathMatch::Exact(path.to_owned()),
        (None, Some(prefix)) => PathMatch::Prefix(prefix.to_owned()),
        (None, None) => PathMatch::Any,
    };
    if let PathMatch::Exact(path) | PathMatch::Prefix(path) = &path
        && !path.starts_with('/')
    {
        return Err(format!("`{path}` must start with /"));
    }
    let host = text("host")?.map(str::to_owned);
    if host.as_deref().is_some_and(|host| !is_audience(host)) {
        return Err("`host` must be a host name".into());
    }
    let methods = match table.get("methods") {
        None => Vec::new(),
        Some(toml::Value::Array(methods)) => methods
            .iter()
            .map(|method| {
                method
                    .as_str()
                    .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic()))
                    .map(str::to_ascii_uppercase)
                    .ok_or_else(|| "`methods` must be method names".to_owned())
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("`methods` must be an array".into()),
    };
    let scopes = match table.get("scopes") {
        None => Vec::new(),
        Some(toml::Value::String(scopes)) => parse_scopes(scopes)
            .ok_or("`scopes` must be scope tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect(),
        Some(toml::Value::Array(scopes)) => scopes
            .iter()
            .map(|scope| {
                scope
                    .as_str()
                    .filter(|scope| crate::route::is_scope_token(scope))
                    .map(str::to_owned)
                    .ok_or_else(|| "`scopes` must be scope tokens".to_owned())
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("`scopes` must be an array or a string".into()),
    };
    let audience = text("audience")?.map(str::to_owned);
    if audience
        .as_deref()
        .is_some_and(|audience| !is_audience(audience))
    {
        return Err("`audience` must be printable ASCII without spaces".into());
    }
    Ok(Rule {
        host,
        path,
        methods,
        scopes,
        audience,
    })
}

/// A rule as the `[[route]]` table that gives it, for `check-config`.
pub fn rule_toml(rule: &Rule) -> String {
    let quote = |text: &str| serde_json::Value::String(text.to_owned()).to_string();
    let list = |items: &[String]| {
        let items: Vec<String> = items.iter().map(|item| quote(item)).collect();
        format!("[{}]", items.join(", "))
    };
    let mut out = String::from("[[route]]\n");
    if let Some(host) = &rule.host {
        out.push_str(&format!("host = {}\n", quote(host)));
    }
    match &rule.path {
        PathMatch::Any => {}
        PathMatch::Exact(path) => out.push_str(&format!("path = {}\n", quote(path))),
        PathMatch::Prefix(prefix) => out.push_str(&format!("path-prefix = {}\n", quote(prefix))),
    }
    if !rule.methods.is_empty() {
        out.push_str(&format!("methods = {}\n", list(&rule.methods)));
    }
    if !rule.scopes.is_empty() {
        out.push_str(&format!("scopes = {}\n", list(&rule.scopes)));
    }
    if let Some(audience) = &rule.audience {
        out.push_str(&format!("audience = {}\n", quote(audience)));
    }
    out
}
