//! A group's member list (and who may post), from the shard's cache or
//! from storage.
//!
//! Owns the one way a shard learns who is in a group: a fresh cached list,
//! else a read-path request (which storage answers only after committing
//! every record appended before it, so a change made on this node is seen),
//! put back in the cache. Used by every feature that checks membership
//! (group sends and changes, receipts, history, typing). Never changes a
//! membership: changes are messages (`features::groups`).

use std::rc::Rc;

use chat_protocol::store_wire::{MemberRole, Request, Response};

use crate::shard::state::group_cache::Members;
use crate::shard::state::store_client::StoreError;
use crate::shard::state::Shard;

/// The members of `group` from the cache when it is fresh (and `fresh` is
/// not asked for), else from storage. An empty list: no such group.
pub async fn members(shard: &Rc<Shard>, group: &str, fresh: bool) -> Result<Members, StoreError> {
    if !fresh {
        if let Some(members) = cached(shard, group) {
            return Ok(members);
        }
    }
    load(shard, group).await.map(|(_, list)| list)
}

/// A group's members with their roles, and its posting rule.
pub struct Roles {
    pub members: Vec<MemberRole>,
    /// Only admins post (`group_restrict`).
    pub admins_only: bool,
}

/// The members of `group` with their roles, always from storage (for the
/// decisions roles make: who may change the group, where a member's
/// history starts); the cache is refreshed with the list on the way.
pub async fn member_roles(shard: &Rc<Shard>, group: &str) -> Result<Roles, StoreError> {
    load(shard, group).await.map(|(roles, _)| roles)
}

/// Who may post in a restricted group: its admins, or, when it has none
/// (they all left), every member, as it is then managed by any member.
fn posters(roles: &Roles) -> Option<Members> {
    let admins: Members = roles
        .members
        .iter()
        .filter(|member| member.admin)
        .map(|member| member.user.clone().into_boxed_str())
        .collect();
    (roles.admins_only && !admins.is_empty()).then_some(admins)
}

/// Who may post in `group` (`Some(None)`: every member), when its entry
/// in the cache is fresh (it is right after `members` or `cached`).
pub fn cached_posters(shard: &Shard, group: &str) -> Option<Option<Members>> {
    shard
        .groups
        .borrow()
        .posters(group, shard.monotonic_ms(), shard.config.group_cache_ms)
}

/// The one read of a group's members: with their roles, and the list put
/// in the cache.
async fn load(shard: &Rc<Shard>, group: &str) -> Result<(Roles, Members), StoreError> {
    let request = |req| Request::MemberRoles {
        req,
        group: group.to_owned(),
    };
    let response = shard
        .store
        .request(request, shard.storage_timeout())
        .await?;
    let Response::MemberRoles {
        members,
        admins_only,
        ..
    } = response
    else {
        return Err(StoreError::Unavailable);
    };
    let list: Members = members
        .iter()
        .map(|member| member.user.clone().into_boxed_str())
        .collect();
    let roles = Roles {
        members,
        admins_only,
    };
    shard
        .groups
        .borrow_mut()
        .put(group, list.clone(), posters(&roles), shard.monotonic_ms());
    Ok((roles, list))
}

/// The cached members of `group`, if fresh.
pub fn cached(shard: &Shard, group: &str) -> Option<Members> {
    shard
        .groups
        .borrow()
        .get(group, shard.monotonic_ms(), shard.config.group_cache_ms)
}
