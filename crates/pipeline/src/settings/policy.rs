//! `[enrich]` (what the worker adds to every event: the parsed user agent, bot flags, the
//! location of the client's address) and `[policy]` (what each source may cost and keep: its
//! bot, IP and field rules, its quotas and sampling). `[policy]` holds every source's defaults;
//! `[policy.sources.<name>]` changes any of them for one source.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichSettings {
    /// Parse `context.userAgent` into `context.userAgentParsed` and flag bots (`context.bot`).
    pub user_agent: bool,
    /// A MaxMind-format database (`.mmdb`: GeoLite2, GeoIP2 or DB-IP, Country or City);
    /// unset or empty: no geolocation.
    #[serde(default)]
    pub geo_database: Option<PathBuf>,
    /// Bots beside the built-in list, checked first: a user agent that contains `pattern`
    /// (ASCII case ignored) is the bot `name` of `category`.
    #[serde(default)]
    pub bots: Vec<BotPattern>,
    /// The key of the `hash` field rules (HMAC-SHA256): the same value hashes the same in
    /// every worker that shares it, and cannot be reversed by trying values without it.
    #[serde(default = "no_secret")]
    pub hash_secret: Secret,
}

fn no_secret() -> Secret {
    Secret::new("")
}

impl EnrichSettings {
    /// The database path, unless unset or empty.
    pub fn geo_database(&self) -> Option<&PathBuf> {
        self.geo_database
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BotPattern {
    pub pattern: String,
    pub name: String,
    pub category: String,
}

/// What happens to an event whose user agent is a bot's.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BotPolicy {
    /// Kept, with `context.bot`.
    #[default]
    Flag,
    /// To the invalid queue with reason `bot`.
    Invalid,
    /// Counted (`worker_bot_events_total{action="dropped"}`) and not kept.
    Drop,
}

/// What is kept of the client's IP address (`context.ip`), after geolocation.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum IpPolicy {
    #[default]
    Keep,
    /// IPv4 to its /24 (the last octet 0), IPv6 to its /48.
    Truncate,
    Drop,
}

/// What a field rule does to each value its path reaches.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FieldAction {
    /// The member is removed.
    Drop,
    /// The value becomes `"hmac:<32 hex digits>"` of its JSON text with `enrich.hash_secret`.
    Hash,
    /// The value becomes `"[redacted]"`.
    Redact,
}

/// One field rule: `path` is keys joined by `.`, each of which may end in `*` (any key that
/// starts with what comes before it), e.g. `traits.email`, `properties.card_*`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    pub path: String,
    pub action: FieldAction,
}

/// Keep this share (0 to 1) of the events of one name (a track's `event`, a page's or screen's
/// `name`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SampleRule {
    pub event: String,
    pub keep: f64,
}

/// One source's policy, every field set.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourcePolicy {
    pub bots: BotPolicy,
    pub ip: IpPolicy,
    #[serde(default)]
    pub fields: Vec<FieldRule>,
    /// Events per second the source's requests may carry before the collector sends them to
    /// the overflow lane (`<prefix>.overflow`); 0: no quota.
    pub events_per_second: f64,
    /// The same for each user of the source (its `userId`, else its `anonymousId`).
    pub user_events_per_second: f64,
    /// Seconds of the quota that may be spent at once (the bucket's size), at least 1.
    pub burst_seconds: f64,
    /// Past this many events per second the collector answers 429 with Retry-After; 0: no
    /// ceiling.
    pub max_events_per_second: f64,
    #[serde(default)]
    pub sample: Vec<SampleRule>,
}

impl SourcePolicy {
    /// No rule, no quota: every event kept as sent.
    pub fn keep_all() -> Self {
        Self {
            bots: BotPolicy::Flag,
            ip: IpPolicy::Keep,
            fields: Vec::new(),
            events_per_second: 0.0,
            user_events_per_second: 0.0,
            burst_seconds: 10.0,
            max_events_per_second: 0.0,
            sample: Vec::new(),
        }
    }
}

/// A source's changes to the defaults; what it leaves out is the default. Its `fields` and
/// `sample` rules come after the defaults' (a later rule for the same path or event wins).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourcePolicyChanges {
    pub bots: Option<BotPolicy>,
    pub ip: Option<IpPolicy>,
    #[serde(default)]
    pub fields: Vec<FieldRule>,
    pub events_per_second: Option<f64>,
    pub user_events_per_second: Option<f64>,
    pub burst_seconds: Option<f64>,
    pub max_events_per_second: Option<f64>,
    #[serde(default)]
    pub sample: Vec<SampleRule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PolicySettings {
    #[serde(flatten)]
    pub default: SourcePolicy,
    #[serde(default)]
    pub sources: BTreeMap<String, SourcePolicyChanges>,
}

impl PolicySettings {
    /// `source`'s whole policy.
    pub fn for_source(&self, source: &str) -> SourcePolicy {
        let mut policy = self.default.clone();
        if let Some(changes) = self.sources.get(source) {
            let d = &mut policy;
            d.bots = changes.bots.unwrap_or(d.bots);
            d.ip = changes.ip.unwrap_or(d.ip);
            d.fields.extend(changes.fields.iter().cloned());
            d.events_per_second = changes.events_per_second.unwrap_or(d.events_per_second);
            d.user_events_per_second = changes
                .user_events_per_second
                .unwrap_or(d.user_events_per_second);
            d.burst_seconds = changes.burst_seconds.unwrap_or(d.burst_seconds);
            d.max_events_per_second = changes
                .max_events_per_second
                .unwrap_or(d.max_events_per_second);
            d.sample.extend(changes.sample.iter().cloned());
        }
        policy
    }

    /// Names the first bad setting.
    pub fn validate(&self, enrich: &EnrichSettings) -> Result<(), (String, String)> {
        let named = std::iter::once(("policy".to_owned(), self.default.clone())).chain(
            self.sources
                .keys()
                .map(|name| (format!("policy.sources.{name}"), self.for_source(name))),
        );
        for (at, policy) in named {
            let rate = |value: f64| value == 0.0 || (0.001..=1e9).contains(&value);
            for (name, value) in [
                ("events_per_second", policy.events_per_second),
                ("user_events_per_second", policy.user_events_per_second),
                ("max_events_per_second", policy.max_events_per_second),
            ] {
                if !rate(value) {
                    return Err((
                        format!("{at}.{name}"),
                        "must be 0 (off) or between 0.001 and 1000000000".into(),
                    ));
                }
            }
            if !(1.0..=3600.0).contains(&policy.burst_seconds) {
                return Err((
                    format!("{at}.burst_seconds"),
                    "must be between 1 and 3600".into(),
                ));
            }
            for rule in &policy.fields {
                if let Err(why) = check_path(&rule.path) {
                    return Err((format!("{at}.fields"), format!("`{}`: {why}", rule.path)));
                }
                if rule.action == FieldAction::Hash && enrich.hash_secret.expose().len() < 16 {
                    return Err((
                        "enrich.hash_secret".into(),
                        format!(
                            "must be at least 16 characters: {at}.fields hashes `{}`",
                            rule.path
                        ),
                    ));
                }
            }
            for rule in &policy.sample {
                if !(0.0..=1.0).contains(&rule.keep) || rule.event.is_empty() {
                    return Err((
                        format!("{at}.sample"),
                        format!(
                            "`{}`: keep must be between 0 and 1, for a named event",
                            rule.event
                        ),
                    ));
                }
            }
        }
        for bot in &enrich.bots {
            if bot.pattern.trim().is_empty() || bot.name.is_empty() || bot.category.is_empty() {
                return Err((
                    "enrich.bots".into(),
                    "each needs a non-blank pattern, a name and a category".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Top-level fields the pipeline itself needs: no rule may reach them.
const NEEDED: [&str; 6] = [
    "messageId",
    "type",
    "source",
    "receivedAt",
    "timestamp",
    "requestId",
];

/// A field rule's path: keys joined by `.`, none empty, `*` only at a key's end, and not one
/// that reaches a field the pipeline needs (`*Id` would reach `messageId`).
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.split('.').any(str::is_empty) {
        return Err("a path is keys joined by '.', none of them empty");
    }
    if path
        .split('.')
        .any(|key| key.trim_end_matches('*').contains('*') || key.ends_with("**"))
    {
        return Err("'*' may only end a key");
    }
    if !path.contains('.') {
        let reaches = |field: &str| match path.strip_suffix('*') {
            Some(prefix) => field.starts_with(prefix),
            None => field == path,
        };
        if NEEDED.into_iter().any(reaches) {
            return Err("it reaches a field the pipeline needs (messageId, type, source, receivedAt, timestamp, requestId)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_policy() -> SourcePolicy {
        SourcePolicy {
            bots: BotPolicy::Flag,
            ip: IpPolicy::Keep,
            fields: vec![FieldRule {
                path: "traits.email".into(),
                action: FieldAction::Hash,
            }],
            events_per_second: 0.0,
            user_events_per_second: 0.0,
            burst_seconds: 10.0,
            max_events_per_second: 0.0,
            sample: Vec::new(),
        }
    }

    fn enrich(secret: &str) -> EnrichSettings {
        EnrichSettings {
            user_agent: true,
            geo_database: None,
            bots: Vec::new(),
            hash_secret: Secret::new(secret),
        }
    }

    #[test]
    fn a_source_changes_only_what_it_names_and_adds_its_rules_after_the_defaults() {
        let policy = PolicySettings {
            default: default_policy(),
            sources: BTreeMap::from([(
                "web".to_owned(),
                SourcePolicyChanges {
                    ip: Some(IpPolicy::Truncate),
                    fields: vec![FieldRule {
                        path: "properties.card_*".into(),
                        action: FieldAction::Drop,
                    }],
                    user_events_per_second: Some(5.0),
                    ..SourcePolicyChanges::default()
                },
            )]),
        };
        let web = policy.for_source("web");
        assert_eq!(web.ip, IpPolicy::Truncate);
        assert_eq!(web.bots, BotPolicy::Flag);
        assert_eq!(web.user_events_per_second, 5.0);
        assert_eq!(web.burst_seconds, 10.0);
        let paths: Vec<&str> = web.fields.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["traits.email", "properties.card_*"]);
        assert_eq!(policy.for_source("ios"), default_policy());
        assert!(policy.validate(&enrich("a-secret-of-16-chars")).is_ok());
    }

    #[test]
    fn bad_rules_are_named() {
        let mut policy = PolicySettings {
            default: default_policy(),
            sources: BTreeMap::new(),
        };
        let (setting, _) = policy.validate(&enrich("short")).expect_err("refused");
        assert_eq!(setting, "enrich.hash_secret");
        policy.sources.insert(
            "web".into(),
            SourcePolicyChanges {
                fields: vec![FieldRule {
                    path: "properties.*card".into(),
                    action: FieldAction::Drop,
                }],
                ..SourcePolicyChanges::default()
            },
        );
        let (setting, why) = policy
            .validate(&enrich("a-secret-of-16-chars"))
            .expect_err("refused");
        assert_eq!(setting, "policy.sources.web.fields");
        assert!(why.contains("'*' may only end a key"), "{why}");
        for needed in ["*Id", "s*", "type", "*"] {
            assert!(check_path(needed).is_err(), "{needed}");
        }
        assert!(check_path("traits.*").is_ok() && check_path("userId").is_ok());
        policy.sources.insert(
            "web".into(),
            SourcePolicyChanges {
                events_per_second: Some(-1.0),
                ..SourcePolicyChanges::default()
            },
        );
        let (setting, _) = policy
            .validate(&enrich("a-secret-of-16-chars"))
            .expect_err("refused");
        assert_eq!(setting, "policy.sources.web.events_per_second");
    }
}
