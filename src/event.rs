//! The edge: Activity Tracker JSON in, domain events out. Only this module knows the wire format.
//!
//! Two passes. `skim` reads every record without building a document tree: it validates the JSON
//! and borrows the few top-level fields needed to decide whether the record matters (`action`,
//! `target.id`, `eventTime`, `correlationId`). Only records that the engine handles are then parsed
//! in full (`parse_full`) into an [`Event`]; they are about 2% of a real stream.

use crate::timefmt::Millis;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use std::borrow::Cow;
use std::fmt;

/// What the top-level `action` field held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionField<'a> {
    Missing,
    NotAString,
    Str(Cow<'a, str>),
}

/// The fields of a record that decide its relevance, borrowed from the input where possible.
#[derive(Debug)]
pub struct Skim<'a> {
    pub action: ActionField<'a>,
    pub target_id: Option<Cow<'a, str>>,
    pub event_time: Option<Cow<'a, str>>,
    pub correlation_id: Option<Cow<'a, str>>,
}

/// Why a record is invalid (counted, logged with its position, dead-lettered).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    #[error("not valid JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no string \"action\" field")]
    NoAction,
    #[error("{0}: no \"target.id\"")]
    NoTarget(String),
    #[error("{action}: unparseable \"eventTime\" {time:?}")]
    BadTime { action: String, time: String },
}

/// Reads a record's deciding fields; fails when the record is not a JSON object.
pub fn skim(line: &[u8]) -> Result<Skim<'_>, InvalidReason> {
    let mut de = serde_json::Deserializer::from_slice(line);
    let skim = match TopLevel::deserialize(&mut de) {
        Ok(TopLevel(Some(s))) => s,
        Ok(TopLevel(None)) => return Err(InvalidReason::NotAnObject),
        Err(e) => return Err(InvalidReason::NotJson(e.to_string())),
    };
    de.end()
        .map_err(|e| InvalidReason::NotJson(e.to_string()))?;
    Ok(skim)
}

/// How the engine treats an action, decided from its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionClass {
    /// A key lifecycle action of Key Protect or Hyper Protect Crypto Services.
    Key(KeyAction),
    PolicyCreate,
    PolicyDelete,
    InstanceDelete,
    /// A legacy acknowledgement (`kms.secrets-event.ack`, `kms.secrets.eventack`): which lifecycle
    /// action it acknowledges is in `responseData.eventAckData.eventType`.
    LegacyAck,
    /// Routine key traffic (wrap, unwrap, read, list, ...): ignored without looking further.
    RoutineKey,
    /// Anything else: ignored, unless its target is a registered deployment (a correlated follow-up).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyAction {
    Disable,
    Enable,
    Delete,
    Restore,
    Purge,
    Expire,
    SetKeyForDeletion,
    UnsetKeyForDeletion,
    Rotate,
    Ack(AckOf),
}

/// The lifecycle action an `ack-*` event acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AckOf {
    Rotate,
    Delete,
    Restore,
    Enable,
    Disable,
}

impl KeyAction {
    pub fn name(self) -> &'static str {
        match self {
            KeyAction::Disable => "disable",
            KeyAction::Enable => "enable",
            KeyAction::Delete => "delete",
            KeyAction::Restore => "restore",
            KeyAction::Purge => "purge",
            KeyAction::Expire => "expire",
            KeyAction::SetKeyForDeletion => "setkeyfordeletion",
            KeyAction::UnsetKeyForDeletion => "unsetkeyfordeletion",
            KeyAction::Rotate => "rotate",
            KeyAction::Ack(AckOf::Rotate) => "ack-rotate",
            KeyAction::Ack(AckOf::Delete) => "ack-delete",
            KeyAction::Ack(AckOf::Restore) => "ack-restore",
            KeyAction::Ack(AckOf::Enable) => "ack-enable",
            KeyAction::Ack(AckOf::Disable) => "ack-disable",
        }
    }
}

/// Classifies an action name. Case does not matter; in key verbs `-` and `_` do not either, so
/// legacy spellings such as `ackrotate` or `set_key_for_deletion` are accepted.
pub fn classify_action(action: &str) -> ActionClass {
    let (service_len, rest) = if let Some(r) = strip_prefix_ci(action, "kms.") {
        (3, r)
    } else if let Some(r) = strip_prefix_ci(action, "hs-crypto.") {
        (9, r)
    } else if strip_prefix_ci(action, "iam-am.policy.").is_some() {
        let verb = &action["iam-am.policy.".len()..];
        return if verb.eq_ignore_ascii_case("create") {
            ActionClass::PolicyCreate
        } else if verb.eq_ignore_ascii_case("delete") {
            ActionClass::PolicyDelete
        } else {
            ActionClass::Other
        };
    } else {
        return if ends_with_ci(action, ".instance.delete") {
            ActionClass::InstanceDelete
        } else {
            ActionClass::Other
        };
    };
    let _ = service_len;
    if let Some(verb) = strip_prefix_ci(rest, "secrets.") {
        match normalized_verb(verb) {
            Some(v) => key_verb(&v),
            None => ActionClass::RoutineKey,
        }
    } else if rest.eq_ignore_ascii_case("secrets-event.ack") {
        ActionClass::LegacyAck
    } else if ends_with_ci(rest, ".instance.delete") {
        ActionClass::InstanceDelete
    } else {
        ActionClass::RoutineKey
    }
}

fn key_verb(v: &str) -> ActionClass {
    use KeyAction::*;
    ActionClass::Key(match v {
        "disable" => Disable,
        "enable" => Enable,
        "delete" => Delete,
        "restore" => Restore,
        "purge" => Purge,
        "expire" => Expire,
        "setkeyfordeletion" => SetKeyForDeletion,
        "unsetkeyfordeletion" => UnsetKeyForDeletion,
        "rotate" => Rotate,
        "ackrotate" => Ack(AckOf::Rotate),
        "ackdelete" => Ack(AckOf::Delete),
        "ackrestore" => Ack(AckOf::Restore),
        "ackenable" => Ack(AckOf::Enable),
        "ackdisable" => Ack(AckOf::Disable),
        "eventack" => return ActionClass::LegacyAck,
        _ => return ActionClass::RoutineKey,
    })
}

/// Lower-cases a short verb and drops `-`/`_`; `None` for verbs too long to be a lifecycle verb.
fn normalized_verb(verb: &str) -> Option<String> {
    if verb.len() > 24 {
        return None;
    }
    Some(
        verb.bytes()
            .filter(|b| *b != b'-' && *b != b'_')
            .map(|b| b.to_ascii_lowercase() as char)
            .collect(),
    )
}

/// Maps a legacy ack's `eventType` to the action it acknowledges.
pub fn ack_of_event_type(event_type: &str) -> Option<AckOf> {
    let t = event_type.to_ascii_lowercase();
    Some(match t.as_str() {
        "rotation" | "rotate" => AckOf::Rotate,
        "deletion" | "delete" => AckOf::Delete,
        "restore" | "restoration" => AckOf::Restore,
        "enable" | "enablement" => AckOf::Enable,
        "disable" | "disablement" => AckOf::Disable,
        _ => return None,
    })
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len()
        && s.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

fn ends_with_ci(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.as_bytes()[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
}

/// A 128-bit digest of an event's JSON value (key order and white space aside): its identity for
/// deduplication and the tie-breaker between events with the same `eventTime`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventDigest(pub [u8; 16]);

impl EventDigest {
    pub fn of_value(v: &Value) -> EventDigest {
        // serde_json's Map is ordered by key (no preserve_order feature), so this is canonical.
        let bytes = serde_json::to_vec(v).unwrap_or_default();
        let hash = Sha256::digest(&bytes);
        let mut d = [0u8; 16];
        d.copy_from_slice(&hash[..16]);
        EventDigest(d)
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<EventDigest> {
        if s.len() != 32 {
            return None;
        }
        let mut d = [0u8; 16];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            d[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        }
        Some(EventDigest(d))
    }
}

impl fmt::Debug for EventDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl serde::Serialize for EventDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}

impl<'de> Deserialize<'de> for EventDigest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        EventDigest::from_hex(&s).ok_or_else(|| de::Error::custom("invalid event digest"))
    }
}

/// The order of events for last-writer-wins: `eventTime`, then the digest as a deterministic tie-break.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Stamp {
    pub time: Millis,
    pub digest: EventDigest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
    Pending,
    Unknown,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Initiator {
    pub id: Option<String>,
    pub name: Option<String>,
}

/// A record the engine handles, parsed in full.
#[derive(Debug, Clone)]
pub struct Event {
    pub class: ActionClass,
    pub action: String,
    pub time: Millis,
    pub digest: EventDigest,
    pub outcome: Outcome,
    pub reason_code: Option<i64>,
    pub correlation_id: Option<String>,
    pub target_id: String,
    pub initiator: Initiator,
    pub request: Value,
    pub response: Value,
}

impl Event {
    pub fn stamp(&self) -> Stamp {
        Stamp {
            time: self.time,
            digest: self.digest,
        }
    }

    /// The CRN an acknowledgement names (`responseData.resourceCRN` or `...eventAckData.resourceCRN`).
    pub fn ack_resource(&self) -> Option<&str> {
        str_at(&self.response, &["resourceCRN"])
            .or_else(|| str_at(&self.response, &["eventAckData", "resourceCRN"]))
            .or_else(|| str_at(&self.response, &["resourceCrn"]))
            .filter(|s| !s.trim().is_empty())
    }

    pub fn new_key_version(&self) -> Option<&str> {
        str_at(&self.response, &["eventAckData", "newKeyVersionId"])
            .or_else(|| str_at(&self.response, &["newKeyVersionId"]))
            .or_else(|| str_at(&self.response, &["keyVersionId"]))
    }

    /// The key id in `requestData.requestURI` (`/api/v2/keys/<id>...`), a fallback when the target
    /// is not a key CRN.
    pub fn key_id_from_request_uri(&self) -> Option<&str> {
        let uri = str_at(&self.request, &["requestURI"])?;
        let rest = &uri[uri.find("/keys/")? + "/keys/".len()..];
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        Some(&rest[..end]).filter(|s| !s.is_empty())
    }
}

/// Follows `path` through objects; a string holding JSON along the way is parsed (IAM sends those).
pub fn value_at<'v>(v: &'v Value, path: &[&str]) -> Option<&'v Value> {
    let mut cur = v;
    for p in path {
        cur = cur.as_object()?.get(*p)?;
    }
    Some(cur)
}

pub fn str_at<'v>(v: &'v Value, path: &[&str]) -> Option<&'v str> {
    value_at(v, path)?.as_str()
}

/// A field that may be an object or a string holding JSON: returns the object form.
pub fn object_or_json_string(v: Option<&Value>) -> Value {
    match v {
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::Null),
        Some(other) => other.clone(),
        None => Value::Null,
    }
}

/// Full parse of a record already known to be a JSON object with a string action.
pub fn parse_full(line: &[u8], class: ActionClass) -> Result<Event, InvalidReason> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| InvalidReason::NotJson(e.to_string()))?;
    let obj = value.as_object().ok_or(InvalidReason::NotAnObject)?;
    let action = obj
        .get("action")
        .and_then(Value::as_str)
        .ok_or(InvalidReason::NoAction)?
        .to_owned();
    let target_id = value_at(&value, &["target", "id"])
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| InvalidReason::NoTarget(action.clone()))?
        .trim()
        .to_owned();
    let time_text = obj.get("eventTime").and_then(Value::as_str);
    let time = time_text
        .and_then(Millis::parse)
        .ok_or_else(|| InvalidReason::BadTime {
            action: action.clone(),
            time: match obj.get("eventTime") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "(missing)".into(),
            },
        })?;
    let outcome = match obj.get("outcome").and_then(Value::as_str) {
        Some(o) if o.eq_ignore_ascii_case("success") => Outcome::Success,
        Some(o) if o.eq_ignore_ascii_case("failure") => Outcome::Failure,
        Some(o) if o.eq_ignore_ascii_case("pending") => Outcome::Pending,
        _ => Outcome::Unknown,
    };
    let reason_code = value_at(&value, &["reason", "reasonCode"]).and_then(|v| match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    });
    let correlation_id = obj
        .get("correlationId")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let initiator = Initiator {
        id: str_at(&value, &["initiator", "id"]).map(str::to_owned),
        name: str_at(&value, &["initiator", "name"]).map(str::to_owned),
    };
    let request = object_or_json_string(obj.get("requestData"));
    let response = object_or_json_string(obj.get("responseData"));
    let digest = EventDigest::of_value(&value);
    Ok(Event {
        class,
        action,
        time,
        digest,
        outcome,
        reason_code,
        correlation_id,
        target_id,
        initiator,
        request,
        response,
    })
}

// ---- the skimming deserializer ----

struct TopLevel<'a>(Option<Skim<'a>>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = TopLevel<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an Activity Tracker event")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut skim = Skim {
            action: ActionField::Missing,
            target_id: None,
            event_time: None,
            correlation_id: None,
        };
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Action => {
                    skim.action = match map.next_value::<MaybeStr>()?.0 {
                        Some(s) => ActionField::Str(s),
                        None => ActionField::NotAString,
                    }
                }
                Field::Target => skim.target_id = map.next_value::<TargetId>()?.0,
                Field::EventTime => skim.event_time = map.next_value::<MaybeStr>()?.0,
                Field::CorrelationId => skim.correlation_id = map.next_value::<MaybeStr>()?.0,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(TopLevel(Some(skim)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(TopLevel(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(TopLevel(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(TopLevel(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(TopLevel(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(TopLevel(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(TopLevel(None))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(TopLevel(None))
    }
}

enum Field {
    Action,
    Target,
    EventTime,
    CorrelationId,
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Field;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E>(self, v: &str) -> Result<Field, E> {
                Ok(match v {
                    "action" => Field::Action,
                    "target" => Field::Target,
                    "eventTime" => Field::EventTime,
                    "correlationId" => Field::CorrelationId,
                    _ => Field::Other,
                })
            }
        }
        d.deserialize_identifier(V)
    }
}

/// A value that is kept when it is a string and skipped (validated) otherwise.
struct MaybeStr<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for MaybeStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MaybeStrVisitor)
    }
}

struct MaybeStrVisitor;

impl<'de> Visitor<'de> for MaybeStrVisitor {
    type Value = MaybeStr<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(MaybeStr(Some(Cow::Borrowed(v))))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(MaybeStr(Some(Cow::Owned(v.to_owned()))))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(MaybeStr(Some(Cow::Owned(v))))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(MaybeStr(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(MaybeStr(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(MaybeStr(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(MaybeStr(None))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(MaybeStr(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(MaybeStr(None))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(MaybeStr(None))
    }
}

/// `target` reduced to its `id` string.
struct TargetId<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for TargetId<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TargetId<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a target object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut id = None;
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    if k == "id" {
                        id = map.next_value::<MaybeStr>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(TargetId(id))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TargetId(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(TargetId(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(TargetId(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(TargetId(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(TargetId(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(TargetId(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(TargetId(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skims_the_deciding_fields() {
        let line = br#"{"eventTime":"2026-08-20T14:00:00.00+0000","requestData":{"action":"nested"},"action":"kms.secrets.delete","target":{"name":"x","id":"crn:v1:a"},"correlationId":"c1"}"#;
        let s = skim(line).unwrap();
        assert_eq!(
            s.action,
            ActionField::Str(Cow::Borrowed("kms.secrets.delete"))
        );
        assert_eq!(s.target_id.as_deref(), Some("crn:v1:a"));
        assert_eq!(s.event_time.as_deref(), Some("2026-08-20T14:00:00.00+0000"));
        assert_eq!(s.correlation_id.as_deref(), Some("c1"));
    }

    #[test]
    fn skim_classifies_garbage() {
        assert!(matches!(
            skim(b"this is not json"),
            Err(InvalidReason::NotJson(_))
        ));
        assert!(matches!(skim(b"[1,2,3]"), Err(InvalidReason::NotAnObject)));
        assert!(matches!(skim(b"5"), Err(InvalidReason::NotAnObject)));
        assert!(matches!(
            skim(br#"{"a":1} trailing"#),
            Err(InvalidReason::NotJson(_))
        ));
        assert!(matches!(skim(br#"{"a":"#), Err(InvalidReason::NotJson(_))));
        assert_eq!(
            skim(br#"{"action":5}"#).unwrap().action,
            ActionField::NotAString
        );
        assert_eq!(
            skim(br#"{"action":{"x":[1]}}"#).unwrap().action,
            ActionField::NotAString
        );
        assert_eq!(skim(br#"{}"#).unwrap().action, ActionField::Missing);
        assert_eq!(
            skim(br#"{"action":"a\"b"}"#).unwrap().action,
            ActionField::Str(Cow::Owned("a\"b".into()))
        );
    }

    #[test]
    fn classifies_actions() {
        use ActionClass::*;
        assert_eq!(
            classify_action("kms.secrets.delete"),
            Key(KeyAction::Delete)
        );
        assert_eq!(
            classify_action("HS-CRYPTO.secrets.Disable"),
            Key(KeyAction::Disable)
        );
        assert_eq!(
            classify_action("kms.secrets.ack-rotate"),
            Key(KeyAction::Ack(AckOf::Rotate))
        );
        assert_eq!(
            classify_action("kms.secrets.ackrotate"),
            Key(KeyAction::Ack(AckOf::Rotate))
        );
        assert_eq!(
            classify_action("kms.secrets.setkeyfordeletion"),
            Key(KeyAction::SetKeyForDeletion)
        );
        assert_eq!(classify_action("kms.secrets.wrap"), RoutineKey);
        assert_eq!(classify_action("kms.secrets.unwrap"), RoutineKey);
        assert_eq!(classify_action("kms.registrations.create"), RoutineKey);
        assert_eq!(classify_action("kms.secrets-event.ack"), LegacyAck);
        assert_eq!(classify_action("kms.secrets.eventack"), LegacyAck);
        assert_eq!(classify_action("iam-am.policy.create"), PolicyCreate);
        assert_eq!(classify_action("iam-am.policy.delete"), PolicyDelete);
        assert_eq!(classify_action("iam-am.policy.update"), Other);
        assert_eq!(
            classify_action("messagehub.instance.delete"),
            InstanceDelete
        );
        assert_eq!(classify_action("messagehub.topic.read"), Other);
        assert_eq!(classify_action(""), Other);
    }

    #[test]
    fn full_parse_accepts_string_payloads_and_numeric_codes() {
        let line = br#"{"action":"kms.secrets.ack-rotate","eventTime":"2026-08-20T18:01:00Z","outcome":"failure","reason":{"reasonCode":"408"},"target":{"id":" crn:k "},"responseData":"{\"resourceCRN\":\"crn:r\"}","requestData":{"requestURI":"/api/v2/keys/abc?force=true"}}"#;
        let e = parse_full(line, ActionClass::Key(KeyAction::Ack(AckOf::Rotate))).unwrap();
        assert_eq!(e.reason_code, Some(408));
        assert_eq!(e.outcome, Outcome::Failure);
        assert_eq!(e.ack_resource(), Some("crn:r"));
        assert_eq!(e.target_id, "crn:k");
        assert_eq!(e.key_id_from_request_uri(), Some("abc"));
    }

    #[test]
    fn digest_ignores_key_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":[1,2]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{ "b": {"d":[1, 2], "c":2}, "a":1 }"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":[2,1]}}"#).unwrap();
        assert_eq!(EventDigest::of_value(&a), EventDigest::of_value(&b));
        assert_ne!(EventDigest::of_value(&a), EventDigest::of_value(&c));
        let d = EventDigest::of_value(&a);
        assert_eq!(EventDigest::from_hex(&d.hex()), Some(d));
    }
}
