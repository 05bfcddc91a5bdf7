//! Keys clients send instead of a Kommo token (`Authorization: Bearer kfk_...`): each reaches one
//! account with one scope, and the keys file stores only its SHA-256.
//!
//! [`Scope`] says which requests a key may make; [`Keys`] is one read of the keys file;
//! [`WatchedKeys`] re-reads the file when it changes, so a revoked key stops working within
//! about a second (the same document may live in Redis instead, see [`crate::redis::keys`]); [`KeysCommand`] and [`run`] are `kommo-fanout keys add|list|revoke`.
//!
//! ```toml
//! [[key]]
//! name = "grafana"                  # unique in the file; logged instead of the key
//! account = "acme"                  # a name under [accounts] in the config file
//! scope = "leads:read"              # or "read", "write"
//! sha256 = "3f0a...c2"              # 64 hex digits: the SHA-256 of the key
//! created = "2025-01-31T12:00:00Z"  # RFC 3339, or Unix seconds
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Method;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use tracing::{info, warn};

/// What every key starts with: a key is told from a Kommo token (a JWT) at a glance.
pub const PREFIX: &str = "kfk_";

/// Random bytes in a key. 256 bits cannot be guessed, so a plain SHA-256 (no salt, no
/// stretching) is enough to store it, and a lookup costs one hash.
const KEY_BYTES: usize = 32;

/// How often [`WatchedKeys`] looks at the file.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// A file modified this recently is re-read even when its size and time look unchanged: a
/// second edit within the file system's timestamp granularity would otherwise go unseen.
const RACY: Duration = Duration::from_secs(2);

/// The longest key name or account name.
const MAX_NAME: usize = 64;

/// The fields of a `[[key]]` table.
const FIELDS: [&str; 5] = ["name", "account", "scope", "sha256", "created"];

/// What a key may do on its account. Each scope allows everything the one before it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Scope {
    /// GET of leads, one lead, pipelines, one pipeline and their statuses: a dashboard's reads.
    #[value(name = "leads:read")]
    LeadsRead,
    /// Any GET or HEAD.
    Read,
    /// Everything, writes included.
    Write,
}

/// One key of the file: who holds it, which account it reaches, what it may do there.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// Names the key in logs, audit lines and `keys revoke`; unique within the file.
    pub name: String,
    /// The account the key reaches.
    pub account: String,
    /// What the key may do there.
    pub scope: Scope,
    /// When the key was made.
    pub created: SystemTime,
    /// The SHA-256 of the key: all the file holds of it.
    sha256: [u8; 32],
}

/// One read of the keys file, checked completely: names and hashes are unique.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    entries: Vec<KeyEntry>,
}

/// The keys file, re-read in the background when it changes. A file that does not parse keeps
/// the keys read before it.
#[derive(Debug)]
pub struct WatchedKeys {
    /// The file the keys are read from.
    path: PathBuf,
    /// The keys of the last good read. A `RwLock` because every request reads it and only a
    /// reload writes; it is never held across an `.await`.
    current: RwLock<Arc<Keys>>,
    /// Why the file on disk is not what `current` holds, while it is not.
    problem: Mutex<Option<String>>,
    /// When each key name was last presented (Unix seconds), for the console. A `RwLock` of
    /// atomics: a request takes the read lock and stores a number; only a name's first use
    /// writes.
    last_used: RwLock<HashMap<String, Arc<AtomicU64>>>,
}

/// `kommo-fanout keys ...`: make, list and revoke the keys clients send instead of a Kommo
/// token. `--name` and `--scope` have no environment variable: they differ for every key, and
/// an exported name would make a bare `keys revoke` revoke it.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Make a key, store its SHA-256, and print the key once, alone on the last line.
    Add {
        /// The keys file, made when missing (or a `redis://` URL: the keys in that Redis);
        /// `serve --keys-file` reads it.
        #[arg(long, env = "KOMMO_FANOUT_KEYS_FILE")]
        keys_file: PathBuf,
        /// The account the key reaches (a name under `[accounts]` in the config file).
        #[arg(long, env = "KOMMO_FANOUT_ACCOUNT")]
        account: String,
        /// A name for the key, unique in the file; logs and audit lines show it.
        #[arg(long)]
        name: String,
        /// What the key may do.
        #[arg(long, value_enum)]
        scope: Scope,
    },
    /// Print one line per key: name, account, scope, created (never a key or its hash).
    List {
        /// The keys file.
        #[arg(long, env = "KOMMO_FANOUT_KEYS_FILE")]
        keys_file: PathBuf,
    },
    /// Remove a key by name; a proxy reading the file refuses it within about a second.
    Revoke {
        /// The keys file.
        #[arg(long, env = "KOMMO_FANOUT_KEYS_FILE")]
        keys_file: PathBuf,
        /// The name of the key.
        #[arg(long)]
        name: String,
    },
}

// === impl Scope ===

impl Scope {
    /// Every scope, narrowest first.
    pub const ALL: [Scope; 3] = [Scope::LeadsRead, Scope::Read, Scope::Write];

    /// The scope as the file and the command line spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::LeadsRead => "leads:read",
            Scope::Read => "read",
            Scope::Write => "write",
        }
    }

    /// Whether a key of this scope may send `method` to `path`, the path relative to the
    /// account (`/api/v4/leads/5`: no account prefix, no query). The read scopes refuse what
    /// they do not recognise: `..`, doubled slashes and percent-escapes never match.
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        let reads = *method == Method::GET || *method == Method::HEAD;
        match self {
            Scope::LeadsRead => reads && is_leads_read(path),
            Scope::Read => reads,
            Scope::Write => true,
        }
    }

    /// The narrowest scope that allows the request: what a `403` says the client needs.
    pub fn needed(method: &Method, path: &str) -> Scope {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.allows(method, path))
            .unwrap_or(Scope::Write)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown scope {}: the scopes are leads:read, read and write",
                    shown(s)
                )
            })
    }
}

/// `/api/v4/leads`, `/api/v4/leads/{id}`, `/api/v4/leads/pipelines`,
/// `/api/v4/leads/pipelines/{id}`, `.../statuses` and `.../statuses/{id}`, ids in digits, one
/// trailing slash tolerated.
fn is_leads_read(path: &str) -> bool {
    let path = path.strip_suffix('/').unwrap_or(path);
    if path == "/api/v4/leads" {
        return true;
    }
    let Some(rest) = path.strip_prefix("/api/v4/leads/") else {
        return false;
    };
    let id = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let mut segments = rest.split('/');
    let segments: [Option<&str>; 5] = std::array::from_fn(|_| segments.next());
    match segments {
        [Some("pipelines"), None, ..] => true,
        [Some(lead), None, ..] => id(lead),
        [Some("pipelines"), Some(pipeline), None, ..] => id(pipeline),
        [Some("pipelines"), Some(pipeline), Some("statuses"), None, None] => id(pipeline),
        [Some("pipelines"), Some(pipeline), Some("statuses"), Some(status), None] => {
            id(pipeline) && id(status)
        }
        _ => false,
    }
}

// === impl KeyEntry ===

impl KeyEntry {
    /// One `[[key]]` table, every field checked.
    fn from_toml(value: toml::Value) -> Result<KeyEntry, String> {
        let toml::Value::Table(table) = value else {
            return Err("not a table".into());
        };
        if let Some(other) = table.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(format!(
                "unknown field {} (the fields are {})",
                shown(other),
                FIELDS.join(", ")
            ));
        }
        let text = |field: &str| match table.get(field) {
            Some(toml::Value::String(s)) => Ok(s.as_str()),
            Some(_) => Err(format!("`{field}` must be a string")),
            None => Err(format!("`{field}` is missing")),
        };
        let name = text("name")?;
        check_name(name, true).map_err(|why| format!("`name`: {why}"))?;
        let account = text("account")?;
        check_name(account, false).map_err(|why| format!("`account`: {why}"))?;
        let scope = text("scope")?
            .parse()
            .map_err(|e| format!("`scope`: {e}"))?;
        let sha256 = parse_hex(text("sha256")?)
            .ok_or("`sha256` must be 64 hex digits: the SHA-256 of the key, not the key")?;
        let created = table.get("created").ok_or("`created` is missing")?;
        let created = parse_created(created).ok_or(
            "`created` must be an RFC 3339 time such as 2025-01-31T12:00:00Z, or Unix seconds",
        )?;
        Ok(KeyEntry {
            name: name.to_owned(),
            account: account.to_owned(),
            scope,
            created,
            sha256,
        })
    }
}

/// Leaves out the hash: it is not the key, but nothing prints even that.
impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("name", &self.name)
            .field("account", &self.account)
            .field("scope", &self.scope)
            .field("created", &humantime::format_rfc3339_seconds(self.created))
            .finish_non_exhaustive()
    }
}

// === impl Keys ===

impl Keys {
    /// Reads and checks the keys file. Errors name the file and the `[[key]]` entry.
    pub fn load(path: impl AsRef<Path>) -> Result<Keys, String> {
        let path = path.as_ref();
        let text = fs::read_to_string(path)
            .map_err(|e| format!("keys file {}: cannot read it: {e}", path.display()))?;
        Keys::parse(&text, path)
    }

    /// The entry of the presented bearer value, if it is a key in the file. The value is hashed
    /// and compared with every entry's hash without an early exit, so the time taken says
    /// nothing about which hashes exist or how close a guess came.
    pub fn find(&self, presented: &str) -> Option<&KeyEntry> {
        let hash = sha256(presented.as_bytes());
        let mut found = None;
        for entry in &self.entries {
            let equal = same_hash(&hash, &entry.sha256);
            if equal {
                found = Some(entry);
            }
        }
        found
    }

    /// Every key, in the file's order.
    pub fn entries(&self) -> &[KeyEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn parse(text: &str, path: &Path) -> Result<Keys, String> {
        let in_file = |why: String| format!("keys file {}: {why}", path.display());
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| in_file(toml_error(text, &e)))?;
        let list = match table.remove("key") {
            None => Vec::new(),
            Some(toml::Value::Array(list)) => list,
            Some(_) => return Err(in_file("`key` must be [[key]] tables".into())),
        };
        if let Some(other) = table.keys().next() {
            return Err(in_file(format!(
                "unknown key {}: the file holds only [[key]] tables",
                shown(other)
            )));
        }
        let mut keys = Keys::default();
        for (i, value) in list.into_iter().enumerate() {
            let label = match value.get("name").and_then(toml::Value::as_str) {
                Some(name) if check_name(name, true).is_ok() => {
                    format!("[[key]] #{} (`{name}`)", i + 1)
                }
                _ => format!("[[key]] #{}", i + 1),
            };
            let entry =
                KeyEntry::from_toml(value).map_err(|why| in_file(format!("{label}: {why}")))?;
            for (j, seen) in keys.entries.iter().enumerate() {
                if seen.name == entry.name {
                    return Err(in_file(format!(
                        "{label}: [[key]] #{} has the same name",
                        j + 1
                    )));
                }
                if seen.sha256 == entry.sha256 {
                    return Err(in_file(format!(
                        "{label}: [[key]] #{} has the same sha256",
                        j + 1
                    )));
                }
            }
            keys.entries.push(entry);
        }
        Ok(keys)
    }

    /// The file's text, as `keys add` and `keys revoke` write it.
    fn to_toml(&self) -> Result<String, String> {
        #[derive(Serialize)]
        struct Document<'a> {
            key: Vec<Record<'a>>,
        }
        #[derive(Serialize)]
        struct Record<'a> {
            name: &'a str,
            account: &'a str,
            scope: &'static str,
            sha256: String,
            created: String,
        }
        let document = Document {
            key: self
                .entries
                .iter()
                .map(|e| Record {
                    name: &e.name,
                    account: &e.account,
                    scope: e.scope.as_str(),
                    sha256: hex(&e.sha256),
                    created: humantime::format_rfc3339_seconds(e.created).to_string(),
                })
                .collect(),
        };
        let body = toml::to_string(&document).map_err(|e| format!("cannot write the keys: {e}"))?;
        Ok(format!(
            "# Clients' keys for kommo-fanout: only each key's SHA-256 is stored. Written by\n\
             # `kommo-fanout keys add` and `keys revoke`, which do not keep comments.\n\n{body}"
        ))
    }
}

// === impl WatchedKeys ===

impl WatchedKeys {
    /// Reads the file (failing if it cannot be read or checked) and starts re-reading it about
    /// once a second on the current Tokio runtime, until the returned handle is dropped.
    pub fn start(path: impl Into<PathBuf>) -> Result<Arc<WatchedKeys>, String> {
        WatchedKeys::start_every(path.into(), RELOAD_EVERY)
    }

    fn start_every(path: PathBuf, every: Duration) -> Result<Arc<WatchedKeys>, String> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            format!(
                "keys file {}: watching it needs a Tokio runtime",
                path.display()
            )
        })?;
        if let Some(url) = crate::redis::keys::url(&path) {
            let keys = load(&path)?;
            let conn = crate::redis::keys::connect(url)?;
            let watched = WatchedKeys::new(path, keys);
            runtime.spawn(watch_redis(Arc::downgrade(&watched), conn, every));
            return Ok(watched);
        }
        let mut seen = Seen::default();
        let keys = match seen.recheck(&path) {
            Change::Loaded(keys) => keys,
            Change::Invalid(why) => return Err(why),
            // Nothing was seen before, so a first look parses whatever it reads.
            Change::Unchanged => return Err(format!("keys file {}: not read", path.display())),
        };
        let watched = WatchedKeys::new(path, keys);
        runtime.spawn(watch(Arc::downgrade(&watched), seen, every));
        Ok(watched)
    }

    fn new(path: PathBuf, keys: Keys) -> Arc<WatchedKeys> {
        Arc::new(WatchedKeys {
            path,
            current: RwLock::new(Arc::new(keys)),
            problem: Mutex::new(None),
            last_used: RwLock::default(),
        })
    }

    /// The keys of the last good read of the file.
    pub fn current(&self) -> Arc<Keys> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why the file on disk is not in use (it cannot be read or does not parse), while that
    /// lasts; the keys read before it stay in use.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Notes that the key `name` was presented now.
    pub fn touch(&self, name: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(at) = self
            .last_used
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            at.store(now, Ordering::Relaxed);
            return;
        }
        self.last_used
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .store(now, Ordering::Relaxed);
    }

    /// When the key `name` was last presented (Unix seconds), if it was since the start.
    pub fn last_used(&self, name: &str) -> Option<u64> {
        self.last_used
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map(|at| at.load(Ordering::Relaxed))
    }

    /// The file the keys are read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn apply(&self, change: Change) {
        let mut problem = self.problem.lock().unwrap_or_else(PoisonError::into_inner);
        match change {
            Change::Unchanged => {}
            Change::Loaded(keys) => {
                info!(file = %self.path.display(), keys = keys.len(), "keys file reloaded");
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                *problem = None;
            }
            Change::Invalid(why) => {
                // Once per problem, not once a second while it lasts.
                if problem.as_deref() != Some(why.as_str()) {
                    warn!(file = %self.path.display(), reason = %why,
                          "keys file not reloaded: the keys read before stay in use");
                    *problem = Some(why);
                }
            }
        }
    }
}

/// Re-reads the file every `every` while the [`WatchedKeys`] lives.
async fn watch(watched: Weak<WatchedKeys>, mut seen: Seen, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(path) = watched.upgrade().map(|w| w.path.clone()) else {
            return;
        };
        // File reads block: off the runtime's worker threads.
        let checked = tokio::task::spawn_blocking(move || {
            let change = seen.recheck(&path);
            (seen, change)
        })
        .await;
        let Some(watched) = watched.upgrade() else {
            return;
        };
        match checked {
            Ok((next, change)) => {
                seen = next;
                watched.apply(change);
            }
            Err(e) => {
                warn!(file = %watched.path.display(), error = %e, "keys file check failed");
                seen = Seen::default();
            }
        }
    }
}

/// Reads the keys in Redis every `every` while the [`WatchedKeys`] lives; a document that did
/// not change is not parsed again.
async fn watch_redis(
    watched: Weak<WatchedKeys>,
    conn: redis::aio::ConnectionManager,
    every: Duration,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut seen = None;
    loop {
        ticks.tick().await;
        let read = crate::redis::keys::read(&conn).await;
        let Some(watched) = watched.upgrade() else {
            return;
        };
        let change = match read {
            Ok(text) => {
                let text = text.unwrap_or_default();
                let content = sha256(text.as_bytes());
                if seen == Some(content) {
                    Change::Unchanged
                } else {
                    seen = Some(content);
                    match Keys::parse(&text, &watched.path) {
                        Ok(keys) => Change::Loaded(keys),
                        Err(why) => Change::Invalid(why),
                    }
                }
            }
            Err(e) => {
                seen = None;
                Change::Invalid(format!("keys in {}: {e}", watched.path.display()))
            }
        };
        watched.apply(change);
    }
}

/// What the watcher last read: the file's metadata, compared first so that an unchanged file
/// costs one `stat`, and its content's hash, which decides whether to parse again.
#[derive(Debug, Default)]
struct Seen {
    stamp: Option<Stamp>,
    /// `None` after a failed read, so the next good read is parsed whatever it holds.
    content: Option<[u8; 32]>,
}

/// Size, modification time and (on Unix) inode: a write through a rename changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

/// What a look at the file found.
enum Change {
    Unchanged,
    Loaded(Keys),
    Invalid(String),
}

impl Seen {
    fn recheck(&mut self, path: &Path) -> Change {
        let failed = |seen: &mut Seen, why: String| {
            *seen = Seen::default();
            Change::Invalid(format!("keys file {}: {why}", path.display()))
        };
        let stamp = match fs::metadata(path) {
            Ok(meta) => Stamp::of(&meta),
            Err(e) => return failed(self, format!("cannot read it: {e}")),
        };
        if self.stamp == Some(stamp) && !stamp.recent() {
            return Change::Unchanged;
        }
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) => return failed(self, format!("cannot read it: {e}")),
        };
        let content = sha256(&bytes);
        if self.content == Some(content) {
            self.stamp = Some(stamp);
            return Change::Unchanged;
        }
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return failed(self, "not UTF-8 text".into());
        };
        match Keys::parse(text, path) {
            Ok(keys) => {
                *self = Seen {
                    stamp: Some(stamp),
                    content: Some(content),
                };
                Change::Loaded(keys)
            }
            Err(why) => {
                // Remembered, so the same broken content is not parsed again every second.
                *self = Seen {
                    stamp: Some(stamp),
                    content: Some(content),
                };
                Change::Invalid(why)
            }
        }
    }
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0;
        Stamp {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        }
    }

    /// Modified within [`RACY`] (or in the future, or at an unknown time).
    fn recent(&self) -> bool {
        self.modified
            .and_then(|m| m.elapsed().ok())
            .is_none_or(|age| age < RACY)
    }
}

// === the `keys` command ===

/// Runs a `keys` command; `Ok` is what to print on stdout. Only `add` prints a key, alone on
/// its output's last line.
pub fn run(cmd: KeysCommand) -> Result<String, String> {
    match cmd {
        KeysCommand::Add {
            keys_file,
            account,
            name,
            scope,
        } => add(&keys_file, &account, &name, scope),
        KeysCommand::List { keys_file } => list(&keys_file),
        KeysCommand::Revoke { keys_file, name } => revoke(&keys_file, &name),
    }
}

fn add(path: &Path, account: &str, name: &str, scope: Scope) -> Result<String, String> {
    check_name(name, true).map_err(|why| format!("--name {name}: {why}"))?;
    check_name(account, false).map_err(|why| format!("--account {account}: {why}"))?;
    let key = new_key()?;
    let sha256 = sha256(key.as_bytes());
    update(path, true, |keys| {
        if keys.entries.iter().any(|e| e.name == name) {
            return Err(format!(
                "--name {name}: {} already has a key of that name (revoke it first, or choose \
                 another name)",
                path.display()
            ));
        }
        keys.entries.push(KeyEntry {
            name: name.to_owned(),
            account: account.to_owned(),
            scope,
            created: now_in_seconds(),
            sha256,
        });
        Ok(())
    })?;
    Ok(format!(
        "added key `{name}` (account {account}, scope {scope}) to {}\n\
         only its SHA-256 is stored: the key is shown once, on the next line\n{key}\n",
        path.display()
    ))
}

/// Reads the keys (none when there are none yet and `create` allows it), applies `change`, and writes them back so
/// that no other command's change is lost: under the file's lock, or by compare-and-set in
/// Redis (tried again when another command changed the keys in between).
fn update(
    path: &Path,
    create: bool,
    change: impl Fn(&mut Keys) -> Result<(), String>,
) -> Result<(), String> {
    let Some(url) = crate::redis::keys::url(path) else {
        let _lock = lock(path)?;
        let mut keys = match fs::read_to_string(path) {
            Ok(text) => Keys::parse(&text, path)?,
            Err(e) if create && e.kind() == io::ErrorKind::NotFound => Keys::default(),
            Err(e) => return Err(format!("keys file {}: cannot read it: {e}", path.display())),
        };
        change(&mut keys)?;
        return write_atomic(path, &keys.to_toml()?);
    };
    for _ in 0..10 {
        let old = redis_read(url)?;
        let mut keys = match &old {
            Some(text) => Keys::parse(text, path)?,
            None => Keys::default(),
        };
        change(&mut keys)?;
        let (new, at) = (keys.to_toml()?, url.to_string());
        let swapped = crate::redis::keys::blocking(move || async move {
            let conn = crate::redis::keys::connect(&at)?;
            crate::redis::keys::swap(&conn, old.as_deref(), &new).await
        })?;
        if swapped {
            return Ok(());
        }
    }
    Err(format!(
        "keys in {url}: changed by others ten times while this command ran; run it again"
    ))
}

/// The keys document of `path` (a file, or a Redis URL), read now.
fn load(path: &Path) -> Result<Keys, String> {
    let Some(url) = crate::redis::keys::url(path) else {
        return Keys::load(path);
    };
    Keys::parse(&redis_read(url)?.unwrap_or_default(), path)
}

/// The keys document in the Redis of `url`, read on a connection of its own.
fn redis_read(url: &str) -> Result<Option<String>, String> {
    let url = url.to_string();
    crate::redis::keys::blocking(move || async move {
        let conn = crate::redis::keys::connect(&url)?;
        crate::redis::keys::read(&conn).await
    })
}

fn list(path: &Path) -> Result<String, String> {
    let keys = load(path)?;
    Ok(keys
        .entries
        .iter()
        .map(|e| {
            format!(
                "{}\t{}\t{}\t{}\n",
                e.name,
                e.account,
                e.scope,
                humantime::format_rfc3339_seconds(e.created)
            )
        })
        .collect())
}

fn revoke(path: &Path, name: &str) -> Result<String, String> {
    let revoked = std::sync::Mutex::new(None);
    update(path, false, |keys| {
        let Some(at) = keys.entries.iter().position(|e| e.name == name) else {
            return Err(format!(
                "--name {name}: {} has no key of that name (`keys list` shows them)",
                path.display()
            ));
        };
        *revoked.lock().unwrap_or_else(PoisonError::into_inner) = Some(keys.entries.remove(at));
        Ok(())
    })?;
    let revoked = revoked.into_inner().unwrap_or_else(PoisonError::into_inner);
    let account = revoked.map(|r| r.account).unwrap_or_default();
    Ok(format!(
        "revoked key `{name}` (account {account}) in {}: a proxy reading the keys refuses it \
         within about a second\n",
        path.display()
    ))
}

/// Takes the lock file beside the keys file (`.NAME.lock`), held until the returned file is
/// dropped: two commands that both read the file would otherwise have the second write undo
/// the first's change, a revoke among them.
fn lock(path: &Path) -> Result<File, String> {
    let lock_path = beside(path, ".lock")?;
    let file = private_options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| {
            format!(
                "keys file {}: cannot open its lock file {}: {e}",
                path.display(),
                lock_path.display()
            )
        })?;
    file.lock().map_err(|e| {
        format!(
            "keys file {}: cannot lock {}: {e}",
            path.display(),
            lock_path.display()
        )
    })?;
    Ok(file)
}

fn write_atomic(path: &Path, text: &str) -> Result<(), String> {
    write_private(path, text.as_bytes())
        .map_err(|e| format!("keys file {}: cannot write it: {e}", path.display()))
}

/// Replaces the file (owner-only) so that a reader sees the old or the new bytes, never a
/// part, and a crash leaves one of them: a temporary file in the same directory, fsynced,
/// renamed over the file, then the directory fsynced so the rename itself survives a crash.
/// The keys file and the OAuth tokens file are written so.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut suffix = [0u8; 8];
    random(&mut suffix).map_err(io::Error::other)?;
    let temporary = beside(path, &format!(".{}.tmp", hex(&suffix))).map_err(io::Error::other)?;
    let written = write_and_rename(&temporary, path, bytes);
    if written.is_err() {
        // Gone already when the rename succeeded.
        let _ = fs::remove_file(&temporary);
    }
    written
}

fn write_and_rename(temporary: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = private_options()
        .write(true)
        .create_new(true)
        .open(temporary)?;
    // The mode given at creation is narrowed by the umask; this sets it exactly.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(temporary, path)?;
    #[cfg(unix)]
    File::open(directory(path))?.sync_all()?;
    Ok(())
}

/// Options of a file only its owner may read (on Unix).
fn private_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
}

/// `.NAME<suffix>` in the file's directory.
fn beside(path: &Path, suffix: &str) -> Result<PathBuf, String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    Ok(directory(path).join(format!(".{}{suffix}", name.to_string_lossy())))
}

fn directory(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

// === small pieces ===

/// Whether a bearer value is spelled as a key, not as a Kommo token; whether it is one is
/// for [`Keys::find`] to say.
pub fn looks_like_key(bearer: &str) -> bool {
    bearer.starts_with(PREFIX)
}

/// A new key: [`PREFIX`] and [`KEY_BYTES`] random bytes in unpadded base64url.
fn new_key() -> Result<String, String> {
    let mut bytes = [0u8; KEY_BYTES];
    random(&mut bytes)?;
    Ok(format!("{PREFIX}{}", base64url(&bytes)))
}

fn random(buf: &mut [u8]) -> Result<(), String> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| "the system's random number generator failed".to_string())
}

/// The SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Compares without an early exit, so the time taken says nothing about where hashes differ.
pub(crate) fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Unpadded base64url (RFC 4648 §5): safe in a header, a URL and a shell word.
fn base64url(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let digits = s.as_bytes();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        if !pair.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Names and accounts are logged and appear in paths: letters, digits, `-` and `_` (and `.`
/// in key names, not first), at most [`MAX_NAME`].
fn check_name(s: &str, dots: bool) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (dots && c == '.');
    if s.is_empty() || s.len() > MAX_NAME || !s.chars().all(allowed) || s.starts_with('.') {
        let extra = if dots { ", `.` (not first)" } else { "" };
        return Err(format!("1 to {MAX_NAME} letters, digits, `-`, `_`{extra}"));
    }
    Ok(())
}

/// A value from the file, quoted in an error only when short: a key pasted in the wrong place
/// must not reach a log line.
fn shown(s: &str) -> String {
    if s.len() <= 24 && !s.starts_with(PREFIX) && s.chars().all(|c| !c.is_control()) {
        format!("`{s}`")
    } else {
        format!("({} characters)", s.chars().count())
    }
}

/// A TOML syntax error as its line and message, without the excerpt of the file `toml` would
/// quote (it might be a key pasted by mistake).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text
                .get(..span.start)
                .map_or(0, |before| before.matches('\n').count())
                + 1;
            format!("not valid TOML at line {line}: {}", e.message())
        }
        None => format!("not valid TOML: {}", e.message()),
    }
}

/// `created`: RFC 3339 (a string or a TOML date-time, with an offset) or Unix seconds.
fn parse_created(value: &toml::Value) -> Option<SystemTime> {
    match value {
        toml::Value::Integer(secs) => {
            UNIX_EPOCH.checked_add(Duration::from_secs(u64::try_from(*secs).ok()?))
        }
        toml::Value::String(s) => parse_rfc3339(s),
        toml::Value::Datetime(d) => parse_rfc3339(&d.to_string()),
        _ => None,
    }
}

/// `humantime` reads only UTC (`Z` or `+00:00`); another offset is applied here.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let Some((at, east)) = utc_offset(s) else {
        return humantime::parse_rfc3339(s).ok();
    };
    let local = humantime::parse_rfc3339(&format!("{}Z", &s[..at])).ok()?;
    let shift = Duration::from_secs(east.unsigned_abs());
    if east >= 0 {
        local.checked_sub(shift)
    } else {
        local.checked_add(shift)
    }
}

/// Where a trailing `+HH:MM` or `-HH:MM` starts, and its seconds east of UTC.
fn utc_offset(s: &str) -> Option<(usize, i64)> {
    let at = s.len().checked_sub(6).filter(|&at| at >= 19)?;
    let tail = s.get(at..)?.as_bytes();
    let sign = match tail[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = [tail[1], tail[2], tail[4], tail[5]];
    if tail[3] != b':' || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number = |i: usize| i64::from(digits[i] - b'0') * 10 + i64::from(digits[i + 1] - b'0');
    let (hours, minutes) = (number(0), number(2));
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some((at, sign * (hours * 3600 + minutes * 60)))
}

/// Now, whole seconds: what the file keeps.
fn now_in_seconds() -> SystemTime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn add_key(path: &Path, account: &str, name: &str, scope: Scope) -> String {
        let out = run(KeysCommand::Add {
            keys_file: path.to_owned(),
            account: account.into(),
            name: name.into(),
            scope,
        })
        .unwrap();
        out.lines().last().unwrap().to_owned()
    }

    fn list_keys(path: &Path) -> String {
        run(KeysCommand::List {
            keys_file: path.to_owned(),
        })
        .unwrap()
    }

    fn revoke_key(path: &Path, name: &str) -> Result<String, String> {
        run(KeysCommand::Revoke {
            keys_file: path.to_owned(),
            name: name.into(),
        })
    }

    /// Waits for `check` to hold, polling, for at most 5 s.
    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "not within 5 s: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn add_list_revoke_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let out = run(KeysCommand::Add {
            keys_file: path.clone(),
            account: "acme".into(),
            name: "grafana".into(),
            scope: Scope::LeadsRead,
        })
        .unwrap();
        let key = out.lines().last().unwrap();
        assert!(key.starts_with(PREFIX) && looks_like_key(key), "{out}");
        assert_eq!(key.len(), PREFIX.len() + 43);
        assert!(key[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(out.matches(key).count(), 1, "the key appears once: {out}");

        let keys = Keys::load(&path).unwrap();
        let entry = keys.find(key).unwrap();
        assert_eq!(
            (entry.name.as_str(), entry.account.as_str(), entry.scope),
            ("grafana", "acme", Scope::LeadsRead)
        );
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&key[PREFIX.len()..]), "{text}");
        assert!(text.contains(&hex(&sha256(key.as_bytes()))), "{text}");
        assert!(!format!("{keys:?}").contains(&hex(&sha256(key.as_bytes()))));

        let other = add_key(&path, "beta", "ops.writer", Scope::Write);
        assert_ne!(other, key);
        let listed = list_keys(&path);
        let lines: Vec<&str> = listed.lines().collect();
        assert_eq!(lines.len(), 2, "{listed}");
        let fields: Vec<&str> = lines[0].split('\t').collect();
        assert_eq!(&fields[..3], ["grafana", "acme", "leads:read"]);
        assert!(humantime::parse_rfc3339(fields[3]).is_ok(), "{listed}");
        assert!(
            lines[1].starts_with("ops.writer\tbeta\twrite\t"),
            "{listed}"
        );
        assert!(!listed.contains(&hex(&sha256(key.as_bytes()))));

        let out = revoke_key(&path, "grafana").unwrap();
        assert!(out.contains("grafana") && !out.contains(key), "{out}");
        let keys = Keys::load(&path).unwrap();
        assert!(keys.find(key).is_none());
        assert_eq!(keys.find(&other).unwrap().name, "ops.writer");
        assert_eq!(list_keys(&path).lines().count(), 1);
        revoke_key(&path, "ops.writer").unwrap();
        assert!(Keys::load(&path).unwrap().is_empty());
        assert_eq!(list_keys(&path), "");
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_written_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        add_key(&path, "acme", "grafana", Scope::Read);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Only the file and its lock: no temporary file left behind.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".keys.toml.lock", "keys.toml"]);
    }

    #[test]
    fn duplicate_names_and_unknown_revokes_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        add_key(&path, "acme", "grafana", Scope::LeadsRead);
        let before = fs::read_to_string(&path).unwrap();
        let e = run(KeysCommand::Add {
            keys_file: path.clone(),
            account: "other".into(),
            name: "grafana".into(),
            scope: Scope::Read,
        })
        .unwrap_err();
        assert!(
            e.contains("--name grafana") && e.contains("already has a key of that name"),
            "{e}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), before);

        let e = revoke_key(&path, "metabase").unwrap_err();
        assert!(
            e.contains("--name metabase") && e.contains("has no key of that name"),
            "{e}"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), before);

        let e = revoke_key(&dir.path().join("missing.toml"), "grafana").unwrap_err();
        assert!(
            e.contains("missing.toml") && e.contains("cannot read it"),
            "{e}"
        );

        let e = run(KeysCommand::Add {
            keys_file: path.clone(),
            account: "acme/x".into(),
            name: "n".into(),
            scope: Scope::Read,
        })
        .unwrap_err();
        assert!(e.starts_with("--account acme/x:"), "{e}");
    }

    #[test]
    fn find_refuses_a_wrong_key_of_equal_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let key = add_key(&path, "acme", "grafana", Scope::LeadsRead);
        let keys = Keys::load(&path).unwrap();
        let mut wrong = key.clone().into_bytes();
        let last = wrong.len() - 1;
        wrong[last] = if wrong[last] == b'A' { b'B' } else { b'A' };
        let wrong = String::from_utf8(wrong).unwrap();
        assert_eq!(wrong.len(), key.len());
        assert!(keys.find(&wrong).is_none());
        assert!(keys.find("").is_none());
        assert!(keys.find(&hex(&sha256(key.as_bytes()))).is_none());
        assert!(keys.find(&key).is_some());
    }

    #[test]
    fn scopes_allow_exactly_the_listed_requests() {
        let (get, head, post, patch, delete) = (
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
        );
        let cases = [
            (&get, "/api/v4/leads", Scope::LeadsRead),
            (&get, "/api/v4/leads/", Scope::LeadsRead),
            (&head, "/api/v4/leads", Scope::LeadsRead),
            (&get, "/api/v4/leads/123", Scope::LeadsRead),
            (&get, "/api/v4/leads/123/", Scope::LeadsRead),
            (&get, "/api/v4/leads/pipelines", Scope::LeadsRead),
            (&get, "/api/v4/leads/pipelines/5", Scope::LeadsRead),
            (&get, "/api/v4/leads/pipelines/5/statuses", Scope::LeadsRead),
            (
                &get,
                "/api/v4/leads/pipelines/5/statuses/7",
                Scope::LeadsRead,
            ),
            (
                &get,
                "/api/v4/leads/pipelines/5/statuses/7/",
                Scope::LeadsRead,
            ),
            (&get, "/api/v4/leads/unsorted", Scope::Read),
            (&get, "/api/v4/leads/notes", Scope::Read),
            (&get, "/api/v4/leads/123/notes", Scope::Read),
            (&get, "/api/v4/leads/pipelines/x", Scope::Read),
            (&get, "/api/v4/leads/pipelines/5/statuses/x", Scope::Read),
            (
                &get,
                "/api/v4/leads/pipelines/5/statuses/7/more",
                Scope::Read,
            ),
            (&get, "/api/v4/leads/pipelines/5/other", Scope::Read),
            (&get, "/api/v4/leads//", Scope::Read),
            (&get, "/api/v4/leads//5", Scope::Read),
            (&get, "/api/v4/leads/-5", Scope::Read),
            (&get, "/api/v4/leads/%35", Scope::Read),
            (&get, "/api/v4/leads/../contacts", Scope::Read),
            (&get, "/api/v4/leadsx", Scope::Read),
            (&get, "/API/V4/LEADS", Scope::Read),
            (&get, "/api/v4/leads?limit=5", Scope::Read),
            (&get, "/api/v4/contacts", Scope::Read),
            (&head, "/api/v4/account", Scope::Read),
            (&post, "/api/v4/leads", Scope::Write),
            (&patch, "/api/v4/leads/123", Scope::Write),
            (&delete, "/api/v4/leads/pipelines/5", Scope::Write),
            (&Method::OPTIONS, "/api/v4/leads", Scope::Write),
        ];
        for (method, path, needed) in cases {
            assert_eq!(Scope::needed(method, path), needed, "{method} {path}");
            for scope in Scope::ALL {
                assert_eq!(
                    scope.allows(method, path),
                    scope >= needed,
                    "{scope} {method} {path}"
                );
            }
        }
    }

    #[test]
    fn scopes_parse_and_name_the_valid_ones() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
            assert_eq!(scope.to_string(), scope.as_str());
        }
        let e = "admin".parse::<Scope>().unwrap_err();
        assert!(
            e.contains("`admin`") && e.contains("leads:read, read and write"),
            "{e}"
        );
    }

    #[test]
    fn the_file_is_checked_entry_by_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let hash = hex(&sha256(b"kfk_example"));
        let entry = |name: &str, extra: &str| {
            format!(
                "[[key]]\nname = \"{name}\"\naccount = \"acme\"\nscope = \"read\"\n\
                 sha256 = \"{hash}\"\ncreated = 1700000000\n{extra}"
            )
        };
        let load = |text: &str| {
            fs::write(&path, text).unwrap();
            Keys::load(&path)
        };
        let keys = load(&entry("a", "")).unwrap();
        assert_eq!(keys.find("kfk_example").unwrap().name, "a");
        assert_eq!(load("").unwrap().len(), 0);

        let file = path.display().to_string();
        let expect = |text: &str, parts: &[&str]| {
            let e = load(text).unwrap_err();
            assert!(e.starts_with(&format!("keys file {file}: ")), "{e}");
            for part in parts {
                assert!(e.contains(part), "{e} lacks {part}");
            }
        };
        expect(
            &entry("a", "").replace("\"read\"", "\"admin\""),
            &["[[key]] #1 (`a`)", "`scope`", "leads:read, read and write"],
        );
        expect(
            &format!("{}\n{}", entry("a", ""), entry("b", "")),
            &["[[key]] #2 (`b`)", "#1 has the same sha256"],
        );
        let other = hex(&sha256(b"kfk_other"));
        expect(
            &format!(
                "{}\n{}",
                entry("a", ""),
                entry("a", "").replace(&hash, &other)
            ),
            &["[[key]] #2 (`a`)", "#1 has the same name"],
        );
        expect(
            &entry("a", "").replace(&hash, "kfk_pasted"),
            &["[[key]] #1 (`a`)", "`sha256` must be 64 hex digits"],
        );
        expect(
            &entry("a", "").replace("created = 1700000000\n", ""),
            &["`created` is missing"],
        );
        expect(
            &entry("a", "").replace("1700000000", "\"yesterday\""),
            &["`created` must be an RFC 3339 time"],
        );
        expect(&entry("a", "colour = 1\n"), &["unknown field `colour`"]);
        expect(&entry("a b", ""), &["[[key]] #1: `name`"]);
        expect("[key]\nname = 1\n", &["`key` must be [[key]] tables"]);
        expect("other = 1\n", &["unknown key `other`"]);

        // A key pasted where TOML does not expect it is not echoed into the message.
        let pasted = "kfk_ZXhhbXBsZSBrZXkgdGhhdCBtdXN0IG5vdCBiZSBzaG93bg";
        for text in [
            format!("{}{pasted}\n", entry("a", "")),
            format!("{}{pasted} = 1\n", entry("a", "")),
            entry("a", "").replace(&hash, pasted),
            entry("a", "").replace("\"read\"", &format!("\"{pasted}\"")),
        ] {
            let e = load(&text).unwrap_err();
            assert!(!e.contains(&pasted[PREFIX.len()..]), "{e}");
        }
    }

    #[test]
    fn created_is_rfc3339_or_unix_seconds() {
        let at = UNIX_EPOCH + Duration::from_secs(1_738_324_800); // 2025-01-31T12:00:00Z
        let parse = |v: &str| {
            parse_created(&toml::from_str::<toml::Table>(&format!("v = {v}")).unwrap()["v"])
        };
        for v in [
            "1738324800",
            "\"2025-01-31T12:00:00Z\"",
            "\"2025-01-31T12:00:00+00:00\"",
            "\"2025-01-31T15:30:00+03:30\"",
            "\"2025-01-31T07:00:00-05:00\"",
            "2025-01-31T12:00:00Z",
            "2025-01-31T14:00:00+02:00",
        ] {
            assert_eq!(parse(v), Some(at), "{v}");
        }
        for v in [
            "-1",
            "\"2025-01-31T12:00:00\"",
            "2025-01-31T12:00:00",
            "\"2025-01-31T12:00:00+3:00\"",
            "1.5",
        ] {
            assert_eq!(parse(v), None, "{v}");
        }
    }

    #[test]
    fn the_commands_embed_in_a_command_line() {
        use clap::{CommandFactory, Parser};
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Top,
        }
        #[derive(Debug, clap::Subcommand)]
        enum Top {
            #[command(subcommand)]
            Keys(KeysCommand),
        }
        Cli::command().debug_assert();
        let parse = |args: &[&str]| {
            let argv = ["kommo-fanout", "keys"].iter().chain(args);
            Cli::try_parse_from(argv).map(|cli| match cli.command {
                Top::Keys(cmd) => cmd,
            })
        };
        let cmd = parse(&[
            "add",
            "--keys-file",
            "k.toml",
            "--account",
            "acme",
            "--name",
            "grafana",
            "--scope",
            "leads:read",
        ])
        .unwrap();
        assert!(matches!(
            cmd,
            KeysCommand::Add { ref account, ref name, scope: Scope::LeadsRead, .. }
                if account == "acme" && name == "grafana"
        ));
        let e = parse(&[
            "add",
            "--keys-file",
            "k.toml",
            "--account",
            "acme",
            "--name",
            "grafana",
            "--scope",
            "admin",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("leads:read") && e.contains("write"), "{e}");
        assert!(parse(&["revoke", "--keys-file", "k.toml"]).is_err());
        assert!(parse(&["list", "--keys-file", "k.toml"]).is_ok());
    }

    #[test]
    fn base64url_is_rfc4648_without_padding() {
        assert_eq!(base64url(b"Man"), "TWFu");
        assert_eq!(base64url(b"Ma"), "TWE");
        assert_eq!(base64url(b"M"), "TQ");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        assert_eq!(base64url(&[0u8; 32]).len(), 43);
    }

    #[tokio::test]
    async fn watched_keys_notice_added_and_revoked_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        assert!(WatchedKeys::start(&path)
            .unwrap_err()
            .contains("cannot read it"));
        let first = add_key(&path, "acme", "grafana", Scope::LeadsRead);
        let watched = WatchedKeys::start_every(path.clone(), Duration::from_millis(20)).unwrap();
        assert_eq!(watched.current().find(&first).unwrap().name, "grafana");

        let second = add_key(&path, "acme", "metabase", Scope::Read);
        eventually("the added key is found", || {
            watched.current().find(&second).is_some()
        })
        .await;
        assert_eq!(watched.current().find(&second).unwrap().scope, Scope::Read);

        revoke_key(&path, "grafana").unwrap();
        eventually("the revoked key is refused", || {
            watched.current().find(&first).is_none()
        })
        .await;
        assert!(watched.current().find(&second).is_some());
        assert!(watched.problem().is_none());
    }

    #[tokio::test]
    async fn an_unparsable_edit_keeps_the_previous_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let key = add_key(&path, "acme", "grafana", Scope::LeadsRead);
        let good = fs::read_to_string(&path).unwrap();
        let watched = WatchedKeys::start_every(path.clone(), Duration::from_millis(20)).unwrap();

        // Broken, and with a key pasted in it: the problem names the file, never the key.
        let pasted = "kfk_ZXhhbXBsZSBrZXkgdGhhdCBtdXN0IG5vdCBiZSBzaG93bg";
        fs::write(&path, format!("{good}\n[[key]\nname = {pasted}\n")).unwrap();
        eventually("the broken file is noticed", || watched.problem().is_some()).await;
        let problem = watched.problem().unwrap();
        assert!(problem.contains(&path.display().to_string()), "{problem}");
        assert!(!problem.contains(&pasted[PREFIX.len()..]), "{problem}");
        assert!(watched.current().find(&key).is_some());

        fs::write(&path, &good).unwrap();
        eventually("the repaired file is read", || watched.problem().is_none()).await;
        assert!(watched.current().find(&key).is_some());

        fs::remove_file(&path).unwrap();
        eventually("the missing file is noticed", || {
            watched.problem().is_some()
        })
        .await;
        assert!(watched.current().find(&key).is_some());
        fs::write(&path, &good).unwrap();
        eventually("the restored file is read", || watched.problem().is_none()).await;
    }

    #[tokio::test]
    async fn the_reload_task_ends_with_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        add_key(&path, "acme", "grafana", Scope::Read);
        let tasks = || {
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
        };
        let before = tasks();
        let watched = WatchedKeys::start_every(path, Duration::from_millis(10)).unwrap();
        assert_eq!(tasks(), before + 1);
        drop(watched);
        eventually("the reload task ended", || tasks() == before).await;
    }
}
