//! The project: `rewind.toml` and the migrations directory.

use crate::{EngineError, Result};
use rewind_lens::{MigrationSet, DEFAULT_STAMP};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The name of the configuration file looked for in the current directory.
pub const CONFIG_FILE: &str = "rewind.toml";
/// The default migrations directory.
pub const DEFAULT_MIGRATIONS: &str = "migrations";

/// Settings from `rewind.toml`; every key is optional.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The stamp field's name (default `rewind`).
    pub stamp: String,
    /// The migrations directory (default `migrations`).
    pub migrations: PathBuf,
    /// Users of `rewind serve` in front of embedded stores (none: open).
    pub users: Vec<User>,
}

/// A user of the gateway in front of embedded stores.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// The login name.
    pub name: String,
    /// `salt$hex(sha256(salt + password))`, as `rewind hash-password` prints.
    pub password: String,
    /// The databases the user may sync (`["*"]`: all).
    #[serde(default)]
    pub databases: Vec<String>,
    /// CouchDB-style roles, answered by `_session`.
    #[serde(default)]
    pub roles: Vec<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            stamp: DEFAULT_STAMP.to_owned(),
            migrations: PathBuf::from(DEFAULT_MIGRATIONS),
            users: Vec::new(),
        }
    }
}

impl Config {
    /// Reads `path`, or `rewind.toml` in the current directory when it exists,
    /// or returns the defaults.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None if Path::new(CONFIG_FILE).exists() => PathBuf::from(CONFIG_FILE),
            None => return Ok(Config::default()),
        };
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| {
            // `file:line:column: message`, as migration files report.
            let (line, column) = e.span().map_or((1, 1), |span| {
                let before = text.get(..span.start).unwrap_or(&text);
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                (
                    before.matches('\n').count() + 1,
                    before[line_start..].chars().count() + 1,
                )
            });
            EngineError::Config {
                path: PathBuf::from(format!("{}:{line}:{column}", path.display())),
                reason: e.message().to_owned(),
            }
        })?;
        if config.stamp.is_empty() || config.stamp.starts_with('_') {
            return Err(EngineError::Config {
                path,
                reason: format!(
                    "`stamp = \"{}\"`: the stamp field needs a name that does not start with `_` (CouchDB reserves those)",
                    config.stamp
                ),
            });
        }
        Ok(config)
    }
}

/// A loaded project: its configuration and its checked migration set.
#[derive(Debug, Clone)]
pub struct Project {
    /// The configuration in force.
    pub config: Config,
    /// The migrations directory that was read.
    pub migrations_dir: PathBuf,
    /// The parsed and checked migrations.
    pub migrations: MigrationSet,
}

impl Project {
    /// Loads the configuration and every `*.yaml` / `*.yml` file of the
    /// migrations directory (`migrations_dir` overrides the configuration),
    /// in file-name order. Every malformed file is reported.
    pub fn load(config_path: Option<&Path>, migrations_dir: Option<&Path>) -> Result<Project> {
        let config = Config::load(config_path)?;
        let dir = migrations_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| config.migrations.clone());
        let files = read_migration_files(&dir)?;
        let migrations =
            MigrationSet::parse_files(&files, &config.stamp).map_err(EngineError::Migrations)?;
        Ok(Project {
            config,
            migrations_dir: dir,
            migrations,
        })
    }
}

/// The `(path, text)` of every migration file in `dir`, sorted by name.
pub fn read_migration_files(dir: &Path) -> Result<Vec<(PathBuf, String)>> {
    let io = |source| EngineError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EngineError::Input {
                what: dir.display().to_string(),
                reason: "no such migrations directory (name one with --migrations DIR or \
                         `migrations = \"DIR\"` in rewind.toml; examples/cht holds a set to \
                         start from)"
                    .to_owned(),
            })
        }
        other => other.map_err(io)?,
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io)?.path();
        let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if path.is_file() && is_yaml {
            let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            files.push((path, text));
        }
    }
    files.sort_by(|a, b| a.0.file_name().cmp(&b.0.file_name()));
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A malformed rewind.toml is reported as `file:line:column: reason`.
    #[test]
    fn a_malformed_config_names_its_line_and_column() {
        let dir = std::env::temp_dir().join(format!("rewind-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(CONFIG_FILE);
        let said = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load(Some(&path)).unwrap_err().to_string()
        };
        let shown = path.display();
        assert_eq!(
            said("stamp = \"x\"\n\n[[users]]\nname = \"a\"\n"),
            format!("{shown}:3:1: missing field `password`")
        );
        assert_eq!(
            said("stamp = 3\n"),
            format!("{shown}:1:9: invalid type: integer `3`, expected a string")
        );
        assert!(said("stamp = \"é\"\nfoo = 1\n")
            .starts_with(&format!("{shown}:2:1: unknown field `foo`")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
