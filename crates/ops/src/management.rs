//! Reading the RabbitMQ management API (`broker.management_url`): one queue's object, the
//! cluster's nodes and its resource alarms. Any node's API answers for the whole cluster. The
//! answers are parsed in [`crate::cluster`] and [`crate::parse_rates`], which take every field
//! as possibly missing.

use std::time::Duration;

use anyhow::Context as _;

use crate::{cluster, Status};

/// The JSON at `base` + `/api/` + `segments` (each percent-encoded as one path segment).
async fn get(base: &str, segments: &[&str]) -> anyhow::Result<reqwest::Response> {
    let mut url = reqwest::Url::parse(base).context("broker.management_url")?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("broker.management_url is not an http(s) URL"))?
        .pop_if_empty()
        .push("api")
        .extend(segments);
    // reqwest sends the URL's credentials (decoded) as the one Authorization header; the
    // management API answers a doubled header with 400.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    // Without the URL: it holds the management API's credentials, and errors end up in
    // monitoring status lines.
    client
        .get(url)
        .send()
        .await
        .map_err(|e| e.without_url().into())
}

async fn get_json(base: &str, segments: &[&str]) -> anyhow::Result<serde_json::Value> {
    let response = get(base, segments)
        .await?
        .error_for_status()
        .map_err(reqwest::Error::without_url)?;
    Ok(response.json().await.map_err(reqwest::Error::without_url)?)
}

/// The vhost of an AMQP URL (`/` for `…/%2f`), as the management API's paths name it.
pub fn vhost(amqp_url: &str) -> anyhow::Result<String> {
    Ok(amqp_url
        .parse::<lapin::uri::AMQPUri>()
        .map_err(|e| anyhow::anyhow!("broker URL: {e}"))?
        .vhost)
}

/// `GET /api/queues/{vhost}/{name}`, for the vhost of the broker URL.
pub async fn queue(base: &str, amqp_url: &str, name: &str) -> anyhow::Result<serde_json::Value> {
    let vhost = vhost(amqp_url)?;
    get_json(base, &["queues", &vhost, name]).await
}

/// `GET /api/nodes`: every node of the cluster, running or not.
pub async fn nodes(base: &str) -> anyhow::Result<serde_json::Value> {
    get_json(base, &["nodes"]).await
}

/// `GET /api/health/checks/alarms`: the resource alarms in effect anywhere in the cluster (200
/// without, 503 with a list). `None` when the API has no such check (before RabbitMQ 3.8.10)
/// or its answer is not one of the two.
pub async fn alarms(base: &str) -> anyhow::Result<Option<serde_json::Value>> {
    let response = get(base, &["health", "checks", "alarms"]).await?;
    let status = response.status().as_u16();
    if status != 200 && status != 503 {
        return Ok(None);
    }
    Ok(response.json().await.ok())
}

/// A queue check's result with the queue's members added when it is a quorum queue (see
/// [`cluster::with_members`]); members that cannot be read are unknown.
pub async fn add_members(
    base: &str,
    amqp_url: &str,
    name: &str,
    status: Status,
    line: &str,
) -> (Status, String) {
    match queue(base, amqp_url, name).await {
        Ok(queue) => match cluster::parse_members(&queue) {
            Some(members) => cluster::with_members(status, line, Ok(&members)),
            None => (status, line.to_owned()),
        },
        Err(error) => {
            let why = format!("management API: {error:#}");
            cluster::with_members(status, line, Err(&why))
        }
    }
}

/// `check --cluster`: the nodes of `GET /api/nodes`, with the cluster-wide alarm list when the
/// API has it (without it, the nodes' own alarm fields are all there is).
pub async fn check_cluster(base: &str) -> (Status, String) {
    let unknown = |why: String| (Status::Unknown, format!("CLUSTER UNKNOWN - {why}"));
    let nodes = match nodes(base).await {
        Ok(answer) => match cluster::parse_nodes(&answer) {
            Some(nodes) => nodes,
            None => return unknown("management API: /api/nodes gave no list of nodes".into()),
        },
        Err(error) => return unknown(format!("management API: {error:#}")),
    };
    let alarms = match alarms(base).await {
        Ok(answer) => answer.as_ref().and_then(cluster::parse_alarms),
        Err(_) => None,
    };
    cluster::check_cluster(&nodes, alarms.as_deref())
}
