//! E-mail over SMTP with lettre: `[smtp] tls` = `starttls` (upgrade required), `tls` (TLS from
//! the first byte) or `none` (a local relay or a test server), optional login, `[smtp] timeout`
//! per command. Each message has a plain text body and an HTML alternative, and a `Message-ID`
//! derived from the notification id, so a message sent twice (after a crash mid-send) can be
//! recognised as one.

use super::content::EmailContent;
use super::{Attempt, DeliveryError};
use crate::settings::{SmtpSettings, SmtpTls};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;

/// Sends e-mail through the configured server (a small connection pool).
#[derive(Clone)]
pub struct EmailSender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl EmailSender {
    /// `None` when `[smtp] host` or `from` is not set (the configuration allows that only when no
    /// route has e-mail receivers).
    pub fn new(smtp: &SmtpSettings) -> Result<Option<EmailSender>, DeliveryError> {
        let (Some(host), Some(from_text)) = (smtp.host.as_deref(), smtp.from.as_deref()) else {
            return Ok(None);
        };
        let from: Mailbox = from_text.parse().map_err(|e| {
            DeliveryError::Config(format!("smtp.from: invalid address {from_text:?}: {e}"))
        })?;
        let tls_error = |e: lettre::transport::smtp::Error| {
            DeliveryError::Config(format!("smtp.host {host:?}: {e}"))
        };
        let builder = match smtp.tls {
            SmtpTls::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host).map_err(tls_error)?
            }
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(host).map_err(tls_error)?,
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host),
        };
        let mut builder = builder.port(smtp.port).timeout(Some(smtp.timeout));
        if let (Some(user), Some(password)) = (&smtp.username, &smtp.password) {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose_secret().to_owned(),
            ));
        }
        Ok(Some(EmailSender {
            transport: builder.build(),
            from,
        }))
    }

    /// One attempt to send `mail` as notification `id` to `to`.
    pub async fn send(&self, to: &str, id: &str, mail: &EmailContent) -> Attempt {
        let to: Mailbox = match to.parse() {
            Ok(m) => m,
            Err(e) => return Attempt::Permanent(format!("invalid address {to:?}: {e}")),
        };
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.as_str())
            .message_id(Some(format!("<{id}@keywatch>")))
            .date_now()
            .multipart(MultiPart::alternative_plain_html(
                mail.text.clone(),
                mail.html.clone(),
            ));
        let message = match message {
            Ok(m) => m,
            Err(e) => return Attempt::Permanent(format!("cannot build the message: {e}")),
        };
        match self.transport.send(message).await {
            Ok(_) => Attempt::Delivered,
            Err(e) => {
                let text = describe(&e);
                if e.is_permanent() {
                    Attempt::Permanent(text)
                } else {
                    Attempt::Retryable {
                        error: text,
                        retry_after: None,
                    }
                }
            }
        }
    }
}

/// The error with its causes, in one line (the SMTP reply of the server included).
fn describe(error: &lettre::transport::smtp::Error) -> String {
    format!("smtp: {}", crate::errors::causes(error).join(": "))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
