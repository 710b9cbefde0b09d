//! A user agent read into what analysts group by (browser, OS, device type) and, for crawlers
//! and automation, the bot it is. `woothee` does the parsing: its data is compiled in, it needs
//! no regex set loaded at start and it reads a user agent in microseconds (it is Vector's fast
//! mode for the same job). It knows crawlers but not every automation or app client, so a list
//! of bots (the user's first, then [`BUILT_IN_BOTS`]) is checked before it, and a few app
//! clients it leaves unknown (Android's `Dalvik`, Apple's `CFNetwork`) are read after it.
//!
//! SDK traffic repeats a few user agents, so what a user agent reads as is kept in a bounded
//! cache ([`CACHE_ENTRIES`]); a client that sends a new one with every event costs a parse each
//! and keeps the cache at its size.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ingest_pipeline::settings::BotPattern;
use ingest_schema::Val;

/// User agents read as this and longer are cut to it before parsing (the collector cuts the
/// header to 512 characters; an event's own `context.userAgent` can be longer).
const MAX_AGENT_CHARS: usize = 512;
/// What one parsed field may hold, in bytes (cut at a character's boundary).
pub const MAX_FIELD_CHARS: usize = 40;
/// User agents whose reading is kept; past it the cache starts again empty.
pub const CACHE_ENTRIES: usize = 4096;

/// Bots and automation woothee does not report as crawlers, as (pattern, name, category).
/// A pattern matches anywhere in the user agent, ASCII case ignored.
pub const BUILT_IN_BOTS: &[(&str, &str, &str)] = &[
    ("HeadlessChrome", "HeadlessChrome", "automation"),
    ("PhantomJS", "PhantomJS", "automation"),
    ("Electron/", "Electron", "automation"),
    ("Chrome-Lighthouse", "Lighthouse", "monitor"),
    ("UptimeRobot", "UptimeRobot", "monitor"),
    ("Pingdom", "Pingdom", "monitor"),
    ("StatusCake", "StatusCake", "monitor"),
    ("DatadogSynthetics", "Datadog Synthetics", "monitor"),
    (
        "GoogleStackdriverMonitoring",
        "Google Cloud Monitoring",
        "monitor",
    ),
    ("python-requests", "python-requests", "http-library"),
    ("python-urllib", "Python urllib", "http-library"),
    ("aiohttp", "aiohttp", "http-library"),
    ("curl/", "curl", "http-library"),
    ("Wget", "Wget", "http-library"),
    ("Go-http-client", "Go net/http", "http-library"),
    ("node-fetch", "node-fetch", "http-library"),
    ("axios/", "axios", "http-library"),
    ("libwww-perl", "libwww-perl", "http-library"),
    ("Apache-HttpClient", "Apache HttpClient", "http-library"),
    ("Scrapy", "Scrapy", "crawler"),
    ("GPTBot", "GPTBot", "crawler"),
    ("ClaudeBot", "ClaudeBot", "crawler"),
    ("PerplexityBot", "PerplexityBot", "crawler"),
    ("facebookexternalhit", "Facebook", "crawler"),
    ("Slackbot", "Slackbot", "crawler"),
    ("Twitterbot", "Twitterbot", "crawler"),
];

/// Checked last, for a user agent neither list nor woothee knows as a bot.
pub const GENERIC_BOTS: &[(&str, &str, &str)] = &[
    ("bot/", "unknown bot", "crawler"),
    ("bot;", "unknown bot", "crawler"),
    ("spider", "unknown spider", "crawler"),
    ("crawler", "unknown crawler", "crawler"),
];

/// What a user agent reads as.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Agent {
    pub browser: Option<String>,
    pub browser_version: Option<String>,
    pub os: Option<String>,
    pub os_version: Option<String>,
    /// `desktop`, `mobile`, `appliance` (TVs, consoles), `bot` or `other`.
    pub device_type: Option<&'static str>,
    pub bot: Option<Bot>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bot {
    pub name: String,
    pub category: String,
}

struct Pattern {
    /// Lowercase.
    needle: String,
    name: String,
    category: String,
}

pub struct AgentParser {
    bots: Vec<Pattern>,
    generic: Vec<Pattern>,
    parser: woothee::parser::Parser,
    cache: Mutex<HashMap<Box<str>, Read>>,
}

/// A user agent's reading, and what it adds to an event, built once: an object whose member 0
/// is `userAgentParsed` and member 1, for a bot, `bot`. Events refer to its members
/// ([`Val::Shared`]) instead of each holding a copy.
#[derive(Clone)]
pub struct Read {
    pub agent: Arc<Agent>,
    pub annotation: Arc<Val>,
}

impl AgentParser {
    /// The user's bots come first, so one can rename or recategorise a built-in one.
    pub fn new(extra: &[BotPattern]) -> Self {
        let user = extra.iter().map(|b| Pattern {
            needle: b.pattern.trim().to_ascii_lowercase(),
            name: plain(&b.name, MAX_FIELD_CHARS),
            category: plain(&b.category, MAX_FIELD_CHARS),
        });
        let listed = |list: &[(&str, &str, &str)]| -> Vec<Pattern> {
            list.iter()
                .map(|(needle, name, category)| Pattern {
                    needle: needle.to_ascii_lowercase(),
                    name: (*name).to_owned(),
                    category: (*category).to_owned(),
                })
                .collect()
        };
        Self {
            bots: user.chain(listed(BUILT_IN_BOTS)).collect(),
            generic: listed(GENERIC_BOTS),
            parser: woothee::parser::Parser::new(),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// What `agent` reads as, from the cache when it was read before.
    pub fn read(&self, agent: &str) -> Arc<Agent> {
        self.read_with_annotation(agent).agent
    }

    /// What `agent` reads as and what it adds to an event, from the cache when it was read
    /// before.
    pub fn read_with_annotation(&self, agent: &str) -> Read {
        let agent = cut(agent, MAX_AGENT_CHARS);
        if let Some(known) = self.cache.lock().ok().and_then(|c| c.get(agent).cloned()) {
            return known;
        }
        let parsed = self.parse(agent);
        let read = Read {
            annotation: Arc::new(annotation(&parsed)),
            agent: Arc::new(parsed),
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(agent.into(), read.clone());
        }
        read
    }

    /// What `agent` reads as, parsed anew (what the cache saves; for benchmarks).
    pub fn parse_uncached(&self, agent: &str) -> Agent {
        self.parse(cut(agent, MAX_AGENT_CHARS))
    }

    fn parse(&self, agent: &str) -> Agent {
        let lower = agent.to_ascii_lowercase();
        let found = |list: &[Pattern]| {
            list.iter()
                .find(|p| lower.contains(&p.needle))
                .map(|p| Bot {
                    name: p.name.clone(),
                    category: p.category.clone(),
                })
        };
        let listed = found(&self.bots);
        let parsed = self.parser.parse(agent);
        let known = |value: &str| {
            (!value.is_empty() && value != woothee::woothee::VALUE_UNKNOWN)
                .then(|| plain(value, MAX_FIELD_CHARS))
        };
        let mut read = Agent::default();
        if let Some(parsed) = &parsed {
            let crawler = parsed.category == "crawler";
            read.browser = if crawler { None } else { known(parsed.name) };
            read.browser_version = read.browser.as_ref().and_then(|_| known(parsed.version));
            read.os = known(parsed.os);
            read.os_version = read.os.as_ref().and_then(|_| known(&parsed.os_version));
            read.device_type = match parsed.category {
                "pc" => Some("desktop"),
                "smartphone" | "mobilephone" => Some("mobile"),
                "appliance" => Some("appliance"),
                "crawler" => Some("bot"),
                "misc" => Some("other"),
                _ => None,
            };
            if crawler && listed.is_none() {
                read.bot = Some(Bot {
                    name: plain(parsed.name, MAX_FIELD_CHARS),
                    category: "crawler".to_owned(),
                });
            }
        }
        if read.os.is_none() {
            read_app_client(agent, &mut read);
        }
        if let Some(bot) =
            listed.or_else(|| read.bot.is_none().then(|| found(&self.generic)).flatten())
        {
            read.device_type = Some("bot");
            read.bot = Some(bot);
        }
        read
    }
}

/// `{"userAgentParsed": {...}, "bot": {...}}`, each with the fields that have a value.
fn annotation(agent: &Agent) -> Val {
    let parsed = [
        ("browser", agent.browser.as_deref()),
        ("browserVersion", agent.browser_version.as_deref()),
        ("os", agent.os.as_deref()),
        ("osVersion", agent.os_version.as_deref()),
        ("deviceType", agent.device_type),
    ];
    let mut members = vec![("userAgentParsed".into(), object_of(&parsed))];
    if let Some(bot) = &agent.bot {
        let bot = [
            ("name", Some(bot.name.as_str())),
            ("category", Some(bot.category.as_str())),
        ];
        members.push(("bot".into(), object_of(&bot)));
    }
    Val::Obj(members)
}

/// An object of the fields that have a value.
pub fn object_of(fields: &[(&str, Option<&str>)]) -> Val {
    Val::Obj(
        fields
            .iter()
            .filter_map(|(key, value)| value.map(|v| ((*key).into(), Val::string(v))))
            .collect(),
    )
}

/// Native app clients woothee leaves unknown: Android's `Dalvik/2.1.0 (Linux; U; Android 14;
/// Pixel 8 Build/…)` (what analytics-kotlin sends as `context.userAgent`) and Apple's
/// `App/1.0 CFNetwork/1410.0.3 Darwin/22.6.0`.
fn read_app_client(agent: &str, read: &mut Agent) {
    if let Some(at) = agent.find("Android ") {
        let version: String = agent[at + "Android ".len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .take(MAX_FIELD_CHARS)
            .collect();
        read.os = Some("Android".to_owned());
        read.os_version = (!version.is_empty()).then_some(version);
        read.device_type = Some("mobile");
    } else if agent.contains("CFNetwork/") && agent.contains("Darwin/") {
        read.os = Some("iOS".to_owned());
        read.device_type = Some("mobile");
    }
}

/// The first `max` characters of `text`.
fn cut(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// `text` in at most `max` bytes, without what JSON escapes (control characters, `"`, `\`),
/// so that what the worker adds has a size it can bound.
pub fn plain(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        if c.is_control() || c == '"' || c == '\\' {
            continue;
        }
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOGLEBOT: &str =
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
    const HEADLESS: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.109 Safari/537.36";
    const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1";
    const ANDROID_APP: &str = "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/UQ1A.240105.004)";
    const DESKTOP_CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

    fn parser() -> AgentParser {
        AgentParser::new(&[])
    }

    #[test]
    fn googlebot_is_a_crawler() {
        let read = parser().read(GOOGLEBOT);
        let bot = read.bot.as_ref().expect("a bot");
        assert_eq!(bot.name, "Googlebot");
        assert_eq!(bot.category, "crawler");
        assert_eq!(read.device_type, Some("bot"));
        assert_eq!(read.browser, None);
    }

    #[test]
    fn headless_chrome_is_automation_and_still_reads_as_chrome_on_linux() {
        let read = parser().read(HEADLESS);
        let bot = read.bot.as_ref().expect("a bot");
        assert_eq!(
            (bot.name.as_str(), bot.category.as_str()),
            ("HeadlessChrome", "automation")
        );
        assert_eq!(read.os.as_deref(), Some("Linux"));
    }

    #[test]
    fn an_iphone_safari_is_a_mobile_safari_on_ios_17() {
        let read = parser().read(IPHONE);
        assert_eq!(read.browser.as_deref(), Some("Safari"));
        assert_eq!(read.browser_version.as_deref(), Some("17.1"));
        assert_eq!(read.os.as_deref(), Some("iPhone"));
        assert_eq!(read.os_version.as_deref(), Some("17.1"));
        assert_eq!(read.device_type, Some("mobile"));
        assert_eq!(read.bot, None);
    }

    #[test]
    fn an_android_app_is_android_14_on_a_phone() {
        let read = parser().read(ANDROID_APP);
        assert_eq!(read.os.as_deref(), Some("Android"));
        assert_eq!(read.os_version.as_deref(), Some("14"));
        assert_eq!(read.device_type, Some("mobile"));
        assert_eq!(read.bot, None);
    }

    #[test]
    fn a_desktop_chrome_is_no_bot() {
        let read = parser().read(DESKTOP_CHROME);
        assert_eq!(read.browser.as_deref(), Some("Chrome"));
        assert_eq!(read.browser_version.as_deref(), Some("131.0.0.0"));
        assert_eq!(read.os.as_deref(), Some("Windows 10"));
        assert_eq!(read.device_type, Some("desktop"));
        assert_eq!(read.bot, None);
    }

    #[test]
    fn the_users_bots_come_first_and_case_is_ignored() {
        let parser = AgentParser::new(&[BotPattern {
            pattern: "acmemonitor".into(),
            name: "Acme".into(),
            category: "monitor".into(),
        }]);
        let read = parser.read(&format!("{DESKTOP_CHROME} AcmeMonitor/2"));
        let bot = read.bot.as_ref().expect("a bot");
        assert_eq!(
            (bot.name.as_str(), bot.category.as_str()),
            ("Acme", "monitor")
        );
        assert_eq!(read.device_type, Some("bot"));
    }

    #[test]
    fn the_cache_stays_bounded_and_fields_are_cut() {
        let parser = parser();
        for i in 0..CACHE_ENTRIES + 10 {
            parser.read(&format!("{DESKTOP_CHROME} n{i}"));
        }
        assert!(parser.cache.lock().expect("lock").len() <= CACHE_ENTRIES);
        let long = format!("Mozilla/5.0 (Linux; Android {}) x", "9".repeat(5000));
        let read = parser.read(&long);
        assert!(read
            .os_version
            .as_ref()
            .is_none_or(|v| v.len() <= MAX_FIELD_CHARS));
    }
}
