//! Devices that name themselves, so that a phone can move *down* a version,
//! and from `/{db}` to a version.
//!
//! A stateless gateway serves moves between versions in one direction only
//! (docs/design.md, "Moves between versions go up"): within one
//! presentation context a phone fresh at `/v/3` and a phone coming down from
//! `/v/7` receive the same answer, so the one coming down keeps the v7 rung
//! it holds. A phone that names itself (`X-Rewind-Device: {id}`, or
//! `/_device/{id}` after the version prefix) gets a record in the
//! database's companion (`device:{id}`): the version of its last pinned
//! request, whether its last request followed `/{db}`, and one **device
//! epoch** per move down or from `/{db}` to a version. From its first
//! device epoch on, its presentations are in contexts no other phone shares
//! (`view::contexts`, `view::following`), which retire the contexts it held
//! copies from, so it converges in one pull like a phone moving up. The
//! record lives in the store, so two gateways answer the device alike.

use rewind_engine::state::{companion_doc, Database};
use rewind_store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::GatewayError;

/// The most device epochs a record keeps (oldest dropped first): copies a
/// device pushes back from an epoch older than these count as presented
/// in a state the server does not know (`view::CopyContext::Unknown`).
const KEPT_EPOCHS: usize = 64;

/// How many times a conditional write of a record is tried against other
/// writers (another gateway, a concurrent request of the same device).
const WRITE_ATTEMPTS: usize = 10;

/// What the gateway records of a device that names itself, per database.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// The version of the device's last request at a version it chose
    /// (`/v/{k}` or `X-Rewind-Version`), if it made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Its last request followed `/{db}` (chose no version).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub following: bool,
    /// Its device epochs, oldest first, one per move down or from `/{db}`
    /// to a version (at most [`KEPT_EPOCHS`]); empty until it makes one.
    #[serde(default)]
    pub epochs: Vec<String>,
    #[serde(rename = "_rev", default, skip_serializing_if = "Option::is_none")]
    rev: Option<String>,
}

/// Checks a device id as a client sends it: 1 to 100 characters of
/// letters, digits, `.`, `_` and `-`.
pub fn check_id(id: &str) -> Result<(), GatewayError> {
    let valid = (1..=100).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    match valid {
        true => Ok(()),
        false => Err(GatewayError::BadRequest(format!(
            "device id `{id}`: 1 to 100 letters, digits, `.`, `_` or `-`"
        ))),
    }
}

/// The companion document id of a device's record.
fn record_id(device: &str) -> String {
    format!("device:{device}")
}

impl Device {
    /// Reads the record of `device` (an empty one when there is none).
    pub async fn load(database: &Database, device: &str) -> Result<Device, GatewayError> {
        match companion_doc(&database.state, &record_id(device)).await? {
            Some(doc) => serde_json::from_value(doc)
                .map_err(|e| GatewayError::Internal(format!("the record of device {device}: {e}"))),
            None => Ok(Device::default()),
        }
    }

    /// True when a request at `k` (`None`: following `/{db}`) changes
    /// nothing in this record.
    pub fn notes(&self, k: Option<u32>) -> bool {
        match k {
            None => self.following,
            Some(k) => !self.following && self.version == Some(k),
        }
    }

    /// True when a request at `k` starts a device epoch: a version below
    /// the one the device last chose, or any version after following
    /// `/{db}` (the phone holds the served version's copies, in contexts a
    /// pinned client's presentation does not retire).
    fn starts_epoch(&self, k: Option<u32>) -> bool {
        match k {
            None => false,
            Some(k) => self.following || matches!(self.version, Some(v) if k < v),
        }
    }

    /// Reads the record of `device` and notes a request from it at version
    /// `k` (`None`: following `/{db}`): a move down, or from `/{db}` to a
    /// version, starts a device epoch; any other change is recorded as is.
    /// Written conditionally on the record read, again on a conflict, so
    /// that concurrent requests of a device start one epoch per move.
    pub async fn note(
        database: &Database,
        device: &str,
        k: Option<u32>,
    ) -> Result<Device, GatewayError> {
        for _ in 0..WRITE_ATTEMPTS {
            let mut record = Device::load(database, device).await?;
            if record.notes(k) {
                return Ok(record);
            }
            if record.starts_epoch(k) {
                let n = record.epochs.len() + 1;
                record.epochs.push(epoch_name(device, n));
                let extra = record.epochs.len().saturating_sub(KEPT_EPOCHS);
                record.epochs.drain(..extra);
            }
            record.following = k.is_none();
            if k.is_some() {
                record.version = k;
            }
            let mut doc =
                serde_json::to_value(&record).map_err(|e| GatewayError::Internal(e.to_string()))?;
            doc["_id"] = Value::from(record_id(device));
            match database.state.put(doc).await {
                Ok(rev) => {
                    record.rev = Some(rev);
                    return Ok(record);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(GatewayError::Conflict(record_id(device)))
    }

    /// What the root uuid at `/v/{k}` (`None`: `/`, following) names of
    /// this record, if anything: the current device epoch, marked when a
    /// request at `k` will start the next one (a client may read the root
    /// before the database, as `rewind`'s own replicator does: the uuid must
    /// differ from the one it had at `k` in the current epoch, before its
    /// move up and back down).
    pub fn uuid_part(&self, k: Option<u32>) -> Option<String> {
        let moving_down = self.starts_epoch(k);
        let epoch = self.epochs.last().map(String::as_str).unwrap_or("");
        match (epoch, moving_down) {
            ("", false) => None,
            (epoch, false) => Some(epoch.to_owned()),
            (epoch, true) => Some(format!("{epoch}+down")),
        }
    }
}

/// The name of a device's `n`th epoch: unique to the device and the moment
/// (a restored companion that forgot an epoch starts the next one under a
/// name no phone holds copies from), and without `:` (`view` reads an epoch
/// named `{version}:{run}` as serving one version).
fn epoch_name(device: &str, n: usize) -> String {
    let nonce = format!(
        "{:x}",
        md5::compute(format!(
            "{device}\n{n}\n{}\n{:?}",
            rewind_engine::state::now_ms(),
            std::time::Instant::now()
        ))
    );
    format!("device {device} {n} {}", &nonce[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_checked() {
        for good in ["phone-17", "a", "A.b_c-9"] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in ["", "a b", "a:b", "a/b", &"x".repeat(101)] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_root_uuid_part_changes_with_each_move_down_before_and_after_it_is_noted() {
        let mut record = Device::default();
        assert_eq!(record.uuid_part(Some(3)), None, "a device never seen");
        record.version = Some(7);
        assert_eq!(record.uuid_part(Some(7)), None, "no move down yet");
        assert_eq!(record.uuid_part(Some(3)).as_deref(), Some("+down"));
        // Noted: 7 → 3 started epoch e1; up to 5 within it; down to 3 again.
        record.epochs.push("e1".into());
        record.version = Some(3);
        assert_eq!(record.uuid_part(Some(5)).as_deref(), Some("e1"));
        record.version = Some(5);
        let at3 = record.uuid_part(Some(3));
        assert_eq!(at3.as_deref(), Some("e1+down"));
        assert_ne!(
            at3.as_deref(),
            Some("e1"),
            "differs from an up visit at 3 in e1"
        );
        // Following `/{db}` starts none; a version after it does.
        assert_eq!(record.uuid_part(None).as_deref(), Some("e1"));
        record.following = true;
        assert_eq!(record.uuid_part(Some(5)).as_deref(), Some("e1+down"));
        assert!(record.notes(None) && !record.notes(Some(5)));
    }

    #[test]
    fn an_epoch_name_names_the_device_and_never_reads_as_a_version() {
        let name = epoch_name("phone-1", 2);
        assert!(name.starts_with("device phone-1 2 "), "{name}");
        assert!(!name.contains(':'));
        assert_ne!(name, epoch_name("phone-1", 2), "a fresh nonce each time");
    }
}
