//! Enrichment: what the worker adds to each event before validation. Everything here is
//! deterministic for a given delivery, so a redelivered payload yields the same documents
//! (in particular the same generated `messageId`), which is what makes MongoDB writes idempotent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use ingest_pipeline::message::RequestMeta;
use ingest_pipeline::settings::{BotPolicy, EnrichSettings, PolicySettings, SourcePolicy};
use ingest_schema::{Doc, Val};
use serde_json::Value;

pub mod agent;
pub mod geo;
pub mod privacy;

use agent::{AgentParser, Bot};
use geo::GeoReader;
use privacy::Privacy;

/// What [`Enrichment::annotate`] may add to one event at most, in bytes as JSON:
/// `context.userAgentParsed`, `context.bot` and `context.geo`, each field bounded and free of
/// what JSON escapes (`agent::plain`).
pub const ANNOTATION_BYTES: usize = 600;

/// The steps after the fixed fields: the user agent read, bots flagged, the address located,
/// and each source's rules (bots, privacy, sampling). Built once at start.
pub struct Enrichment {
    agents: Option<AgentParser>,
    geo: Option<GeoReader>,
    default: SourceRules,
    sources: HashMap<String, SourceRules>,
}

/// One source's rules, ready to apply.
pub struct SourceRules {
    pub bots: BotPolicy,
    pub privacy: Privacy,
    /// Event name and the share of its events kept.
    pub sample: Vec<(String, f64)>,
}

impl SourceRules {
    fn new(policy: &SourcePolicy, secret: &str) -> Self {
        let mut sample: Vec<(String, f64)> = Vec::new();
        // A later rule for the same name wins.
        for rule in &policy.sample {
            sample.retain(|(name, _)| name != &rule.event);
            sample.push((rule.event.clone(), rule.keep));
        }
        Self {
            bots: policy.bots,
            privacy: Privacy::new(policy, secret),
            sample,
        }
    }

    /// The share kept of events named `name`, if a rule names it.
    pub fn sampled(&self, name: &str) -> Option<(&str, f64)> {
        self.sample
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, keep)| (n.as_str(), *keep))
    }
}

/// What [`Enrichment::annotate`] found in one event.
#[derive(Debug, Default)]
pub struct Annotated {
    pub bot: Option<Bot>,
    pub geo: GeoResult,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum GeoResult {
    /// No database, or nothing to look up.
    #[default]
    Off,
    Found,
    /// An address the database does not have.
    Missing,
    /// No `context.ip`, or one that is not an address.
    NoAddress,
}

impl Enrichment {
    /// Nothing added and no rule: what the worker did before this step existed.
    pub fn off() -> Self {
        Self {
            agents: None,
            geo: None,
            default: SourceRules::new(&SourcePolicy::keep_all(), ""),
            sources: HashMap::new(),
        }
    }

    pub fn from_settings(enrich: &EnrichSettings, policy: &PolicySettings) -> anyhow::Result<Self> {
        let secret = enrich.hash_secret.expose();
        Ok(Self {
            agents: enrich.user_agent.then(|| AgentParser::new(&enrich.bots)),
            geo: enrich
                .geo_database()
                .map(|p| GeoReader::open(p))
                .transpose()?,
            default: SourceRules::new(&policy.default, secret),
            sources: policy
                .sources
                .keys()
                .map(|name| {
                    (
                        name.clone(),
                        SourceRules::new(&policy.for_source(name), secret),
                    )
                })
                .collect(),
        })
    }

    /// Whether [`Enrichment::annotate`] adds anything.
    pub fn annotates(&self) -> bool {
        self.agents.is_some() || self.geo.is_some()
    }

    pub fn rules(&self, source: &str) -> &SourceRules {
        self.sources.get(source).unwrap_or(&self.default)
    }

    /// Adds `context.userAgentParsed` and `context.bot` from `context.userAgent`, and
    /// `context.geo` from `context.ip`. An event whose `context` is not an object gets none.
    /// `memo` carries the last address located from one event of a delivery to the next (a
    /// request's events mostly share one).
    pub fn annotate(&self, event: &mut Doc, memo: &mut Memo) -> Annotated {
        let mut found = Annotated::default();
        if !self.annotates() {
            return found;
        }
        let context = event.get("context");
        let agent = match (&self.agents, context.and_then(|c| c.get("userAgent"))) {
            (Some(parser), Some(agent)) => agent.as_str().map(|agent| match &memo.agent {
                Some((last, read)) if **last == *agent => read.clone(),
                _ => {
                    let read = parser.read_with_annotation(agent);
                    memo.agent = Some((agent.into(), read.clone()));
                    read
                }
            }),
            _ => None,
        };
        let geo = self.geo.as_ref().map(|reader| {
            let ip = context
                .and_then(|c| c.get("ip"))
                .and_then(|ip| ip.as_str())
                .and_then(|ip| ip.trim().parse::<IpAddr>().ok())?;
            Some(match &memo.geo {
                Some((last, located)) if *last == ip => located.clone(),
                _ => {
                    let located = reader.locate(ip).map(|geo| {
                        let fields = [
                            ("country", geo.country.as_deref()),
                            ("countryName", geo.country_name.as_deref()),
                            ("city", geo.city.as_deref()),
                        ];
                        Arc::new(Val::Obj(vec![("geo".into(), agent::object_of(&fields))]))
                    });
                    memo.geo = Some((ip, located.clone()));
                    located
                }
            })
        });
        found.geo = match &geo {
            None => GeoResult::Off,
            Some(None) => GeoResult::NoAddress,
            Some(Some(None)) => GeoResult::Missing,
            Some(Some(Some(_))) => GeoResult::Found,
        };
        let Some(mut object) = event.object_mut() else {
            return found;
        };
        let Some(mut context) = object.object_entry("context") else {
            return found;
        };
        if let Some(read) = agent {
            context.insert("userAgentParsed", Val::Shared(read.annotation.clone(), 0));
            if let Some(bot) = &read.agent.bot {
                context.insert("bot", Val::Shared(read.annotation.clone(), 1));
                found.bot = Some(bot.clone());
            }
        }
        if let Some(Some(Some(geo))) = geo {
            context.insert("geo", Val::Shared(geo, 0));
        }
        found
    }
}

/// What one delivery's events share (a request's events mostly come from one device): the
/// last user agent read, the last address located and the last one truncated, and the privacy
/// rules' edits of the batch's shared values. For one delivery only: those edits read its text.
#[derive(Default)]
pub struct Memo {
    agent: Option<(Box<str>, agent::Read)>,
    geo: Option<(IpAddr, Option<Arc<Val>>)>,
    /// An address as sent, and what truncating it gave (`None`: not an address).
    truncated_ip: Option<(Box<str>, Option<Box<str>>)>,
    edits: ingest_schema::SharedEdits,
    /// What hashes and redactions of shared values grew by, in this delivery.
    shared_grown: usize,
}

/// Whether an event is kept under a sampling rule that keeps `keep` of its name's events: the
/// same answer for every copy of the event (its `messageId` decides), in every worker.
pub fn sampled_in(message_id: &str, keep: f64) -> bool {
    use sha2::Digest as _;
    if keep >= 1.0 {
        return true;
    }
    let digest = sha2::Sha256::digest(message_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // The top 53 bits, as a share of 1.
    let share = (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64;
    share < keep
}

const MESSAGE_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6c1f_3a2e_9b8d_4f70_a5e1_20c4_7d9b_13aa);

/// The `messageId` given to an event that came without one: a UUIDv5 of the request's content
/// seed (`decode::content_seed`) and the event's position in the request, stable across
/// redeliveries and across a client's retries of the same request.
pub fn derived_message_id(seed: &str, index: usize) -> String {
    uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, format!("{seed}/{index}").as_bytes()).to_string()
}

/// Segment's clock-skew correction: a device clock that is off shifts `timestamp` and `sentAt`
/// alike, so `timestamp = receivedAt − (sentAt − originalTimestamp)`. Without `sentAt` the
/// device's timestamp is kept; without a timestamp, the receive time is the best we know.
pub fn corrected_timestamp(
    received_at: DateTime<Utc>,
    original: Option<DateTime<Utc>>,
    sent_at: Option<DateTime<Utc>>,
) -> DateTime<Utc> {
    match (original, sent_at) {
        (Some(original), Some(sent_at)) => received_at
            .checked_sub_signed(sent_at - original)
            .unwrap_or(original),
        (Some(original), None) => original,
        (None, _) => received_at,
    }
}

pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn parse_time(value: Option<&Value>) -> Option<DateTime<Utc>> {
    parse_time_str(value?.as_str()?)
}

pub fn parse_time_str(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Whether [`enrich`] will derive this event's `messageId` (it has none).
pub fn needs_message_id(event: &Doc) -> bool {
    event.get("messageId").is_none()
}

/// Adds `messageId` (if absent), `receivedAt`, `sentAt` (from the batch, if the event has none),
/// `originalTimestamp` + corrected `timestamp`, `source`, `requestId`, and `context.ip` /
/// `context.userAgent` when the SDK did not set them. What it adds is the event's own; the
/// rest stays spans of the delivery's text.
pub fn enrich(
    event: &mut Doc,
    meta: &RequestMeta,
    id_seed: &str,
    index: usize,
    batch_sent_at: Option<&Doc>,
) {
    let sent_at_missing = event.get("sentAt").is_none();
    // The original time as sent, and what it reads as.
    let original = event
        .get("originalTimestamp")
        .or_else(|| event.get("timestamp"))
        .map(|node| (node.val().clone(), node.as_str().and_then(parse_time_str)));
    let sent_at = match event.get("sentAt") {
        Some(own) => own.as_str().and_then(parse_time_str),
        None => batch_sent_at
            .and_then(|sent_at| sent_at.node().as_str())
            .and_then(parse_time_str),
    };
    let needs_id = needs_message_id(event);
    let batch_sent_at = batch_sent_at.map(|sent_at| sent_at.val_for(event));
    let Some(mut object) = event.object_mut() else {
        return;
    };
    if needs_id {
        object.insert("messageId", Val::string(derived_message_id(id_seed, index)));
    }
    if sent_at_missing {
        if let Some(sent_at) = batch_sent_at {
            object.insert("sentAt", sent_at);
        }
    }
    object.insert("receivedAt", Val::string(format_time(meta.received_at)));

    let unparseable = matches!(original, Some((_, None)));
    if !unparseable {
        let (original_value, original_time) = match original {
            Some((value, time)) => (Some(value), time),
            None => (None, None),
        };
        let corrected = corrected_timestamp(meta.received_at, original_time, sent_at);
        if let Some(value) = original_value {
            object.insert("originalTimestamp", value);
        }
        object.insert("timestamp", Val::string(format_time(corrected)));
    }

    object.insert("source", Val::string(meta.source.as_str()));
    object.insert("requestId", Val::string(meta.request_id.as_str()));
    if let Some(mut context) = object.object_entry("context") {
        if let Some(ip) = &meta.client_ip {
            context.insert_if_absent("ip", || Val::string(ip.as_str()));
        }
        if let Some(agent) = &meta.user_agent {
            context.insert_if_absent("userAgent", || Val::string(agent.as_str()));
        }
    }
}

#[cfg(test)]
mod tests {
    use ingest_pipeline::message::Endpoint;
    use serde_json::json;

    fn doc(value: Value) -> Doc {
        Doc::from_value(&value)
    }

    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn meta() -> RequestMeta {
        RequestMeta {
            request_id: "req-1".into(),
            received_at: t("2026-11-21T12:00:00.000Z"),
            source: "shop-ios".into(),
            endpoint: Endpoint::Batch,
            client_ip: Some("203.0.113.9".into()),
            user_agent: Some("ShopApp/1.0".into()),
        }
    }

    #[test]
    fn skew_is_removed_using_sent_at() {
        // Device clock 1 hour fast: event at device 13:00:00, sent at device 13:00:05,
        // received at true 12:00:06 -> event happened at true 12:00:01.
        let fixed = corrected_timestamp(
            t("2026-11-21T12:00:06Z"),
            Some(t("2026-11-21T13:00:00Z")),
            Some(t("2026-11-21T13:00:05Z")),
        );
        assert_eq!(fixed, t("2026-11-21T12:00:01Z"));
    }

    #[test]
    fn without_sent_at_the_device_time_stands_and_without_timestamp_receipt_time_is_used() {
        let received = t("2026-11-21T12:00:00Z");
        let device = t("2026-11-21T11:59:00Z");
        assert_eq!(corrected_timestamp(received, Some(device), None), device);
        assert_eq!(corrected_timestamp(received, None, Some(device)), received);
    }

    #[test]
    fn enrich_corrects_timestamp_with_batch_sent_at_and_keeps_the_original() {
        let mut event =
            doc(json!({"type":"track","event":"X","timestamp":"2026-11-21T13:00:00.000Z"}));
        enrich(
            &mut event,
            &meta(),
            "seed-1",
            3,
            Some(&doc(json!("2026-11-21T13:00:10.000Z"))),
        );
        let event = event.to_value();
        assert_eq!(
            event["originalTimestamp"],
            json!("2026-11-21T13:00:00.000Z")
        );
        assert_eq!(event["timestamp"], json!("2026-11-21T11:59:50.000Z"));
        assert_eq!(event["receivedAt"], json!("2026-11-21T12:00:00.000Z"));
        assert_eq!(event["sentAt"], json!("2026-11-21T13:00:10.000Z"));
        assert_eq!(event["source"], json!("shop-ios"));
        assert_eq!(event["context"]["ip"], json!("203.0.113.9"));
        assert_eq!(event["context"]["userAgent"], json!("ShopApp/1.0"));
        assert_eq!(event["messageId"], json!(derived_message_id("seed-1", 3)));
    }

    #[test]
    fn existing_message_id_and_context_ip_are_kept() {
        let mut event = doc(json!({"messageId":"m-1","context":{"ip":"198.51.100.1"}}));
        enrich(&mut event, &meta(), "seed", 0, None);
        let event = event.to_value();
        assert_eq!(event["messageId"], json!("m-1"));
        assert_eq!(event["context"]["ip"], json!("198.51.100.1"));
        assert_eq!(event["timestamp"], json!("2026-11-21T12:00:00.000Z"));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derived_message_id("r", 0), derived_message_id("r", 0));
        assert_ne!(derived_message_id("r", 0), derived_message_id("r", 1));
        assert_ne!(derived_message_id("r", 0), derived_message_id("s", 0));
    }

    #[test]
    fn an_unparseable_timestamp_is_left_for_validation_to_report() {
        let mut event = doc(json!({"timestamp":"yesterday"}));
        enrich(&mut event, &meta(), "seed", 0, None);
        let event = event.to_value();
        assert_eq!(event["timestamp"], json!("yesterday"));
    }
}
