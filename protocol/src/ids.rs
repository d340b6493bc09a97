//! User, device and client message ids; conversation ids; which shard is a user's home.
//!
//! Owns the id grammar (1–64 characters of `[A-Za-z0-9_.-]`) and the two pure
//! functions every node must agree on: the 1:1 conversation id and the home shard.
//! Never allocates on the validation path.

use std::hash::Hasher;

pub use crate::limits::ID_LENGTH_MAX;

/// True when `id` is 1–64 characters of `[A-Za-z0-9_.-]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_LENGTH_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// The conversation id of a 1:1 chat: `dm:<lower>:<higher>`, the same for both
/// participants. `:` cannot occur in an id, so the form is unambiguous.
pub fn direct_conversation_id(user_a: &str, user_b: &str) -> String {
    let (low, high) = if user_a <= user_b {
        (user_a, user_b)
    } else {
        (user_b, user_a)
    };
    let mut conversation = String::with_capacity(3 + low.len() + 1 + high.len());
    conversation.push_str("dm:");
    conversation.push_str(low);
    conversation.push(':');
    conversation.push_str(high);
    conversation
}

/// Whether `user_id` is one of the two users of direct conversation `conversation`.
/// (Ids cannot contain `:`, so the split is unambiguous.)
pub fn is_direct_member(conversation: &str, user_id: &str) -> bool {
    let Some(pair) = conversation.strip_prefix("dm:") else {
        return false;
    };
    let Some((low, high)) = pair.split_once(':') else {
        return false;
    };
    is_valid_id(low) && is_valid_id(high) && (low == user_id || high == user_id)
}

/// The conversation id of group `group`: `grp:<group>`.
pub fn group_conversation_id(group: &str) -> String {
    let mut conversation = String::with_capacity(4 + group.len());
    conversation.push_str("grp:");
    conversation.push_str(group);
    conversation
}

/// The group of a group conversation id, if it is one.
pub fn group_of_conversation(conversation: &str) -> Option<&str> {
    conversation
        .strip_prefix("grp:")
        .filter(|group| is_valid_id(group))
}

/// The id of a group created by the message `message_id`: `g<id>`. Unique
/// (a snowflake) and fits the id grammar.
pub fn new_group_id(message_id: u64) -> String {
    format!("g{message_id}")
}

/// The conversation under which receipts for `user` are stored and synced.
/// Nobody can read it as history (it is neither a direct nor a group id).
pub fn receipts_conversation_id(user: &str) -> String {
    format!("rcpt:{user}")
}

/// A stable 64-bit hash of a user id (FNV-1a). Stable across processes, builds and
/// versions: it decides placement, so changing it moves every user.
pub fn user_hash(user_id: &str) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(user_id.as_bytes());
    hasher.finish()
}

/// The shard that is home to `user_id` on a node with `shard_count` shards.
pub fn home_shard(user_id: &str, shard_count: usize) -> usize {
    assert!(shard_count > 0, "a node has at least one shard");
    (user_hash(user_id) % shard_count as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_grammar_accepts_the_documented_alphabet_and_rejects_the_rest() {
        assert!(is_valid_id("alice"));
        assert!(is_valid_id("A-z_0.9"));
        assert!(is_valid_id(&"x".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id("has space"));
        assert!(!is_valid_id("colon:"));
        assert!(!is_valid_id("ünicode"));
    }

    #[test]
    fn direct_conversation_is_the_same_for_both_participants() {
        assert_eq!(direct_conversation_id("bob", "alice"), "dm:alice:bob");
        assert_eq!(direct_conversation_id("alice", "bob"), "dm:alice:bob");
        assert_eq!(direct_conversation_id("carol", "carol"), "dm:carol:carol");
    }

    #[test]
    fn home_shard_is_stable_and_in_range() {
        // Pinned value: placement must not change between releases.
        assert_eq!(user_hash("alice"), 0x508b2abb65a03907);
        for shards in 1..16 {
            assert!(home_shard("alice", shards) < shards);
        }
        let spread: std::collections::HashSet<usize> = (0..100)
            .map(|i| home_shard(&format!("user{i}"), 4))
            .collect();
        assert_eq!(spread.len(), 4, "100 users should land on all 4 shards");
    }

    #[test]
    fn direct_membership_follows_the_conversation_id() {
        let conversation = direct_conversation_id("bob", "alice");
        assert!(is_direct_member(&conversation, "alice"));
        assert!(is_direct_member(&conversation, "bob"));
        assert!(!is_direct_member(&conversation, "carol"));
        assert!(!is_direct_member("dm:alice", "alice"));
        assert!(!is_direct_member("group:alice:bob", "alice"));
    }

    #[test]
    fn group_conversations_name_their_group() {
        let group = new_group_id(7);
        assert_eq!(group, "g7");
        assert!(is_valid_id(&group));
        assert_eq!(
            group_of_conversation(&group_conversation_id(&group)),
            Some("g7")
        );
        assert_eq!(group_of_conversation("dm:a:b"), None);
        assert_eq!(group_of_conversation("grp:bad id"), None);
        assert_eq!(
            group_of_conversation(&receipts_conversation_id("bob")),
            None
        );
        assert!(!is_direct_member(&receipts_conversation_id("bob"), "bob"));
    }
}
