//! Traffic meters through `rte_mtr`: a profile (srTCM RFC 2697 or trTCM RFC 2698, byte mode),
//! a policy (green and yellow pass, red is dropped) and a meter object that `rte_flow` rules
//! reference with `METER(mtr_id)`. Meters belong to one port.

use std::ffi::CStr;
use std::ptr;

use dpdk_sys as sys;
use flow_offload::model::MeterProfile;

use crate::{Errno, Port};

/// What the driver said about an `rte_mtr` call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed: {errno}, cause {cause}{}", message.as_ref().map(|m| format!(", message {m:?}")).unwrap_or_default())]
pub struct MeterError {
    /// The failing call.
    pub call: &'static str,
    /// Its errno (ENOSYS: the port has no metering at all).
    pub errno: Errno,
    /// `rte_mtr_error.type` as a name (`METER_PROFILE`, `MTR_PARAMS`, ...).
    pub cause: &'static str,
    /// The driver's message.
    pub message: Option<String>,
}

fn cause_name(t: sys::rte_mtr_error_type) -> &'static str {
    match t {
        sys::RTE_MTR_ERROR_TYPE_NONE => "NONE",
        sys::RTE_MTR_ERROR_TYPE_UNSPECIFIED => "UNSPECIFIED",
        sys::RTE_MTR_ERROR_TYPE_METER_PROFILE_ID => "METER_PROFILE_ID",
        sys::RTE_MTR_ERROR_TYPE_METER_PROFILE => "METER_PROFILE",
        sys::RTE_MTR_ERROR_TYPE_METER_PROFILE_PACKET_MODE => "METER_PROFILE_PACKET_MODE",
        sys::RTE_MTR_ERROR_TYPE_MTR_ID => "MTR_ID",
        sys::RTE_MTR_ERROR_TYPE_MTR_PARAMS => "MTR_PARAMS",
        sys::RTE_MTR_ERROR_TYPE_POLICER_ACTION_GREEN => "POLICER_ACTION_GREEN",
        sys::RTE_MTR_ERROR_TYPE_POLICER_ACTION_YELLOW => "POLICER_ACTION_YELLOW",
        sys::RTE_MTR_ERROR_TYPE_POLICER_ACTION_RED => "POLICER_ACTION_RED",
        sys::RTE_MTR_ERROR_TYPE_STATS_MASK => "STATS_MASK",
        sys::RTE_MTR_ERROR_TYPE_STATS => "STATS",
        sys::RTE_MTR_ERROR_TYPE_SHARED => "SHARED",
        sys::RTE_MTR_ERROR_TYPE_METER_POLICY_ID => "METER_POLICY_ID",
        sys::RTE_MTR_ERROR_TYPE_METER_POLICY => "METER_POLICY",
        _ => "OTHER",
    }
}

/// Runs one `rte_mtr` call with a fresh error struct and turns a failure into [`MeterError`].
fn mtr_call(
    call: &'static str,
    f: impl FnOnce(*mut sys::rte_mtr_error) -> i32,
) -> Result<(), MeterError> {
    let mut err = sys::rte_mtr_error {
        type_: sys::RTE_MTR_ERROR_TYPE_NONE,
        cause: ptr::null(),
        message: ptr::null(),
    };
    let ret = f(&mut err);
    if ret >= 0 {
        return Ok(());
    }
    let message = if err.message.is_null() {
        None
    } else {
        // SAFETY: the driver set `message` to a NUL-terminated static or
        // per-port string that outlives this call.
        Some(
            unsafe { CStr::from_ptr(err.message) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    Err(MeterError {
        call,
        errno: Errno::from_ret(ret),
        cause: cause_name(err.type_),
        message,
    })
}

fn raw_profile(p: &MeterProfile) -> sys::rte_mtr_meter_profile {
    // SAFETY: an all-zero rte_mtr_meter_profile is valid (plain integers and a
    // union of integer structs).
    let mut raw: sys::rte_mtr_meter_profile = unsafe { std::mem::zeroed() };
    match *p {
        MeterProfile::SrTcm { cir, cbs, ebs } => {
            raw.alg = sys::RTE_MTR_SRTCM_RFC2697;
            raw.__bindgen_anon_1.srtcm_rfc2697 =
                sys::rte_mtr_meter_profile__bindgen_ty_1__bindgen_ty_1 { cir, cbs, ebs };
        }
        MeterProfile::TrTcm { cir, cbs, pir, pbs } => {
            raw.alg = sys::RTE_MTR_TRTCM_RFC2698;
            raw.__bindgen_anon_1.trtcm_rfc2698 =
                sys::rte_mtr_meter_profile__bindgen_ty_1__bindgen_ty_2 { cir, pir, cbs, pbs };
        }
    }
    raw
}

impl Port<'_> {
    /// Adds meter profile `id` (`rte_mtr_meter_profile_add`, byte mode).
    pub fn meter_profile_add(&self, id: u32, profile: &MeterProfile) -> Result<(), MeterError> {
        let mut raw = raw_profile(profile);
        let port = self.id();
        mtr_call("rte_mtr_meter_profile_add", |err| {
            // SAFETY: valid port id; `raw` and `err` are live for the call, which copies
            // the profile.
            unsafe { sys::rte_mtr_meter_profile_add(port, id, &mut raw, err) }
        })
    }

    /// Deletes meter profile `id`.
    pub fn meter_profile_delete(&self, id: u32) -> Result<(), MeterError> {
        let port = self.id();
        mtr_call("rte_mtr_meter_profile_delete", |err| {
            // SAFETY: valid port id and error out-pointer.
            unsafe { sys::rte_mtr_meter_profile_delete(port, id, err) }
        })
    }

    /// Adds policy `id`: green and yellow continue with the rule's actions, red is dropped.
    pub fn meter_policy_add_drop_red(&self, id: u32) -> Result<(), MeterError> {
        let end = sys::rte_flow_action {
            type_: sys::RTE_FLOW_ACTION_TYPE_END,
            conf: ptr::null(),
        };
        let drop = [
            sys::rte_flow_action {
                type_: sys::RTE_FLOW_ACTION_TYPE_DROP,
                conf: ptr::null(),
            },
            end,
        ];
        // Green and yellow: an empty (END-only) list = no extra action.
        let pass = [end];
        let mut params = sys::rte_mtr_meter_policy_params {
            actions: [pass.as_ptr(), pass.as_ptr(), drop.as_ptr()],
        };
        let port = self.id();
        mtr_call("rte_mtr_meter_policy_add", |err| {
            // SAFETY: valid port id; the END-terminated action arrays and `params` live
            // across the call, which copies what it keeps.
            unsafe { sys::rte_mtr_meter_policy_add(port, id, &mut params, err) }
        })
    }

    /// Deletes policy `id`.
    pub fn meter_policy_delete(&self, id: u32) -> Result<(), MeterError> {
        let port = self.id();
        mtr_call("rte_mtr_meter_policy_delete", |err| {
            // SAFETY: valid port id and error out-pointer.
            unsafe { sys::rte_mtr_meter_policy_delete(port, id, err) }
        })
    }

    /// Creates meter object `mtr_id` using `profile_id` and `policy_id`, enabled, not shared.
    pub fn meter_create(
        &self,
        mtr_id: u32,
        profile_id: u32,
        policy_id: u32,
    ) -> Result<(), MeterError> {
        // SAFETY: an all-zero rte_mtr_params is valid (ids, flags, null tables).
        let mut params: sys::rte_mtr_params = unsafe { std::mem::zeroed() };
        params.meter_profile_id = profile_id;
        params.meter_policy_id = policy_id;
        params.meter_enable = 1;
        params.default_input_color = sys::RTE_COLOR_GREEN;
        let port = self.id();
        mtr_call("rte_mtr_create", |err| {
            // SAFETY: valid port id; `params` (null DSCP/VLAN tables) and `err` live
            // across the call.
            unsafe { sys::rte_mtr_create(port, mtr_id, &mut params, 0, err) }
        })
    }

    /// Points meter `mtr_id` at another profile (in place: its rules keep using it).
    pub fn meter_profile_update(&self, mtr_id: u32, profile_id: u32) -> Result<(), MeterError> {
        let port = self.id();
        mtr_call("rte_mtr_meter_profile_update", |err| {
            // SAFETY: valid port id and error out-pointer.
            unsafe { sys::rte_mtr_meter_profile_update(port, mtr_id, profile_id, err) }
        })
    }

    /// Destroys meter object `mtr_id` (no rule may use it any more).
    pub fn meter_destroy(&self, mtr_id: u32) -> Result<(), MeterError> {
        let port = self.id();
        mtr_call("rte_mtr_destroy", |err| {
            // SAFETY: valid port id and error out-pointer.
            unsafe { sys::rte_mtr_destroy(port, mtr_id, err) }
        })
    }
}
