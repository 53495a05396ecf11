//! `rte_flow_validate` with typed errors that name the refused item/action
//! (IR rules: see [`crate::rule`]).

use std::ffi::{c_void, CStr};
use std::fmt;
use std::ptr;

use dpdk_sys as sys;

use crate::{Errno, Port};

/// Rule attributes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlowAttr {
    /// Group (table) id.
    pub group: u32,
    /// Priority within the group (lower is higher).
    pub priority: u32,
    /// Match on ingress traffic.
    pub ingress: bool,
    /// Match on egress traffic.
    pub egress: bool,
    /// Apply in the embedded switch (transfer) domain.
    pub transfer: bool,
}

impl FlowAttr {
    /// An ingress rule in group 0, priority 0.
    pub fn ingress() -> Self {
        Self {
            ingress: true,
            ..Self::default()
        }
    }
}

/// A pattern item matching any packet with that header (no spec/mask yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum FlowItem {
    Eth,
    Vlan,
    Ipv4,
    Ipv6,
    Udp,
    Tcp,
}

impl FlowItem {
    fn raw_type(self) -> sys::rte_flow_item_type {
        match self {
            Self::Eth => sys::RTE_FLOW_ITEM_TYPE_ETH,
            Self::Vlan => sys::RTE_FLOW_ITEM_TYPE_VLAN,
            Self::Ipv4 => sys::RTE_FLOW_ITEM_TYPE_IPV4,
            Self::Ipv6 => sys::RTE_FLOW_ITEM_TYPE_IPV6,
            Self::Udp => sys::RTE_FLOW_ITEM_TYPE_UDP,
            Self::Tcp => sys::RTE_FLOW_ITEM_TYPE_TCP,
        }
    }
}

/// A rule action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowAction {
    /// Deliver to an rx queue.
    Queue(u16),
    /// Drop the packet.
    Drop,
    /// Attach a mark (`mbuf.hash.fdir.hi`).
    Mark(u32),
    /// Leave the packet to later rules / default handling.
    Passthru,
}

/// Which part of a pattern item the driver refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemPart {
    /// The item as a whole (its type).
    Item,
    /// Its `spec`.
    Spec,
    /// Its `last`.
    Last,
    /// Its `mask`.
    Mask,
}

/// What `rte_flow_error.type` / `.cause` point at, with indices resolved
/// into the caller's pattern/actions (`None` when the driver gave no
/// recognisable cause pointer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowErrorCause {
    /// No cause given (`RTE_FLOW_ERROR_TYPE_NONE`).
    None,
    /// Unspecified (typical of ENOSYS: the PMD has no rte_flow at all).
    Unspecified,
    /// A flow handle.
    Handle,
    /// `attr.group`.
    AttrGroup,
    /// `attr.priority`.
    AttrPriority,
    /// `attr.ingress`.
    AttrIngress,
    /// `attr.egress`.
    AttrEgress,
    /// `attr.transfer`.
    AttrTransfer,
    /// The attributes as a whole.
    Attr,
    /// Pattern length.
    ItemNum,
    /// A pattern item (or part of it).
    Item {
        /// Index into the caller's pattern.
        index: Option<usize>,
        /// Which part.
        part: ItemPart,
    },
    /// Action count.
    ActionNum,
    /// An action (`conf: true`: its configuration).
    Action {
        /// Index into the caller's actions.
        index: Option<usize>,
        /// Whether the action's conf (rather than its type) was refused.
        conf: bool,
    },
    /// Device state.
    State,
    /// A type this crate does not know.
    Other(u32),
}

impl fmt::Display for FlowErrorCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idx = |i: &Option<usize>| i.map_or_else(|| "?".to_owned(), |i| i.to_string());
        match self {
            Self::Item { index, part } => write!(f, "pattern item #{} ({part:?})", idx(index)),
            Self::Action { index, conf } => {
                write!(
                    f,
                    "action #{}{}",
                    idx(index),
                    if *conf { " conf" } else { "" }
                )
            }
            other => write!(f, "{other:?}"),
        }
    }
}

/// A rule the driver refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rte_flow refused the rule: {errno}, cause {cause}, message {message:?}")]
pub struct FlowRefusal {
    /// ENOSYS (no rte_flow), ENOTSUP (valid but unsupported), EINVAL,
    /// ENOSPC, EEXIST, ENOMEM, EBUSY, EIO, ENODEV...
    pub errno: Errno,
    /// What was refused.
    pub cause: FlowErrorCause,
    /// The driver's message, if any.
    pub message: Option<String>,
}

/// Ask the port's driver whether it would accept the rule
/// (`rte_flow_validate`); nothing is installed.
pub fn flow_validate(
    port: &Port<'_>,
    attr: &FlowAttr,
    pattern: &[FlowItem],
    actions: &[FlowAction],
) -> Result<(), FlowRefusal> {
    let mut raw_attr = sys::rte_flow_attr {
        group: attr.group,
        priority: attr.priority,
        ..Default::default()
    };
    raw_attr.set_ingress(u32::from(attr.ingress));
    raw_attr.set_egress(u32::from(attr.egress));
    raw_attr.set_transfer(u32::from(attr.transfer));

    let items: Vec<sys::rte_flow_item> = pattern
        .iter()
        .map(|i| i.raw_type())
        .chain(std::iter::once(sys::RTE_FLOW_ITEM_TYPE_END))
        .map(|type_| sys::rte_flow_item {
            type_,
            spec: ptr::null(),
            last: ptr::null(),
            mask: ptr::null(),
        })
        .collect();

    // Action confs must stay at fixed addresses until the call returns.
    let queues: Vec<sys::rte_flow_action_queue> = actions
        .iter()
        .map(|a| match a {
            FlowAction::Queue(q) => sys::rte_flow_action_queue { index: *q },
            _ => sys::rte_flow_action_queue { index: 0 },
        })
        .collect();
    let marks: Vec<sys::rte_flow_action_mark> = actions
        .iter()
        .map(|a| match a {
            FlowAction::Mark(id) => sys::rte_flow_action_mark { id: *id },
            _ => sys::rte_flow_action_mark { id: 0 },
        })
        .collect();
    let raw_actions: Vec<sys::rte_flow_action> = actions
        .iter()
        .zip(queues.iter().zip(&marks))
        .map(|(a, (q, m))| match a {
            FlowAction::Queue(_) => sys::rte_flow_action {
                type_: sys::RTE_FLOW_ACTION_TYPE_QUEUE,
                conf: ptr::from_ref(q).cast(),
            },
            FlowAction::Drop => sys::rte_flow_action {
                type_: sys::RTE_FLOW_ACTION_TYPE_DROP,
                conf: ptr::null(),
            },
            FlowAction::Mark(_) => sys::rte_flow_action {
                type_: sys::RTE_FLOW_ACTION_TYPE_MARK,
                conf: ptr::from_ref(m).cast(),
            },
            FlowAction::Passthru => sys::rte_flow_action {
                type_: sys::RTE_FLOW_ACTION_TYPE_PASSTHRU,
                conf: ptr::null(),
            },
        })
        .chain(std::iter::once(sys::rte_flow_action {
            type_: sys::RTE_FLOW_ACTION_TYPE_END,
            conf: ptr::null(),
        }))
        .collect();

    let mut err = sys::rte_flow_error {
        type_: sys::RTE_FLOW_ERROR_TYPE_NONE,
        cause: ptr::null(),
        message: ptr::null(),
    };
    // SAFETY: attr, END-terminated pattern and actions (with their confs in
    // `queues`/`marks`) are alive and unmoved for the call; `err` is a valid
    // out-pointer. rte_flow_validate installs nothing.
    let ret = unsafe {
        sys::rte_flow_validate(
            port.id(),
            &raw_attr,
            items.as_ptr(),
            raw_actions.as_ptr(),
            &mut err,
        )
    };
    if ret >= 0 {
        return Ok(());
    }
    Err(refusal(
        ret,
        &err,
        classify_cause(err.type_, err.cause, &items, &raw_actions),
    ))
}

/// A [`FlowRefusal`] from a negative return code, the filled-in error and
/// its resolved cause.
pub(crate) fn refusal(ret: i32, err: &sys::rte_flow_error, cause: FlowErrorCause) -> FlowRefusal {
    let message = if err.message.is_null() {
        None
    } else {
        // SAFETY: drivers set `message` to a NUL-terminated static string.
        Some(
            unsafe { CStr::from_ptr(err.message) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    FlowRefusal {
        errno: Errno::from_ret(ret),
        cause,
        message,
    }
}

/// Resolve `rte_flow_error.{type, cause}` into indices of `items`/`actions`
/// by comparing the cause pointer with their addresses (or their
/// spec/last/mask/conf pointers). Pure pointer comparison, never dereferenced.
pub(crate) fn classify_cause(
    ty: sys::rte_flow_error_type,
    cause: *const c_void,
    items: &[sys::rte_flow_item],
    actions: &[sys::rte_flow_action],
) -> FlowErrorCause {
    let item_at = |f: &dyn Fn(&sys::rte_flow_item) -> *const c_void| {
        if cause.is_null() {
            return None;
        }
        items.iter().position(|i| f(i) == cause)
    };
    let action_at = |f: &dyn Fn(&sys::rte_flow_action) -> *const c_void| {
        if cause.is_null() {
            return None;
        }
        actions.iter().position(|a| f(a) == cause)
    };
    match ty {
        sys::RTE_FLOW_ERROR_TYPE_NONE => FlowErrorCause::None,
        sys::RTE_FLOW_ERROR_TYPE_UNSPECIFIED => FlowErrorCause::Unspecified,
        sys::RTE_FLOW_ERROR_TYPE_HANDLE => FlowErrorCause::Handle,
        sys::RTE_FLOW_ERROR_TYPE_ATTR_GROUP => FlowErrorCause::AttrGroup,
        sys::RTE_FLOW_ERROR_TYPE_ATTR_PRIORITY => FlowErrorCause::AttrPriority,
        sys::RTE_FLOW_ERROR_TYPE_ATTR_INGRESS => FlowErrorCause::AttrIngress,
        sys::RTE_FLOW_ERROR_TYPE_ATTR_EGRESS => FlowErrorCause::AttrEgress,
        sys::RTE_FLOW_ERROR_TYPE_ATTR_TRANSFER => FlowErrorCause::AttrTransfer,
        sys::RTE_FLOW_ERROR_TYPE_ATTR => FlowErrorCause::Attr,
        sys::RTE_FLOW_ERROR_TYPE_ITEM_NUM => FlowErrorCause::ItemNum,
        sys::RTE_FLOW_ERROR_TYPE_ITEM => FlowErrorCause::Item {
            index: item_at(&|i| ptr::from_ref(i).cast()),
            part: ItemPart::Item,
        },
        sys::RTE_FLOW_ERROR_TYPE_ITEM_SPEC => FlowErrorCause::Item {
            index: item_at(&|i| i.spec),
            part: ItemPart::Spec,
        },
        sys::RTE_FLOW_ERROR_TYPE_ITEM_LAST => FlowErrorCause::Item {
            index: item_at(&|i| i.last),
            part: ItemPart::Last,
        },
        sys::RTE_FLOW_ERROR_TYPE_ITEM_MASK => FlowErrorCause::Item {
            index: item_at(&|i| i.mask),
            part: ItemPart::Mask,
        },
        sys::RTE_FLOW_ERROR_TYPE_ACTION_NUM => FlowErrorCause::ActionNum,
        sys::RTE_FLOW_ERROR_TYPE_ACTION => FlowErrorCause::Action {
            index: action_at(&|a| ptr::from_ref(a).cast()),
            conf: false,
        },
        sys::RTE_FLOW_ERROR_TYPE_ACTION_CONF => FlowErrorCause::Action {
            index: action_at(&|a| a.conf),
            conf: true,
        },
        sys::RTE_FLOW_ERROR_TYPE_STATE => FlowErrorCause::State,
        other => FlowErrorCause::Other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(type_: sys::rte_flow_item_type, spec: *const c_void) -> sys::rte_flow_item {
        sys::rte_flow_item {
            type_,
            spec,
            last: ptr::null(),
            mask: ptr::null(),
        }
    }

    #[test]
    fn cause_pointer_names_item_and_action_index() {
        let spec = 7u32;
        let q = sys::rte_flow_action_queue { index: 3 };
        let items = [
            item(sys::RTE_FLOW_ITEM_TYPE_ETH, ptr::null()),
            item(sys::RTE_FLOW_ITEM_TYPE_IPV4, ptr::from_ref(&spec).cast()),
            item(sys::RTE_FLOW_ITEM_TYPE_END, ptr::null()),
        ];
        let actions = [
            sys::rte_flow_action {
                type_: sys::RTE_FLOW_ACTION_TYPE_DROP,
                conf: ptr::null(),
            },
            sys::rte_flow_action {
                type_: sys::RTE_FLOW_ACTION_TYPE_QUEUE,
                conf: ptr::from_ref(&q).cast(),
            },
            sys::rte_flow_action {
                type_: sys::RTE_FLOW_ACTION_TYPE_END,
                conf: ptr::null(),
            },
        ];
        let c = |ty, p: *const c_void| classify_cause(ty, p, &items, &actions);
        assert_eq!(
            c(
                sys::RTE_FLOW_ERROR_TYPE_ITEM,
                ptr::from_ref(&items[1]).cast()
            ),
            FlowErrorCause::Item {
                index: Some(1),
                part: ItemPart::Item
            }
        );
        assert_eq!(
            c(
                sys::RTE_FLOW_ERROR_TYPE_ITEM_SPEC,
                ptr::from_ref(&spec).cast()
            ),
            FlowErrorCause::Item {
                index: Some(1),
                part: ItemPart::Spec
            }
        );
        assert_eq!(
            c(
                sys::RTE_FLOW_ERROR_TYPE_ACTION,
                ptr::from_ref(&actions[0]).cast()
            ),
            FlowErrorCause::Action {
                index: Some(0),
                conf: false
            }
        );
        assert_eq!(
            c(
                sys::RTE_FLOW_ERROR_TYPE_ACTION_CONF,
                ptr::from_ref(&q).cast()
            ),
            FlowErrorCause::Action {
                index: Some(1),
                conf: true
            }
        );
        assert_eq!(
            c(sys::RTE_FLOW_ERROR_TYPE_ITEM, ptr::null()),
            FlowErrorCause::Item {
                index: None,
                part: ItemPart::Item
            }
        );
        assert_eq!(
            c(sys::RTE_FLOW_ERROR_TYPE_UNSPECIFIED, ptr::null()),
            FlowErrorCause::Unspecified
        );
        assert_eq!(
            c(sys::RTE_FLOW_ERROR_TYPE_ATTR_TRANSFER, ptr::null()),
            FlowErrorCause::AttrTransfer
        );
        assert_eq!(c(999, ptr::null()), FlowErrorCause::Other(999));
        let shown = FlowErrorCause::Item {
            index: Some(1),
            part: ItemPart::Spec,
        }
        .to_string();
        assert_eq!(shown, "pattern item #1 (Spec)");
    }
}
