//! Cloud Resource Names: parsing and segment-wise comparison, and the key identity built on them.

use std::fmt;

/// A parsed CRN: `crn:v1:<cloud>:<type>:<service>:<location>:<scope>:<instance>:<resource-type>:<resource>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Crn {
    pub cloud: String,
    pub cloud_type: String,
    pub service: String,
    pub location: String,
    pub scope: String,
    pub instance: String,
    pub resource_type: String,
    pub resource: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrnError {
    #[error("not a CRN (expected crn:v1:<cloud>:<type>:<service>:<location>:<scope>:<instance>:<resource-type>:<resource>): {0:?}")]
    Malformed(String),
    #[error("not a key CRN (service must be kms or hs-crypto and resource type key, with a key id): {0:?}")]
    NotAKey(String),
}

impl Crn {
    pub fn parse(text: &str) -> Result<Crn, CrnError> {
        let text = text.trim();
        // The ten segments as slices first: nothing is allocated for a text that is not a CRN.
        let mut parts = [""; 10];
        let mut n = 0;
        for part in text.splitn(10, ':') {
            parts[n] = part;
            n += 1;
        }
        let [crn, version, cloud, cloud_type, service, location, scope, instance, resource_type, resource] =
            parts;
        if n != 10
            || !crn.eq_ignore_ascii_case("crn")
            || !version.eq_ignore_ascii_case("v1")
            || service.is_empty()
        {
            return Err(CrnError::Malformed(text.to_owned()));
        }
        Ok(Crn {
            cloud: cloud.to_owned(),
            cloud_type: cloud_type.to_owned(),
            service: service.to_ascii_lowercase(),
            location: location.to_owned(),
            scope: scope.to_owned(),
            instance: instance.to_owned(),
            resource_type: resource_type.to_owned(),
            resource: resource.to_owned(),
        })
    }

    /// The account id of an `a/<account>` scope.
    pub fn account(&self) -> Option<&str> {
        self.scope.strip_prefix("a/").filter(|a| !a.is_empty())
    }
}

impl fmt::Display for Crn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "crn:v1:{}:{}:{}:{}:{}:{}:{}:{}",
            self.cloud,
            self.cloud_type,
            self.service,
            self.location,
            self.scope,
            self.instance,
            self.resource_type,
            self.resource
        )
    }
}

/// Which key service holds a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyService {
    KeyProtect,
    HyperProtect,
}

impl KeyService {
    pub fn from_service_name(name: &str) -> Option<KeyService> {
        if name.eq_ignore_ascii_case("kms") {
            Some(KeyService::KeyProtect)
        } else if name.eq_ignore_ascii_case("hs-crypto") {
            Some(KeyService::HyperProtect)
        } else {
            None
        }
    }

    pub fn service_name(self) -> &'static str {
        match self {
            KeyService::KeyProtect => "kms",
            KeyService::HyperProtect => "hs-crypto",
        }
    }
}

/// A root key, identified by its CRN. Two key CRNs name the same key when their service, instance
/// and key id agree (compared segment-wise, not as strings).
#[derive(Clone, Debug)]
pub struct KeyCrn {
    pub crn: Crn,
    pub service: KeyService,
}

impl KeyCrn {
    pub fn parse(text: &str) -> Result<KeyCrn, CrnError> {
        let crn = Crn::parse(text)?;
        let service = KeyService::from_service_name(&crn.service)
            .ok_or_else(|| CrnError::NotAKey(text.trim().to_owned()))?;
        if !crn.resource_type.eq_ignore_ascii_case("key")
            || crn.resource.is_empty()
            || crn.instance.is_empty()
        {
            return Err(CrnError::NotAKey(text.trim().to_owned()));
        }
        Ok(KeyCrn { crn, service })
    }

    pub fn key_id(&self) -> &str {
        &self.crn.resource
    }

    pub fn instance(&self) -> &str {
        &self.crn.instance
    }

    pub fn account(&self) -> Option<&str> {
        self.crn.account()
    }

    /// The identity used to compare and index keys.
    pub fn identity(&self) -> KeyIdentity {
        KeyIdentity {
            service: self.service,
            instance: self.crn.instance.to_ascii_lowercase(),
            key_id: self.crn.resource.to_ascii_lowercase(),
        }
    }
}

impl fmt::Display for KeyCrn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.crn.fmt(f)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyIdentity {
    pub service: KeyService,
    pub instance: String,
    pub key_id: String,
}

/// A resource CRN reduced to what identifies it, for comparing deployment CRNs and resources
/// segment-wise (case of the service name and surrounding white space do not matter).
pub fn resource_identity(text: &str) -> Option<String> {
    Crn::parse(text).ok().map(|c| {
        format!(
            "{}:{}:{}:{}:{}:{}:{}",
            c.service,
            c.location,
            c.scope.to_ascii_lowercase(),
            c.instance.to_ascii_lowercase(),
            c.resource_type.to_ascii_lowercase(),
            c.resource,
            c.cloud_type
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "crn:v1:bluemix:public:kms:us-south:a/f047b55a3362ac06afad8a3f2f5586ea:00000000-0000-0000-0000-03eb00000001:key:00000000-0000-0000-0000-03eb00000002";

    #[test]
    fn parses_a_key_crn() {
        let k = KeyCrn::parse(KEY).unwrap();
        assert_eq!(k.key_id(), "00000000-0000-0000-0000-03eb00000002");
        assert_eq!(k.instance(), "00000000-0000-0000-0000-03eb00000001");
        assert_eq!(k.account(), Some("f047b55a3362ac06afad8a3f2f5586ea"));
        assert_eq!(k.service, KeyService::KeyProtect);
        assert_eq!(k.to_string(), KEY);
    }

    #[test]
    fn compares_keys_segment_wise() {
        let a = KeyCrn::parse(KEY).unwrap();
        let b = KeyCrn::parse(
            &KEY.replace(":kms:", ":KMS:")
                .replace("03eb00000002", "03EB00000002"),
        )
        .unwrap();
        assert_eq!(a.identity(), b.identity());
    }

    #[test]
    fn rejects_non_keys_and_garbage() {
        assert!(matches!(
            KeyCrn::parse("crn:v1:bluemix:public:messagehub:us-south:a/x:guid::"),
            Err(CrnError::NotAKey(_))
        ));
        assert!(matches!(
            KeyCrn::parse("not a crn"),
            Err(CrnError::Malformed(_))
        ));
        assert!(matches!(
            Crn::parse("crn:v1:bluemix:public"),
            Err(CrnError::Malformed(_))
        ));
        assert!(KeyCrn::parse("crn:v1:bluemix:public:kms:us-south:a/x::key:").is_err());
    }

    #[test]
    fn instance_crns_have_empty_resource() {
        let c = Crn::parse("crn:v1:bluemix:public:messagehub:us-south:a/acc:guid::").unwrap();
        assert_eq!(c.service, "messagehub");
        assert_eq!(c.instance, "guid");
        assert_eq!(c.resource, "");
        assert_eq!(c.account(), Some("acc"));
    }
}
