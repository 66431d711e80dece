//! Webhooks: an HTTP POST of the JSON body, signed as Standard Webhooks do it.
//!
//! Headers: `webhook-id` (the notification id, the same on every retry so receivers can
//! deduplicate), `webhook-timestamp` (Unix seconds of this attempt) and `webhook-signature`
//! (`v1,` + base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`; the key is the base64-decoded
//! part after `whsec_`, or the secret's raw bytes when it has no such prefix). Redirects are not
//! followed (a redirect is a permanent failure), and every request has the `[delivery]
//! webhook_timeout`.

use super::retry::parse_retry_after;
use super::{Attempt, DeliveryError};
use crate::settings::{display_duration, WebhookSettings};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use sha2::Sha256;
use std::time::Duration;
use time::OffsetDateTime;

/// Sends webhooks; cheap to share (one connection pool).
#[derive(Clone)]
pub struct WebhookSender {
    client: reqwest::Client,
    timeout: Duration,
}

impl WebhookSender {
    pub fn new(timeout: Duration) -> Result<WebhookSender, DeliveryError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("keywatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DeliveryError::Config(format!("cannot set up the HTTP client: {e}")))?;
        Ok(WebhookSender { client, timeout })
    }

    /// One attempt to deliver `body` as notification `id` to `hook`.
    pub async fn send(&self, hook: &WebhookSettings, id: &str, body: &str) -> Attempt {
        let timestamp = OffsetDateTime::now_utc().unix_timestamp();
        let signature = signature(hook.secret.expose_secret(), id, timestamp, body);
        let request = self
            .client
            .post(&hook.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned());
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retryable {
                    error: describe(e, self.timeout),
                    retry_after: None,
                }
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, OffsetDateTime::now_utc()));
        let answer = read_some(response).await;
        let error = || {
            let reason = status.canonical_reason().unwrap_or("");
            let mut text = format!("HTTP {} {reason}", status.as_u16());
            if !answer.is_empty() {
                text.push_str(": ");
                text.push_str(&answer);
            }
            text.trim_end().to_owned()
        };
        if status.is_success() {
            Attempt::Delivered
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Attempt::Retryable {
                error: error(),
                retry_after,
            }
        } else if status.is_server_error() {
            Attempt::Retryable {
                error: error(),
                retry_after: None,
            }
        } else if status.is_redirection() {
            Attempt::Permanent(format!("{} (redirects are not followed)", error()))
        } else {
            Attempt::Permanent(error())
        }
    }
}

/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")), the Standard Webhooks signature.
pub fn signature(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = match secret.strip_prefix("whsec_") {
        // Checked when the configuration was loaded; a bad value signs with the raw text.
        Some(encoded) => b64
            .decode(encoded)
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1,{}", b64.encode(mac.finalize().into_bytes()))
}

/// The start of the response body as one line (at most 200 characters); reads at most 64 KiB so
/// that the connection can be reused.
async fn read_some(mut response: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < 64 * 1024 {
        match response.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf[..buf.len().min(1024)]);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

/// A transport error with its causes, without the URL (its path may hold a token).
fn describe(error: reqwest::Error, timeout: Duration) -> String {
    let error = error.without_url();
    let mut parts: Vec<String> = Vec::new();
    if error.is_timeout() {
        parts.push(format!("timed out after {}", display_duration(timeout)));
    } else if error.is_connect() {
        parts.push("cannot connect".to_owned());
    }
    for text in crate::errors::causes(&error) {
        if !parts.iter().any(|p| p.ends_with(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_standard_webhooks_reference() {
        // The example of the Standard Webhooks specification (and its reference libraries).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            signature(secret, id, 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn a_secret_without_prefix_is_used_as_raw_bytes() {
        let a = signature("raw-secret", "id", 1, "{}");
        let encoded = base64::engine::general_purpose::STANDARD.encode("raw-secret");
        let b = signature(&format!("whsec_{encoded}"), "id", 1, "{}");
        assert_eq!(a, b);
    }
}
