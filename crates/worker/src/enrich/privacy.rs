//! A source's privacy rules, applied to each event after validation and before anything keeps
//! it: MongoDB, every sink, the invalid queue and the sinks' dead-letter queues all see the
//! event as these rules leave it. The client's IP is kept, cut to its network (IPv4 /24, IPv6
//! /48) or dropped, after geolocation has read it; field rules drop, hash or redact what a path
//! reaches. An error of validation that points at a field a rule reaches has its message
//! replaced, since a schema's message quotes the value.

use std::net::IpAddr;

use hmac::{Hmac, KeyInit, Mac};
use ingest_pipeline::settings::{FieldAction, IpPolicy, SourcePolicy};
use ingest_schema::{Doc, Edit, Issue, Val};

use super::Memo;
use sha2::Sha256;

/// Bytes by which hashes and redactions may lengthen one event's own values, and (apart) the
/// values a delivery's events share (a hash is longer than a short value, and a wildcard can
/// reach thousands of them); past it, what such a rule reaches is dropped instead. The worker
/// counts twice this in what an event may grow by (`process`).
pub const MAX_GROWTH_BYTES: usize = 128;

/// The IP rule's tag in a delivery's [`SharedEdits`] (the field rules' are their indexes).
const IP_TAG: usize = usize::MAX;

/// What replaces a redacted value.
pub const REDACTED: &str = "[redacted]";

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub dropped: u64,
    pub hashed: u64,
    pub redacted: u64,
    /// `context.ip` truncated or dropped.
    pub ip: u64,
}

impl Applied {
    pub fn add(&mut self, other: Applied) {
        self.dropped += other.dropped;
        self.hashed += other.hashed;
        self.redacted += other.redacted;
        self.ip += other.ip;
    }
}

struct Rule {
    path: Vec<String>,
    action: FieldAction,
}

pub struct Privacy {
    ip: IpPolicy,
    rules: Vec<Rule>,
    key: Option<Hmac<Sha256>>,
}

impl Privacy {
    pub fn new(policy: &SourcePolicy, secret: &str) -> Self {
        Self {
            ip: policy.ip,
            rules: policy
                .fields
                .iter()
                .map(|rule| Rule {
                    path: rule.path.split('.').map(str::to_owned).collect(),
                    action: rule.action,
                })
                .collect(),
            key: Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok(),
        }
    }

    /// Whether this source keeps events as sent.
    pub fn is_off(&self) -> bool {
        self.ip == IpPolicy::Keep && self.rules.is_empty()
    }

    /// Applies the rules to `event`, and withholds the messages of `issues` that point at what
    /// they reached.
    /// `memo` is the delivery's: a value the batch's events share is edited once.
    pub fn apply(&self, event: &mut Doc, issues: &mut [Issue], memo: &mut Memo) -> Applied {
        let mut applied = Applied::default();
        if self.is_off() {
            return applied;
        }
        for issue in issues.iter_mut() {
            if self.reaches_pointer(&issue.pointer) {
                issue.message = format!(
                    "the value here fails the schema ({}); the message is withheld: a privacy rule covers this field",
                    issue.schema
                );
            }
        }
        match self.ip {
            IpPolicy::Keep => {}
            IpPolicy::Drop => {
                let edits = Some((&mut memo.edits, IP_TAG));
                applied.ip +=
                    event.edit_path(&["context", "ip"], edits, &mut |_, _| Edit::Remove) as u64;
            }
            IpPolicy::Truncate => {
                let (edits, last) = (&mut memo.edits, &mut memo.truncated_ip);
                applied.ip +=
                    event.edit_path(&["context", "ip"], Some((edits, IP_TAG)), &mut |node, _| {
                        let Some(sent) = node.as_str() else {
                            return Edit::Remove;
                        };
                        if last.as_ref().is_none_or(|(was, _)| **was != *sent) {
                            *last = Some((sent.into(), truncate_ip(sent).map(Into::into)));
                        }
                        match last.as_ref().and_then(|(_, cut)| cut.as_deref()) {
                            Some(cut) => Edit::Set(Val::string(cut)),
                            // Not an address: nothing of it can be kept safely.
                            None => Edit::Remove,
                        }
                    }) as u64;
            }
        }
        // What this event's own values grew by, and (for the whole delivery) the values its
        // events share: each at most MAX_GROWTH_BYTES, so an event grows by twice that at most.
        let mut grown = 0;
        let (edits, shared_grown) = (&mut memo.edits, &mut memo.shared_grown);
        let mut json = Vec::new();
        for (tag, rule) in self.rules.iter().enumerate() {
            let edits = Some((&mut *edits, tag));
            let reached = event.edit_path(&rule.path, edits, &mut |node, shared| {
                if rule.action == FieldAction::Drop {
                    return Edit::Remove;
                }
                json.clear();
                node.write_json(&mut json);
                let new = match rule.action {
                    FieldAction::Drop => return Edit::Remove,
                    FieldAction::Redact => REDACTED.to_owned(),
                    FieldAction::Hash => match self.hash(&json) {
                        Some(hash) => hash,
                        None => return Edit::Remove,
                    },
                };
                // Quoted, the new value is its length and 2.
                let budget = if shared {
                    &mut *shared_grown
                } else {
                    &mut grown
                };
                *budget += (new.len() + 2).saturating_sub(json.len());
                match *budget <= MAX_GROWTH_BYTES {
                    true => Edit::Set(Val::string(new)),
                    false => Edit::Remove,
                }
            }) as u64;
            match rule.action {
                FieldAction::Drop => applied.dropped += reached,
                FieldAction::Redact => applied.redacted += reached,
                FieldAction::Hash => applied.hashed += reached,
            }
        }
        applied
    }

    /// `hmac:` and the first 128 bits of HMAC-SHA256 of `json`, in hex.
    fn hash(&self, json: &[u8]) -> Option<String> {
        let mut mac = self.key.clone()?;
        mac.update(json);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(5 + 32);
        out.push_str("hmac:");
        out.push_str(&hex::encode(&digest[..16]));
        Some(out)
    }

    /// Whether a JSON pointer (`/traits/email`) is at or under a path a rule reaches, or at
    /// `context.ip` while it is not kept.
    fn reaches_pointer(&self, pointer: &str) -> bool {
        let keys: Vec<String> = pointer
            .split('/')
            .skip(1)
            .map(|k| k.replace("~1", "/").replace("~0", "~"))
            .collect();
        let under = |path: &[String]| {
            keys.len() >= path.len()
                && path
                    .iter()
                    .zip(&keys)
                    .all(|(segment, key)| match segment.strip_suffix('*') {
                        Some(prefix) => key.starts_with(prefix),
                        None => key == segment,
                    })
        };
        let ip = ["context".to_owned(), "ip".to_owned()];
        (self.ip != IpPolicy::Keep && under(&ip)) || self.rules.iter().any(|r| under(&r.path))
    }
}

/// An IPv4 address with its last octet 0, an IPv6 one with all but its first 48 bits 0; `None`
/// for what is not an address.
pub fn truncate_ip(text: &str) -> Option<String> {
    match text.trim().parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            Some(std::net::Ipv4Addr::new(a, b, c, 0).to_string())
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            Some(std::net::Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0).to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use ingest_pipeline::settings::{BotPolicy, FieldRule};
    use serde_json::json;

    use super::*;

    fn policy(ip: IpPolicy, fields: &[(&str, FieldAction)]) -> SourcePolicy {
        SourcePolicy {
            bots: BotPolicy::Flag,
            ip,
            fields: fields
                .iter()
                .map(|(path, action)| FieldRule {
                    path: (*path).into(),
                    action: *action,
                })
                .collect(),
            events_per_second: 0.0,
            user_events_per_second: 0.0,
            burst_seconds: 10.0,
            max_events_per_second: 0.0,
            sample: Vec::new(),
        }
    }

    const SECRET: &str = "a-secret-of-16-chars";

    #[test]
    fn ipv4_loses_its_last_octet_and_ipv6_keeps_its_48_bits() {
        assert_eq!(truncate_ip("203.0.113.9").as_deref(), Some("203.0.113.0"));
        assert_eq!(
            truncate_ip("2001:db8:1:2:3:4:5:6").as_deref(),
            Some("2001:db8:1::")
        );
        assert_eq!(truncate_ip("not an ip"), None);
    }

    #[test]
    fn rules_drop_hash_and_redact_by_path_and_the_hash_is_keyed() {
        let privacy = Privacy::new(
            &policy(
                IpPolicy::Truncate,
                &[
                    ("traits.email", FieldAction::Hash),
                    ("properties.card_*", FieldAction::Drop),
                    ("traits.phone", FieldAction::Redact),
                ],
            ),
            SECRET,
        );
        let mut event = Doc::from_value(&json!({
            "type": "identify",
            "traits": {"email": "ann@example.com", "phone": "+49 30 1234", "plan": "pro"},
            "properties": {"card_number": "4111", "card_cvc": "123", "cart": 2},
            "context": {"ip": "203.0.113.9"}
        }));
        let applied = privacy.apply(&mut event, &mut [], &mut Memo::default());
        assert_eq!(
            applied,
            Applied {
                dropped: 2,
                hashed: 1,
                redacted: 1,
                ip: 1
            }
        );
        let event = event.to_value();
        let hashed = event["traits"]["email"].as_str().expect("a string");
        assert!(
            hashed.starts_with("hmac:") && hashed.len() == 5 + 32,
            "{hashed}"
        );
        assert!(!hashed.contains("ann"));
        assert_eq!(event["traits"]["phone"], json!(REDACTED));
        assert_eq!(event["traits"]["plan"], json!("pro"));
        assert_eq!(event["properties"], json!({"cart": 2}));
        assert_eq!(event["context"]["ip"], json!("203.0.113.0"));

        // The same value, the same secret: the same hash; another secret: another.
        let again = |secret: &str| {
            let privacy = Privacy::new(
                &policy(IpPolicy::Keep, &[("traits.email", FieldAction::Hash)]),
                secret,
            );
            let mut event = Doc::from_value(&json!({"traits": {"email": "ann@example.com"}}));
            privacy.apply(&mut event, &mut [], &mut Memo::default());
            event.to_value()["traits"]["email"].clone()
        };
        assert_eq!(again(SECRET), json!(hashed));
        assert_ne!(again("another-secret-16-chars"), json!(hashed));
    }

    #[test]
    fn a_message_about_a_ruled_field_is_withheld_and_others_are_kept() {
        let privacy = Privacy::new(
            &policy(IpPolicy::Drop, &[("traits.email", FieldAction::Hash)]),
            SECRET,
        );
        let mut issues = vec![
            Issue {
                pointer: "/traits/email".into(),
                message: "\"ann@\" is not a \"email\"".into(),
                schema: "identify".into(),
            },
            Issue {
                pointer: "/context/ip".into(),
                message: "\"203.0.113.9\" is not a \"ipv4\"".into(),
                schema: "envelope".into(),
            },
            Issue {
                pointer: "/properties/total".into(),
                message: "\"ten\" is not of type \"number\"".into(),
                schema: "order_completed".into(),
            },
        ];
        let mut event = Doc::from_value(
            &json!({"traits": {"email": "ann@"}, "context": {"ip": "203.0.113.9"}}),
        );
        let applied = privacy.apply(&mut event, &mut issues, &mut Memo::default());
        assert_eq!(applied.ip, 1);
        assert!(!issues[0].message.contains("ann@"), "{}", issues[0].message);
        assert!(
            !issues[1].message.contains("203.0.113"),
            "{}",
            issues[1].message
        );
        assert!(issues[2].message.contains("ten"));
        assert_eq!(event.to_value()["context"], json!({}));
    }

    #[test]
    fn past_the_growth_bound_an_event_loses_the_values_instead() {
        let privacy = Privacy::new(
            &policy(IpPolicy::Keep, &[("properties.*", FieldAction::Hash)]),
            SECRET,
        );
        let properties: serde_json::Map<String, serde_json::Value> =
            (0..100).map(|i| (format!("p{i}"), json!(i))).collect();
        let mut event = Doc::from_value(&json!({"properties": properties}));
        let applied = privacy.apply(&mut event, &mut [], &mut Memo::default());
        assert_eq!(applied.hashed, 100);
        let kept = event.to_value()["properties"]
            .as_object()
            .expect("object")
            .len();
        // Each `n` (1 or 2 bytes) becomes 39: 3 fit in the bound, the rest go.
        assert_eq!(kept, 3);
    }
}
