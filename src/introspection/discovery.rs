//! `--issuer`: the identity server's metadata (OpenID Connect Discovery, then RFC 8414), read
//! at start for its `introspection_endpoint`, retried with backoff until it is known.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::Url;
use reqwest::header::ACCEPT;

use super::read_capped;

/// Why the metadata gave no endpoint. Names no secret (the URLs hold none: validation refuses
/// credentials in `--issuer`).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// `reason`: the transport error and its causes (refused, DNS, TLS, timeout); the URL
    /// holds no credentials and no request body is sent.
    #[error("{url}: unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {problem}")]
    Metadata { url: String, problem: &'static str },
}

/// A pending discovery: where to look, and the cell the introspector reads its endpoint from.
#[derive(Clone)]
pub struct Discovery {
    pub(super) client: reqwest::Client,
    pub(super) issuer: String,
    pub(super) endpoint: Arc<OnceLock<Url>>,
}

impl Discovery {
    /// Whether the endpoint is known (what `/readyz` reports).
    pub fn is_done(&self) -> bool {
        self.endpoint.get().is_some()
    }

    /// Reads the metadata until an endpoint comes out of it, waiting 0.5 s after the first
    /// failure, doubling up to 30 s. Each failure is logged with its reason.
    pub async fn run(self) {
        let mut wait = Duration::from_millis(500);
        loop {
            match discover(&self.client, &self.issuer).await {
                Ok(endpoint) => {
                    tracing::info!(issuer = %self.issuer, introspection_endpoint = %endpoint,
                        "identity server discovered");
                    let _ = self.endpoint.set(endpoint);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?wait,
                        "identity server discovery failed; not ready");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(30));
        }
    }
}

/// The metadata documents an issuer may publish, in the order they are tried: OpenID's
/// (`<issuer>/.well-known/openid-configuration`) and RFC 8414's (the well-known segment
/// between the host and the issuer's path).
pub fn metadata_urls(issuer: &str) -> Vec<String> {
    let trimmed = issuer.trim_end_matches('/');
    let mut urls = vec![format!("{trimmed}/.well-known/openid-configuration")];
    if let Ok(url) = Url::parse(trimmed) {
        let path = url.path().trim_end_matches('/');
        let mut origin = url.clone();
        origin.set_path("");
        origin.set_query(None);
        let origin = origin.as_str().trim_end_matches('/').to_owned();
        urls.push(format!(
            "{origin}/.well-known/oauth-authorization-server{path}"
        ));
    }
    urls
}

/// The introspection endpoint from the first metadata document that answers; a document that
/// answers but is wrong (another issuer, no endpoint) is an error, not a reason to try the next.
pub async fn discover(client: &reqwest::Client, issuer: &str) -> Result<Url, DiscoveryError> {
    let mut last = None;
    for url in metadata_urls(issuer) {
        let response = match client
            .get(&url)
            .header(ACCEPT, "application/json")
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => {
                last = Some(DiscoveryError::Unreachable {
                    url,
                    reason: causes(&error),
                });
                continue;
            }
        };
        let status = response.status().as_u16();
        if status == 404 {
            last = Some(DiscoveryError::Status { url, status });
            continue;
        }
        if status != 200 {
            return Err(DiscoveryError::Status { url, status });
        }
        let metadata = |problem| DiscoveryError::Metadata {
            url: url.clone(),
            problem,
        };
        let body = read_capped(response)
            .await
            .map_err(|_| metadata("unreadable or too large"))?;
        return endpoint_from(&body, issuer).map_err(metadata);
    }
    Err(last.unwrap_or(DiscoveryError::Metadata {
        url: issuer.to_owned(),
        problem: "no metadata URL",
    }))
}

/// The deepest useful text of a transport error: reqwest's own message names the URL again, its
/// causes say what went wrong ("Connection refused", a certificate problem).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut reasons = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        reasons.push(cause.to_string());
        source = cause.source();
    }
    match reasons.last() {
        Some(deepest) => deepest.clone(),
        None => error.to_string(),
    }
}

/// Checks a metadata document and takes its introspection endpoint. Its `issuer` must be the
/// one configured, exactly (RFC 8414 §3.3), so that a document served for another issuer is
/// never trusted; an https issuer's endpoint must be https too.
pub fn endpoint_from(body: &[u8], issuer: &str) -> Result<Url, &'static str> {
    let metadata: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| "metadata is not JSON")?;
    let claimed = metadata
        .get("issuer")
        .and_then(serde_json::Value::as_str)
        .ok_or("metadata has no `issuer`")?;
    if claimed != issuer {
        return Err("metadata names another issuer than --issuer");
    }
    let endpoint = metadata
        .get("introspection_endpoint")
        .and_then(serde_json::Value::as_str)
        .ok_or("metadata has no `introspection_endpoint` (give --introspection-url)")?;
    let endpoint = Url::parse(endpoint).map_err(|_| "`introspection_endpoint` is not a URL")?;
    let downgraded = issuer.starts_with("https://") && endpoint.scheme() != "https";
    if !matches!(endpoint.scheme(), "http" | "https") || downgraded {
        return Err("`introspection_endpoint` is not an https URL");
    }
    if endpoint.host_str().is_none()
        || !endpoint.username().is_empty()
        || endpoint.password().is_some()
    {
        return Err("`introspection_endpoint` has no host, or carries credentials");
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_looked_for_where_both_specifications_put_it() {
        assert_eq!(
            metadata_urls("https://idp.example"),
            [
                "https://idp.example/.well-known/openid-configuration",
                "https://idp.example/.well-known/oauth-authorization-server"
            ]
        );
        assert_eq!(
            metadata_urls("https://idp.example/realms/main/"),
            [
                "https://idp.example/realms/main/.well-known/openid-configuration",
                "https://idp.example/.well-known/oauth-authorization-server/realms/main"
            ]
        );
    }

    #[test]
    fn only_the_configured_issuers_endpoint_is_taken() {
        let issuer = "https://idp.example";
        let doc = |issuer: &str, endpoint: &str| {
            format!(r#"{{"issuer":"{issuer}","introspection_endpoint":"{endpoint}"}}"#)
        };
        assert_eq!(
            endpoint_from(
                doc(issuer, "https://idp.example/introspect").as_bytes(),
                issuer
            )
            .unwrap()
            .as_str(),
            "https://idp.example/introspect"
        );
        for (body, problem) in [
            (
                doc("https://evil.example", "https://idp.example/i"),
                "metadata names another issuer than --issuer",
            ),
            (
                doc(issuer, "http://idp.example/i"),
                "`introspection_endpoint` is not an https URL",
            ),
            (
                doc(issuer, "https://user:pw@idp.example/i"),
                "`introspection_endpoint` has no host, or carries credentials",
            ),
            (
                doc(issuer, "https://:pw@idp.example/i"),
                "`introspection_endpoint` has no host, or carries credentials",
            ),
            (
                r#"{"issuer":"https://idp.example"}"#.to_owned(),
                "metadata has no `introspection_endpoint` (give --introspection-url)",
            ),
            ("[]".to_owned(), "metadata has no `issuer`"),
            ("<html>".to_owned(), "metadata is not JSON"),
        ] {
            assert_eq!(
                endpoint_from(body.as_bytes(), issuer),
                Err(problem),
                "{body}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_reported_with_its_reason() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Nothing listens on port 1 of the loopback interface.
        let error = discover(&reqwest::Client::new(), "http://127.0.0.1:1")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("http://127.0.0.1:1/.well-known/") && error.contains("refused"),
            "{error}"
        );
    }
}
